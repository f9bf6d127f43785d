"""Cluster mode on one machine, in one run:

  1. cold adapter loads per 1,000 requests, throughput and p50/p99 latency for three routings of the same
     2-replica cluster (`affinity`: ours; `spread`: no multiplexed id, placement ignores the adapter;
     `multiplex`: Ray's default multiplexed router) and for one single server (`lora-serve`, no Ray);
     200 stored rank-8 adapters on the packaged MiniLM, requests Zipf-distributed (s = 1.1), each replica's
     device cache 16 adapters (`--slots`; --device-cache-adapters) evicting by use counts (`--evictions`:
     `frequency,lru` measures the three routings under each, in the same run);
  2. a hot adapter with 60% of the traffic: how many of its requests each replica served (affinity, and
     Ray's default for comparison);
  3. 100 overwrites of one adapter under load: answers older than the version current when the request
     was sent are counted as stale (must be 0);
  4. a replica killed with SIGKILL under load: failed requests (at most those in flight), and the time until
     the replacement serves and 1-s throughput is back to 90% of what it was before.

`--cold-only` measures part 1's cluster routings only. benchmarks/sim_cold_loads.py gives the bound that
placement and eviction allow on this workload. Everything listens on 127.0.0.1. Usage:
python benchmarks/bench_cluster.py [--requests 1000] [--slots 16] [--evictions frequency,lru] [--cold-only]
                                   [--spill-at 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import adapters as A  # noqa: E402
from benchmarks.bench_http import free_port, start_server  # noqa: E402
from benchmarks.common import machine_info, markdown_table, write_json  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.storage import canonicalize, local_store  # noqa: E402

N_ADAPTERS, ZIPF_S, CONCURRENCY = 200, 1.1, 16
WORDS = "the quick brown fox jumps over a lazy dog while small adapters serve many tasks at once".split()
MINILM = {f"encoder.layer.{i}.attention.self.{m}": 384 for i in range(6) for m in ("query", "value")}


def adapter_bytes(seed: int) -> tuple[bytes, bytes]:
    import torch

    g = torch.Generator().manual_seed(seed)
    lora = {path: (torch.randn(8, d, generator=g) * 0.05, torch.randn(d, 8, generator=g) * 0.05)
            for path, d in MINILM.items()}
    return A.to_peft_bytes(A.LoraWeights(A.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]), lora))


def populate(store_dir: Path) -> None:
    store = local_store(store_dir)
    for i in range(N_ADAPTERS):
        store.put(f"task-{i:03d}", canonicalize(A.weights_from_bytes(*adapter_bytes(i))))
    store.close()


def zipf_work(n: int, seed: int, hot: float = 0.0) -> list[tuple[str, str]]:
    """(model, text) pairs: adapter rank k drawn with p ∝ 1/k^s; with `hot`, that share goes to task-000."""
    rng = random.Random(seed)
    names = [f"task-{i:03d}" for i in range(N_ADAPTERS)]
    weights = [1 / (k + 1) ** ZIPF_S for k in range(N_ADAPTERS)]
    work = []
    for _ in range(n):
        name = "task-000" if rng.random() < hot else rng.choices(names[1:] if hot else names, weights[1:] if hot
                                                                   else weights)[0]
        work.append((name, " ".join(rng.choices(WORDS, k=12))))
    return work


async def drive(port: int, work: list[tuple[str, str]], concurrency: int = CONCURRENCY,
                log: list | None = None, until: float | None = None) -> dict:
    """Closed loop: `concurrency` clients over keep-alive connections (aiohttp: light on the shared CPUs),
    until `work` is done or the perf_counter deadline `until` has passed."""
    import aiohttp

    url, queue = f"http://127.0.0.1:{port}/v1/embeddings", list(reversed(work))
    latencies, errors = [], []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                     timeout=aiohttp.ClientTimeout(total=120)) as client:
        async def worker() -> None:
            while queue and (until is None or time.perf_counter() < until):
                model, text = queue.pop()
                t = time.perf_counter()
                async with client.post(url, json={"model": model, "input": [text]}) as r:
                    body = await r.json()
                done = time.perf_counter()
                if log is not None:
                    log.append((done, r.status))
                if r.status == 200:
                    latencies.append(done - t)
                else:
                    errors.append((r.status, body))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies) or [0.0]
    return {"requests": len(latencies) + len(errors), "errors": len(errors), "error_samples": errors[:3],
            "wall_s": round(wall, 2),
            "throughput_rps": round(len(latencies) / wall, 1), "p50_ms": round(1e3 * statistics.median(lat), 1),
            "p99_ms": round(1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1)}


def state(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/v1/state", timeout=30).json()


def cold_loads(port: int, single: bool) -> int:
    if single:  # a single server: its /metrics
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith('lora_adapter_loads_total{tier="device"}')))
    return sum(r.get("cold_loads", 0) for r in state(port)["replicas"])


def measure(port: int, n: int, single: bool = False) -> dict:
    asyncio.run(drive(port, zipf_work(300, seed=1)))  # warm-up: every cache reaches its steady state
    before = cold_loads(port, single)
    result = asyncio.run(drive(port, zipf_work(n, seed=2)))
    result["cold_loads_per_1000"] = round(1000 * (cold_loads(port, single) - before) / n, 1)
    if not single:
        result["served_per_replica"] = [r["requests_served"] for r in state(port)["replicas"]]
    return result


def hot_adapter(port: int, n: int) -> dict:
    def hot_counts() -> dict[str, int]:
        return {r["replica"]: sum(v for k, v in r["busiest_adapters"].items() if k.startswith("task-000@"))
                for r in state(port)["replicas"]}

    before = hot_counts()
    result = asyncio.run(drive(port, zipf_work(n, seed=3, hot=0.6)))
    after = hot_counts()
    result["hot_served_per_replica"] = [after[r] - before.get(r, 0) for r in after]
    result["merged_per_replica"] = [r["merged_adapter"] for r in state(port)["replicas"]]
    return result


def overwrites(port: int, count: int = 100, seeds: int = 4) -> dict:
    """`count` overwrites of `ow` while 8 clients embed it; an answer must come from a version at least as
    new as the one current when its request was sent."""
    base, text = f"http://127.0.0.1:{port}", "my printer is on fire"
    files = {s: adapter_bytes(1000 + s) for s in range(seeds)}

    def put(name: str, seed: int, overwrite: bool) -> None:
        config, model = files[seed]
        r = httpx.put(f"{base}/v1/adapters/{name}", params={"overwrite": overwrite}, timeout=60,
                      files={"adapter_config.json": ("adapter_config.json", config),
                             "adapter_model.safetensors": ("adapter_model.safetensors", model)})
        r.raise_for_status()

    refs = {}
    for s in range(seeds):
        put(f"ref-{s}", s, True)
        refs[s] = httpx.post(f"{base}/v1/embeddings", json={"model": f"ref-{s}", "input": [text]},
                             timeout=60).json()["data"][0]["embedding"]
    put("ow", 0, True)
    current, records, stop = [0], [], [False]

    async def reader(client: httpx.AsyncClient) -> None:
        while not stop[0]:
            sent = current[0]
            r = await client.post("/v1/embeddings", json={"model": "ow", "input": [text]})
            records.append((sent, current[0], r.status_code, r.json()["data"][0]["embedding"]
                            if r.status_code == 200 else None))

    async def run() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            readers = [asyncio.create_task(reader(client)) for _ in range(8)]
            for i in range(1, count + 1):
                await asyncio.to_thread(put, "ow", i % seeds, True)
                current[0] = i
            stop[0] = True
            await asyncio.gather(*readers)

    asyncio.run(run())

    def matches(vec: list[float], version: int) -> bool:
        return max(abs(a - b) for a, b in zip(vec, refs[version % seeds], strict=True)) < 1e-5

    stale = sum(1 for sent, recv, status, vec in records
                if status == 200 and not any(matches(vec, v) for v in range(sent, recv + 1)))
    return {"overwrites": count, "requests": len(records), "stale": stale,
            "errors": sum(1 for r in records if r[2] != 200)}


def kill_under_load(port: int, seconds: float = 50.0, kill_at: float = 8.0) -> dict:
    victim = state(port)["replicas"][0]
    log: list[tuple[float, int]] = []
    work = zipf_work(100_000, seed=4)
    t0 = time.perf_counter()
    killed, replaced = [0.0], [None]

    async def chaos() -> None:
        await asyncio.sleep(kill_at)
        killed[0] = time.perf_counter()
        os.kill(victim["pid"], signal.SIGKILL)
        while replaced[0] is None and time.perf_counter() - killed[0] < 120:
            await asyncio.sleep(0.5)
            replicas = await asyncio.to_thread(state, port)
            fresh = [r for r in replicas["replicas"] if "error" not in r and r["replica"] != victim["replica"]]
            if len(fresh) == 2:
                replaced[0] = time.perf_counter()

    async def run() -> dict:
        load = asyncio.create_task(drive(port, work, log=log, until=t0 + seconds))
        await chaos()
        return await load

    result = asyncio.run(run())
    buckets: dict[int, int] = {}
    for done, status in log:
        if status == 200:
            buckets[int(done - t0)] = buckets.get(int(done - t0), 0) + 1
    k = int(killed[0] - t0)
    before = statistics.mean(buckets.get(s, 0) for s in range(2, k))
    back = next((s for s in range(k + 1, int(seconds)) if buckets.get(s, 0) >= 0.9 * before
                 and s >= (replaced[0] or 1e9) - t0), None)
    return {"in_flight_bound": CONCURRENCY, "failed": result["errors"], "error_samples": result["error_samples"],
            "replacement_up_after_s": round(replaced[0] - killed[0], 1) if replaced[0] else None,
            "full_throughput_after_s": (back - k) if back is not None else None,
            "rps_before": round(before, 1), "rps_per_second": [buckets.get(s, 0) for s in range(int(seconds))]}


def run_cluster(store: Path, port: int, n: int, slots: int, evictions: list[str], cold_only: bool,
                spill_at: int = 8) -> dict:
    """Part 1 for each router under each eviction order (keyed `router`, or `router/eviction` beyond the first),
    then, under the first eviction order, parts 2-4 unless `cold_only`."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from service.cluster.launch import APP_NAME, absolute, deploy, start_ray

    out: dict[str, Any] = {}
    base = Settings(store=store, port=port, replicas=2, device="cpu", device_cache_adapters=slots,
                    replica_num_cpus=1.0, cluster_request_timeout_s=60, spill_at=spill_at)
    started = start_ray(absolute(base))
    try:
        for eviction, router in ((e, r) for e in evictions for r in ("spread", "multiplex", "affinity")):
            name = router if eviction == evictions[0] else f"{router}/{eviction}"
            settings = absolute(base.model_copy(update={"cluster_router": router, "device_cache_eviction": eviction}))
            t = time.perf_counter()
            deploy(settings)
            print(f"[{name}] deployed in {time.perf_counter() - t:.0f} s", flush=True)
            out[name] = measure(port, n)
            out[name]["routing"] = state(port).get("routing")
            print(f"[{name}] {out[name]}", flush=True)
            if cold_only or name != router:
                serve.delete(APP_NAME)
                continue
            if router in ("multiplex", "affinity"):
                out[f"hot_adapter_{router}"] = hot_adapter(port, n)
                print(f"[hot {router}] {out[f'hot_adapter_{router}']}", flush=True)
            if router == "affinity":
                out["overwrites"] = overwrites(port)
                print(f"[overwrites] {out['overwrites']}", flush=True)
                out["kill"] = kill_under_load(port)
                print(f"[kill] {out['kill']}", flush=True)
            serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
    return out


def run_single(store: Path, port: int, n: int, slots: int, eviction: str, threads: int | None = None) -> dict:
    """`threads`: --torch-threads (default: torch's, one per core; Ray gives each replica its num_cpus, here 1)."""
    proc = start_server(store, port, "--device", "cpu", "--device-cache-adapters", str(slots),
                        "--device-cache-eviction", eviction, *(["--torch-threads", str(threads)] if threads else []),
                        merge_policy="auto")
    try:
        return measure(port, n, single=True)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--slots", type=int, default=16, help="each replica's device cache, in adapters")
    ap.add_argument("--evictions", default="frequency", help="device-cache eviction orders to measure, comma-separated")
    ap.add_argument("--cold-only", action="store_true", help="part 1's cluster routings only")
    ap.add_argument("--spill-at", type=int, default=8, help="the affinity router's --spill-at")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    evictions = args.evictions.split(",")
    machine = machine_info("cpu")
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        store = Path(tmp) / "store"
        populate(store)
        results = run_cluster(store, free_port(), args.requests, args.slots, evictions, args.cold_only, args.spill_at)
        if not args.cold_only:
            results["single"] = run_single(store, free_port(), args.requests, args.slots, evictions[0])
            results["single_1_thread"] = run_single(store, free_port(), args.requests, args.slots, evictions[0],
                                                    threads=1)
    measured = [k for k in results if "cold_loads_per_1000" in results[k]]
    rows = [[name, results[name]["cold_loads_per_1000"], results[name]["throughput_rps"], results[name]["p50_ms"],
             results[name]["p99_ms"], results[name]["errors"]] for name in measured]
    print(markdown_table(["routing", "cold loads / 1000 req", "req/s", "p50 ms", "p99 ms", "errors"], rows))
    print({k: results[k] for k in ("hot_adapter_multiplex", "hot_adapter_affinity", "overwrites", "kill")
           if k in results})
    print(machine)
    if args.json:
        write_json(args.json, {"machine": machine, "concurrency": CONCURRENCY, "adapters": N_ADAPTERS,
                               "zipf_s": ZIPF_S, "device_cache_adapters": args.slots, "evictions": evictions,
                               "spill_at": args.spill_at,
                               **results})


if __name__ == "__main__":
    main()
