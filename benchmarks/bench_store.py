"""10,000 adapters in the store: listing a page and looking one up over HTTP, and memory staying
within the configured cache bounds while requests touch hundreds of distinct adapters.

The store is filled through `AdapterStore.put` (the same durable path an upload takes: temp file, fsync,
rename, sqlite index), then the real server runs on it on 127.0.0.1 with small cache bounds.
Usage: python benchmarks/bench_store.py [--adapters 10000] [--touch 300]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import adapters as A  # noqa: E402
from benchmarks.bench_http import free_port, start_server  # noqa: E402
from benchmarks.common import machine_info, write_json  # noqa: E402
from service.storage import canonicalize, local_store  # noqa: E402

HOST_CACHE = 4 << 20  # bytes
DEVICE_CACHE = 8  # adapters


def fill(store_dir: Path, n: int) -> float:
    """n distinct rank-8 adapters on the query/value layers of MiniLM (98 KiB each, fp32)."""
    store = local_store(store_dir)
    t0 = time.perf_counter()
    shapes = {f"encoder.layer.{i}.attention.self.{m}": (384, 384) for i in range(6) for m in ("query", "value")}
    for k in range(n):
        gen = torch.Generator().manual_seed(k)
        lora = {p: (torch.randn(8, i, generator=gen) * 0.02, torch.randn(o, 8, generator=gen) * 0.02)
                for p, (o, i) in shapes.items()}
        weights = A.LoraWeights(A.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]), lora)
        store.put(f"task-{k:05d}", canonicalize(weights))
    store.close()
    return time.perf_counter() - t0


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def timed(client: httpx.Client, urls: list[str]) -> dict:
    lat = []
    for url in urls:
        t = time.perf_counter()
        client.get(url).raise_for_status()
        lat.append(time.perf_counter() - t)
    lat.sort()
    return {"p50_ms": 1e3 * statistics.median(lat), "p99_ms": 1e3 * lat[int(0.99 * (len(lat) - 1))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=10_000)
    ap.add_argument("--touch", type=int, default=300, help="requests per round, each for a random adapter")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    store = Path(tempfile.mkdtemp()) / "store"
    fill_s = fill(store, args.adapters)
    port = free_port()
    proc = start_server(store, port, "--host-cache-bytes", str(HOST_CACHE), "--device-cache-adapters",
                        str(DEVICE_CACHE))
    base = f"http://127.0.0.1:{port}"
    rng = random.Random(0)
    result: dict = {"machine": machine_info("cpu"), "adapters": args.adapters, "fill_seconds": fill_s}
    try:
        with httpx.Client(timeout=60) as client:
            names = [f"task-{rng.randrange(args.adapters):05d}" for _ in range(200)]
            result["list_page_100"] = timed(client, [f"{base}/v1/adapters?limit=100&after={n}" for n in names])
            result["lookup_one"] = timed(client, [f"{base}/v1/adapters/{n}" for n in names])
            for _ in range(20):  # warm the forward path (allocator, tokenizer) on the base first
                client.post(f"{base}/v1/embeddings", json={"model": "base", "input": ["a short text"]})
            result["rss_before_bytes"] = rss_bytes(proc.pid)
            result["rss_per_round_bytes"] = []
            for _round in range(args.rounds):  # RSS must level off, however many distinct adapters are touched
                for _k in range(args.touch):
                    client.post(f"{base}/v1/embeddings", json={"model": f"task-{rng.randrange(args.adapters):05d}",
                                                               "input": ["a short text"]}).raise_for_status()
                result["rss_per_round_bytes"].append(rss_bytes(proc.pid))
            state = client.get(f"{base}/v1/state").json()
            result["rss_after_bytes"] = rss_bytes(proc.pid)
            result["host_cache_bytes"], result["host_cache_bound"] = state["host_cache_bytes"], HOST_CACHE
            result["resident"], result["resident_bound"] = len(state["resident_adapters"]), DEVICE_CACHE
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"machine: {result['machine']}; filled {args.adapters} adapters in {fill_s:.0f} s")
    for key in ("list_page_100", "lookup_one"):
        print(f"{key}: p50 {result[key]['p50_ms']:.2f} ms, p99 {result[key]['p99_ms']:.2f} ms")
    rounds = " -> ".join(f"{b / 2**20:.0f}" for b in [result["rss_before_bytes"], *result["rss_per_round_bytes"]])
    print(f"after {args.rounds} x {args.touch} requests over random adapters: host cache "
          f"{result['host_cache_bytes']:,} B (bound {HOST_CACHE:,}), resident {result['resident']} (bound "
          f"{DEVICE_CACHE}); RSS after warm-up, then after each round: {rounds} MiB")
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
