"""The shared store's costs (docs/shared-store.md): resolving a name per request, writing with name caches
listening, and loading one adapter's files cold from S3 against local disk.

Real servers on 127.0.0.1, started here (tests/infra.py): PostgreSQL 15 and SeaweedFS. Contenders are
timed interleaved (common.interleaved_times), so a noisy neighbour hits all of them alike.

    name resolution   local SQLite lookup (today's store) | PostgresIndex.get (one round trip) |
                      CachedIndex.get (warm, under a live lease)
    write             PostgresIndex.put with 0 name caches | with 2 caches listening (waits for their acks)
    cold blob load    both files of one MiniLM rank-8 adapter (~290 KiB): S3BlobStore first load (marker HEAD
                      + 2 GETs) | marker known (2 GETs) | local files (page cache warm: a local disk's best case)

Usage: python benchmarks/bench_shared_store.py [--names 1000] [--runs 2000] [--out shared.json]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from infra import PostgresServer, SeaweedS3Server, create_database  # noqa: E402

import adapters as A  # noqa: E402
from benchmarks.common import interleaved_times, machine_info, markdown_table, summary, write_json  # noqa: E402
from service.storage.interfaces import NewAdapter  # noqa: E402
from service.storage.name_cache import CachedIndex  # noqa: E402
from service.storage.postgres_index import PostgresIndex  # noqa: E402
from service.storage.s3_blobs import S3BlobStore  # noqa: E402


def minilm_adapter_files() -> dict[str, bytes]:
    shapes = {f"encoder.layer.{i}.attention.self.{m}": (384, 384) for i in range(6) for m in ("query", "value")}
    gen = torch.Generator().manual_seed(0)
    lora = {p: (torch.randn(8, i, generator=gen) * 0.02, torch.randn(o, 8, generator=gen) * 0.02)
            for p, (o, i) in shapes.items()}
    config_bytes, model_bytes = A.to_peft_bytes(A.LoraWeights(A.LoraConfig(r=8, lora_alpha=16,
                                                                           target_modules=["query", "value"]), lora))
    return {"adapter_config.json": config_bytes, "adapter_model.safetensors": model_bytes}


def local_lookup(tmp: Path, names: list[str]):
    """The embedded store's lookup (service.storage.SqliteIndex), filled with `names`."""
    from service.storage import SqliteIndex
    from service.storage.interfaces import NewAdapter

    index = SqliteIndex(tmp / "local-index.sqlite3")
    for name in names:
        index.put(NewAdapter(name=name, sha256="ab" * 32, bytes=1, rank=1, targets=["q"], num_parameters=1,
                             task_type=None), overwrite=False)
    return index


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--names", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--write-runs", type=int, default=100)
    parser.add_argument("--blob-runs", type=int, default=50)
    parser.add_argument("--out")
    args = parser.parse_args()
    names = [f"task-{i:05d}" for i in range(args.names)]
    rng = random.Random(0)
    results: dict = {"machine": machine_info(), "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp_dir, PostgresServer() as pg, \
            SeaweedS3Server(Path(tmp_dir) / "s3") as s3:
        tmp = Path(tmp_dir)
        url = create_database(pg.url)
        index = PostgresIndex(url)
        for name in names:
            index.put(NewAdapter(name=name, sha256="ab" * 32, bytes=1, rank=8, targets=["q", "v"],
                                 num_parameters=1, task_type=None), overwrite=False)
        cached = CachedIndex(PostgresIndex(url), ttl_s=3600)
        while not cached.trusted:  # the cache stores nothing until its listener holds a lease
            time.sleep(0.01)
        for name in names:
            cached.get(name)  # warm
        resolvers = {"PostgresIndex.get (uncached)": lambda: index.get(rng.choice(names)),
                     "CachedIndex.get (warm)": lambda: cached.get(rng.choice(names))}
        local = local_lookup(tmp, names)
        if local is not None:
            resolvers = {"local SQLite lookup": lambda: local.get(rng.choice(names)), **resolvers}
        times = interleaved_times(resolvers, args.runs, warmup=50)
        results["cache_stats"] = dict(cached.stats)  # misses beyond --names: gets made while the lease had lapsed

        # Writes: alone, then with two more servers' caches listening.
        writer = PostgresIndex(create_database(pg.url))
        counter = iter(range(10**9))

        def put() -> None:
            writer.put(NewAdapter(name=f"w{next(counter)}", sha256="cd" * 32, bytes=1, rank=8, targets=["q"],
                                  num_parameters=1, task_type=None), overwrite=False)

        write_times = {"put, no name cache": interleaved_times({"w": put}, args.write_runs, warmup=5)["w"]}
        listeners = [CachedIndex(PostgresIndex(writer.url), ttl_s=5) for _ in range(2)]
        while not all(c.trusted for c in listeners):
            time.sleep(0.01)
        write_times["put, 2 name caches listening"] = interleaved_times({"w": put}, args.write_runs, warmup=5)["w"]

        # Cold load of one adapter's two files.
        files = minilm_adapter_files()
        sha = "ef" * 32
        s3_options = {k: v for k, v in s3.settings.items() if k != "bucket"}
        S3BlobStore("s3://bench/blobs", **s3_options).put(sha, files)
        local_dir = tmp / "blobs" / sha[:2] / sha
        local_dir.mkdir(parents=True)
        for filename, data in files.items():
            (local_dir / filename).write_bytes(data)

        store = S3BlobStore("s3://bench/blobs", create_bucket=False, **s3_options)  # one client, as in a server

        def s3_cold() -> None:
            store._complete.clear()  # a blob this client has not seen: its marker is checked first
            assert sum(len(store.get(sha, f)) for f in files) == sum(map(len, files.values()))

        def s3_warm() -> None:  # marker known: just the 2 GETs
            assert sum(len(store.get(sha, f)) for f in files) == sum(map(len, files.values()))

        def local_read() -> None:
            assert sum(len((local_dir / f).read_bytes()) for f in files) == sum(map(len, files.values()))

        blob_times = interleaved_times({"S3, first load (marker HEAD + 2 GETs)": s3_cold,
                                        "S3, marker known (2 GETs)": s3_warm,
                                        "local files (page cache)": local_read}, args.blob_runs, warmup=3)
        store.close()
        for c in (*listeners, cached):
            c.close()
        writer.close()
        index.close()
        if local is not None:
            local.close()

    results.update(resolve=times, write=write_times, blob=blob_times, adapter_bytes=sum(map(len, files.values())))
    print(f"machine: {results['machine']}\nname cache: {results['cache_stats']}\n")
    for title, table in (("name resolution, per get", times), ("index write", write_times),
                         (f"cold load of one adapter ({results['adapter_bytes']:,} bytes)", blob_times)):
        rows = [[name, f"{summary(s)['median_ms'] * 1e3:.0f}", f"{sorted(s)[int(0.99 * len(s))] * 1e6:.0f}",
                 summary(s)["runs"]] for name, s in table.items()]
        print(f"### {title}\n\n" + markdown_table(["contender", "median µs", "p99 µs", "runs"], rows) + "\n")
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
