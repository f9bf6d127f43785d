"""Continuous against static batching of generation, in one run, on the same engine and the same requests.

A GPT-2-style causal LM (6 layers, 384 wide, random init, with a BPE tokenizer trained here: nothing is
downloaded) serves 4 rank-8 adapters and the base. Requests arrive at random (Poisson) times, each
naming a random adapter and asking for 8 to 128 tokens, and are streamed:

  continuous   the engine as it ships: a request joins the running decode at its next step
  static       the same engine with KV splicing disabled (its fallback): a request that arrives while a
               decode runs waits for that decode to end, and finished rows ride along, as before

Reported per mode: wall time, generated tokens per second, time to first token and end-to-end latency
(p50, p99), and the latency of the short requests (<= 16 tokens). Also checked: every request gets the
same tokens in both modes (seeded sampling).

Usage: python benchmarks/bench_generation.py [--requests 48] [--mean-gap-ms 40] [--rounds 2] [--out gen.json]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import adapters as A  # noqa: E402
from benchmarks.common import MemoryStore, machine_info, markdown_table, write_json  # noqa: E402
from service.engine import CompletionRequest, Engine, load_base_model  # noqa: E402
from service.engine import decoding as decoding_module  # noqa: E402
from service.engine.config import EngineConfig  # noqa: E402

WORDS = ("the adapter model serves many small tasks while one frozen base stays on the device and every request "
         "names its own low rank update so batches mix them freely").split()


def build_model(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(0)
    tok.train_from_iterator([" ".join(rng.choices(WORDS, k=20)) for _ in range(2000)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=fast.vocab_size, n_embd=384, n_layer=6, n_head=6, n_positions=512,
                        bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def gpt2_adapters(model: torch.nn.Module, n: int) -> dict[str, A.LoraWeights]:
    """n random rank-8 adapters on c_attn and c_proj, named a0, a1, ..."""
    items = {}
    for i in range(n):
        gen = torch.Generator().manual_seed(i)
        lora = {}
        for name, module in model.named_modules():
            if name.endswith(("c_attn", "c_proj")):
                fan_in, fan_out = module.weight.shape  # Conv1D: (in, out)
                lora[name] = (torch.randn(8, fan_in, generator=gen) * 0.05,
                              torch.randn(fan_out, 8, generator=gen) * 0.05)
        config = A.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
        items[f"a{i}"] = A.LoraWeights(config, lora)
    return items


def workload(n: int, mean_gap_ms: float, seed: int = 0) -> list[tuple[float, dict]]:
    rng = random.Random(seed)
    arrival, work = 0.0, []
    for i in range(n):
        arrival += rng.expovariate(1000 / mean_gap_ms)
        request = dict(model=rng.choice(["a0", "a1", "a2", "a3", "base"]),
                       prompt=" ".join(rng.choices(WORDS, k=rng.randint(4, 24))),
                       max_tokens=rng.choice([8, 16, 32, 64, 128]), temperature=0.8, seed=i)
        work.append((arrival, request))
    return work


async def drive(engine: Engine, work: list[tuple[float, dict]]) -> dict:
    start = time.perf_counter()

    async def one(at: float, request: dict) -> dict:
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
        sent = time.perf_counter()
        first, tokens = None, []
        async for chunk in engine.stream(CompletionRequest(**request, stream=True)):
            if first is None and chunk.tokens:
                first = time.perf_counter()
            tokens += chunk.tokens
        done = time.perf_counter()
        return {"ttft": (first or done) - sent, "latency": done - sent, "tokens": tokens,
                "max_tokens": request["max_tokens"]}

    rows = await asyncio.gather(*(one(at, r) for at, r in work))
    return {"wall": time.perf_counter() - start, "rows": rows}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(run: dict) -> dict:
    rows = run["rows"]
    lat, ttft = [r["latency"] for r in rows], [r["ttft"] for r in rows]
    short = [r["latency"] for r in rows if r["max_tokens"] <= 16]
    n_tokens = sum(len(r["tokens"]) for r in rows)
    return {"wall_s": run["wall"], "tokens": n_tokens, "tokens_per_s": n_tokens / run["wall"],
            "ttft_p50_ms": 1e3 * statistics.median(ttft), "ttft_p99_ms": 1e3 * pct(ttft, 0.99),
            "latency_p50_ms": 1e3 * statistics.median(lat), "latency_p99_ms": 1e3 * pct(lat, 0.99),
            "short_latency_p50_ms": 1e3 * statistics.median(short) if short else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--mean-gap-ms", type=float, default=40.0, help="mean time between arrivals")
    ap.add_argument("--rounds", type=int, default=2, help="each mode runs this many times, alternating")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available on this machine; skipping.")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        base = load_base_model(str(build_model(Path(tmp))), args.device, "float32")
    settings = EngineConfig(max_rank=64, host_cache_bytes=1 << 28, merge_policy="never", merge_kernel="auto",
                               device_cache_adapters=8, device_cache_bytes=1 << 28,
                               max_batch_size=args.max_batch_size, max_wait_ms=5.0)
    engine = Engine(base, settings, MemoryStore(gpt2_adapters(base.model, 4)))
    work = workload(args.requests, args.mean_gap_ms)
    splice = decoding_module._kv_layers

    async def run_all() -> dict[str, list[dict]]:
        await engine.start()
        await drive(engine, work[:4])  # warm-up: adapters resident, kernels touched
        runs: dict[str, list[dict]] = {"static": [], "continuous": []}
        for _ in range(args.rounds):
            for mode in runs:
                decoding_module._kv_layers = (lambda cache: None) if mode == "static" else splice
                runs[mode].append(await drive(engine, work))
        decoding_module._kv_layers = splice
        await engine.stop()
        return runs

    runs = asyncio.run(run_all())
    same = all([r["tokens"] for r in a["rows"]] == [r["tokens"] for r in b["rows"]]
               for a in runs["static"] + runs["continuous"] for b in runs["static"][:1])
    results = {"machine": machine_info(args.device), "args": vars(args), "same_tokens_in_both_modes": same,
               "runs": {m: [summarize(r) for r in rs] for m, rs in runs.items()}}
    rows = []
    for mode, summaries in results["runs"].items():
        for s in summaries:
            rows.append([mode, f"{s['wall_s']:.2f}", f"{s['tokens_per_s']:.0f}", f"{s['ttft_p50_ms']:.0f}",
                         f"{s['ttft_p99_ms']:.0f}", f"{s['latency_p50_ms']:.0f}", f"{s['latency_p99_ms']:.0f}",
                         f"{s['short_latency_p50_ms']:.0f}"])
    m = results["machine"]
    print(f"\n{m['cpu']}, nproc {m['nproc']}, torch threads {m['torch_threads']}, device {args.device}; "
          f"{args.requests} requests, mean gap {args.mean_gap_ms} ms, max batch {args.max_batch_size}; "
          f"same tokens in both modes: {same}\n")
    print(markdown_table(["mode", "wall s", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "latency p50 ms",
                          "latency p99 ms", "short (<=16 tok) p50 ms"], rows))
    if args.out:
        write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
