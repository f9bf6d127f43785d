"""Over-HTTP throughput at concurrency 64 across 100 stored adapters, in one run beside:

  * in-process batched throughput: the same request mix straight into the same Engine code, no HTTP;
  * a naive server: the same server with --max-batch-size 1, i.e. one forward per request.

The real server (`python -m service`) runs as a subprocess on 127.0.0.1 only; every loop is bounded in
count and time. Base: the pretrained MiniLM. Usage: python benchmarks/bench_http.py [--requests 640]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import adapters as A  # noqa: E402
from benchmarks.common import machine_info, write_json  # noqa: E402
from service.engine import Engine, load_base_model  # noqa: E402
from service.engine.config import EngineConfig  # noqa: E402
from service.storage import local_store  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog while small adapters serve many tasks at once".split()
CONCURRENCY, N_ADAPTERS = 64, 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapter(model: torch.nn.Module, seed: int) -> tuple[bytes, bytes]:
    gen = torch.Generator().manual_seed(seed)
    lora = {n: (torch.randn(8, m.in_features, generator=gen) * 0.05,
                torch.randn(m.out_features, 8, generator=gen) * 0.05)
            for n, m in model.named_modules() if n.endswith(("query", "value"))}
    return A.to_peft_bytes(A.LoraWeights(A.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]), lora))


def workload(n: int) -> list[tuple[str, str]]:
    rng = random.Random(0)
    return [(f"task-{rng.randrange(N_ADAPTERS):03d}", " ".join(rng.choices(WORDS, k=12))) for _ in range(n)]


def start_server(store: Path, port: int, *extra: str, merge_policy: str = "never") -> subprocess.Popen:
    """`python -m service` on 127.0.0.1:port over `store`, returned once /readyz answers 200."""
    proc = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--store",
                             str(store), "--log-level", "warning", "--merge-policy", merge_policy, *extra], cwd=ROOT)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("server exited during start-up")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not become ready in 180 s")


def summarize(latencies: list[float], wall: float) -> dict:
    lat = sorted(latencies)
    return {"requests": len(lat), "throughput_rps": len(lat) / wall, "p50_ms": 1e3 * statistics.median(lat),
            "p99_ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


async def drive_http(port: int, work: list[tuple[str, str]]) -> dict:
    """64 concurrent clients over keep-alive connections. aiohttp, not httpx: on 2 cores the load generator
    shares the machine with the server, and httpx's per-request CPU cost would be charged to the server."""
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/embeddings"
    sem = asyncio.Semaphore(CONCURRENCY)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as client:
        async def one(model: str, text: str) -> float:
            async with sem:
                t = time.perf_counter()
                async with client.post(url, json={"model": model, "input": [text]}) as r:
                    r.raise_for_status()
                    await r.read()
                return time.perf_counter() - t

        await asyncio.gather(*[one(m, t) for m, t in work[:CONCURRENCY]])  # warm-up: connections, caches
        t0 = time.perf_counter()
        lat = await asyncio.gather(*[one(m, t) for m, t in work])
        return summarize(lat, time.perf_counter() - t0)


async def drive_in_process(store_dir: Path, work: list[tuple[str, str]]) -> dict:
    settings = EngineConfig(max_rank=64, host_cache_bytes=512 << 20, merge_policy="never", merge_kernel="auto",
                               device_cache_adapters=32, device_cache_bytes=256 << 20,
                               max_batch_size=32, max_wait_ms=5.0)
    store = local_store(store_dir)
    engine = Engine(load_base_model(None, "cpu", "float32"), settings, store)
    await engine.start()
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(model: str, text: str) -> float:
        async with sem:
            t = time.perf_counter()
            await engine.embed(model, [text])
            return time.perf_counter() - t

    await asyncio.gather(*[one(m, t) for m, t in work[:CONCURRENCY]])
    t0 = time.perf_counter()
    lat = await asyncio.gather(*[one(m, t) for m, t in work])
    result = summarize(lat, time.perf_counter() - t0)
    await engine.stop()
    store.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=640)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    store = Path(tempfile.mkdtemp()) / "store"
    work = workload(args.requests)
    port = free_port()
    proc = start_server(store, port)
    results: dict = {"machine": machine_info("cpu"), "concurrency": CONCURRENCY, "adapters": N_ADAPTERS}
    try:
        model = load_base_model(None, "cpu", "float32").model
        with httpx.Client(timeout=60) as client:
            for i in range(N_ADAPTERS):
                cfg, st = make_adapter(model, i)
                files = {"adapter_config.json": ("adapter_config.json", cfg),
                         "adapter_model.safetensors": ("adapter_model.safetensors", st)}
                client.put(f"http://127.0.0.1:{port}/v1/adapters/task-{i:03d}", files=files).raise_for_status()
        results["http_batched"] = asyncio.run(drive_http(port, work))
    finally:
        proc.terminate()
        proc.wait(30)
    naive = start_server(store, port, "--max-batch-size", "1")
    try:
        results["http_naive_one_forward_per_request"] = asyncio.run(drive_http(port, work))
    finally:
        naive.terminate()
        naive.wait(30)
    results["in_process_batched"] = asyncio.run(drive_in_process(store, work))
    ratio = results["http_batched"]["throughput_rps"] / results["in_process_batched"]["throughput_rps"]
    results["http_over_in_process"] = ratio
    print(f"machine: {results['machine']}")
    print("| setup | req/s | p50 ms | p99 ms |\n|---|---|---|---|")
    for key in ("in_process_batched", "http_batched", "http_naive_one_forward_per_request"):
        r = results[key]
        print(f"| {key} | {r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
    print(f"HTTP throughput = {100 * ratio:.0f}% of in-process")
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
