"""The generation section of bench_gpu.py: continuous-batched decoding through the Engine, 8 adapters plus the base
against the base alone, with the same batch of requests.

    mixed      4 requests (1 on the CPU) for each of a0..a7 and base, all sent at once, greedy, max_tokens each
    base only  the very same prompts and lengths, every one naming "base"

No stop token is served (models.loaded_base), so both modes generate exactly the same number of tokens and the
ratio of tokens/s is the ratio of the work's speed. Time to first token is from sending a request to its first
streamed token (its prefill, plus any wait for a step to end).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time

import torch

from benchmarks.common import MemoryStore
from benchmarks.gpu.models import (
    WORDS,
    byte_tokenizer,
    engine_settings,
    llama,
    loaded_base,
    random_adapter,
)
from benchmarks.gpu.timing import Deadline, Recorder
from service.engine import CompletionRequest, Engine

__all__ = ["bench_generation"]

N_ADAPTERS = 8


def _requests(models: list[str], per_model: int, max_tokens: int, seed: int = 0) -> list[CompletionRequest]:
    rng = random.Random(seed)
    return [CompletionRequest(model=m, prompt=" ".join(rng.choices(WORDS, k=rng.randint(8, 32))),
                              max_tokens=max_tokens, temperature=0.0, stream=True)
            for _ in range(per_model) for m in models]


async def _drive(engine: Engine, requests: list[CompletionRequest]) -> dict:
    """All requests at once; tokens, wall time and each request's time to first token."""
    start = time.perf_counter()

    async def one(req: CompletionRequest) -> tuple[float, int]:
        sent, first, n = time.perf_counter(), None, 0
        async for chunk in engine.stream(req):
            if first is None and chunk.tokens:
                first = time.perf_counter()
            n += len(chunk.tokens)
        return (first or time.perf_counter()) - sent, n

    rows = await asyncio.gather(*(one(r) for r in requests))
    wall = time.perf_counter() - start
    tokens = sum(n for _, n in rows)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": 1e3 * statistics.median(t for t, _ in rows), "ttft_max_ms": 1e3 * max(t for t, _ in rows)}


def bench_generation(rec: Recorder, deadline: Deadline, cfg, rank: int) -> str:
    section = f"generation llama-{cfg.llama} r{rank}"
    dtype = getattr(torch, cfg.dtype)
    tok = byte_tokenizer(2048)
    model = llama(cfg.llama, cfg.device, dtype, vocab_size=len(tok))
    items = {f"a{i}": random_adapter(model, rank, seed=i) for i in range(N_ADAPTERS)}
    engine = Engine(loaded_base(model, tok, cfg.device, dtype), engine_settings(max_batch_size=64),
                    MemoryStore(items))
    models = ["base", *items]
    mixed = _requests(models, cfg.gen_per_model, cfg.gen_tokens)
    base_only = [CompletionRequest(model="base", prompt=r.prompt, max_tokens=r.max_tokens, temperature=0.0,
                                   stream=True) for r in mixed]

    async def run() -> dict[str, list[dict]]:
        await engine.start()
        try:
            await _drive(engine, _requests(models, 1, 2))  # warm-up: every adapter resident, kernels loaded
            await _drive(engine, mixed)
            runs: dict[str, list[dict]] = {"mixed": [], "base": []}
            for i in range(cfg.gen_rounds):
                if i > 0 and deadline.passed():
                    break
                runs["mixed"].append(await _drive(engine, mixed))
                runs["base"].append(await _drive(engine, base_only))
            return runs
        finally:
            await engine.stop()

    runs = asyncio.run(run())
    tps = {mode: statistics.median(r["tokens_per_s"] for r in rs) for mode, rs in runs.items()}
    ttft = {mode: statistics.median(r["ttft_p50_ms"] for r in rs) for mode, rs in runs.items()}
    same = {r["tokens"] for rs in runs.values() for r in rs} == {len(mixed) * cfg.gen_tokens}
    batch = f"{len(mixed)} requests x {cfg.gen_tokens} tokens"
    rec.figure(section, "base alone: tokens/s", tps["base"], "tok/s", batch=batch, runs=runs["base"])
    rec.figure(section, "8 adapters + base: tokens/s", tps["mixed"], "tok/s", runs=runs["mixed"])
    ratio = tps["mixed"] / tps["base"]
    rec.figure(section, "mixed / base tokens/s", ratio, "x", ">= 0.80", ratio >= 0.80)
    rec.figure(section, "time to first token p50, mixed", ttft["mixed"], "ms")
    rec.figure(section, "time to first token p50, base alone", ttft["base"], "ms")
    rec.figure(section, "every request generated max_tokens", float(same), "bool", "== 1", same)
    return f"{batch}, {N_ADAPTERS} adapters of rank {rank} plus base, {cfg.dtype}; {len(runs['mixed'])} rounds"
