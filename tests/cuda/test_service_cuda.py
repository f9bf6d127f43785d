"""The service on the GPU, end to end in-process: create_app(device=cuda) with a tiny GPT-2, upload, mixed
inference, merge and unmerge with the fingerprints; and the device cache's byte bound, measured on the device."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from cuda_sync import sync
from fastapi.testclient import TestClient
from http_testkit import ADMIN_KEY, GPT2_TARGETS, bearer, build_gpt2, make_adapter, make_settings, peft_files

from benchmarks.common import MemoryStore
from benchmarks.gpu.models import byte_tokenizer, engine_settings, llama, loaded_base, random_adapter
from service.app import create_app
from service.engine import CompletionRequest, Engine


def _complete(client: TestClient, model: str) -> str:
    r = client.post("/v1/completions", json={"model": model, "prompt": "hello world", "max_tokens": 6,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _state(client: TestClient) -> dict:
    # Fingerprints cost a hash of every targeted weight, so /v1/state computes them only when asked.
    r = client.get("/v1/state", params={"fingerprints": "true"})
    assert r.status_code == 200, r.text
    return r.json()


def test_service_end_to_end(device: str, tmp_path: Path) -> None:
    settings = make_settings(build_gpt2(tmp_path / "gpt2"), tmp_path / "store", device=device, max_wait_ms=5.0)
    with TestClient(create_app(settings), headers=bearer(ADMIN_KEY)) as client:
        base = client.app.state.base
        assert base.device.type == torch.device(device).type
        assert all(p.device.type == base.device.type for p in base.model.parameters())
        for i, name in enumerate(("ga", "gb")):
            weights = make_adapter(GPT2_TARGETS, seed=i, fan_in_fan_out=True)
            assert client.put(f"/v1/adapters/{name}", files=peft_files(weights)).status_code == 201

        models = ["ga", "gb", "base", "ga", "base", "gb"]
        alone = {m: _complete(client, m) for m in set(models)}
        assert len(set(alone.values())) > 1, "the adapters change nothing"
        with ThreadPoolExecutor(len(models)) as pool:  # concurrent requests: the engine batches them together
            mixed = list(pool.map(lambda m: _complete(client, m), models))
        assert mixed == [alone[m] for m in models]

        pristine = _state(client)
        assert pristine["fingerprint"] == pristine["pristine_fingerprint"]
        if base.device.type == "cuda":
            assert pristine["merge_kernel"] == "addmm"  # the C kernel is CPU-only
        merged = client.post("/v1/adapters/ga/merge")
        assert merged.status_code == 200, merged.text
        state = _state(client)
        assert state["merged_adapter"] == "ga" and state["fingerprint"] != state["pristine_fingerprint"]
        assert state["pristine_fingerprint"] == pristine["fingerprint"]
        assert _complete(client, "ga") == alone["ga"]  # merged serves the same greedy tokens as unmerged
        with ThreadPoolExecutor(3) as pool:  # base and gb rows beside the merged ga: its branch is subtracted
            assert list(pool.map(lambda m: _complete(client, m), ["gb", "base", "ga"])) == [
                alone["gb"], alone["base"], alone["ga"]]
        assert client.post("/v1/unmerge").status_code == 200
        after = _state(client)
        assert after["merged_adapter"] is None
        assert after["fingerprint"] == after["pristine_fingerprint"] == pristine["fingerprint"]


def _adapter_device_bytes(engine: Engine, device: str, baseline: int) -> int:
    """Device bytes held beyond the bare base: measured by the allocator on CUDA; on the CPU (rehearsal), the bytes
    of the tensors the LoRA layers hold (A, B and the stacked mixed-batch tables)."""
    if device.startswith("cuda"):
        sync(device)
        return torch.cuda.memory_allocated(device) - baseline
    total = 0
    for layer in engine.weights.lm.lora_layers().values():
        total += sum(t.numel() * t.element_size() for pair in layer._ab.values() for t in pair)
        if layer._stack_cache is not None:
            total += sum(t.numel() * t.element_size() for t in layer._stack_cache[1:])
    return total


def _drop_tables(engine: Engine) -> None:
    for layer in engine.weights.lm.lora_layers().values():
        layer.mark_merged(layer.merged_adapter)  # clears the stacked tables; rebuilt at the next mixed forward


def test_device_cache_bound_in_bytes(device: str) -> None:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tok = byte_tokenizer(512)
    model = llama("tiny", device, dtype, vocab_size=len(tok))
    items = {f"c{i}": random_adapter(model, rank=8, seed=i).to(dtype=dtype) for i in range(6)}
    one = items["c0"].nbytes()
    bound = int(2.5 * one)  # room for two adapters, not three
    engine = Engine(loaded_base(model, tok, device, dtype), engine_settings(device_cache_bytes=bound),
                    MemoryStore(items))

    async def run() -> tuple[list[int], list[int], list[int], int]:
        await engine.start()
        try:
            await engine.complete(CompletionRequest(model="base", prompt="the adapter", max_tokens=2))
            with engine.weights.lock:  # the loop thread frees the finished decode's cache before it lets go of the lock
                baseline = _adapter_device_bytes(engine, device, 0) if device.startswith("cuda") else 0
            accounted, params_only, with_tables = [], [], []
            for name in items:
                await engine.complete(CompletionRequest(model=name, prompt="the adapter", max_tokens=2))
                with engine.weights.lock:
                    accounted.append(sum(b for _, b in engine.weights.tiers.resident.values()))
                    with_tables.append(_adapter_device_bytes(engine, device, baseline))
                    _drop_tables(engine)
                    params_only.append(_adapter_device_bytes(engine, device, baseline))
            for name in items:
                engine.forget(name)
            await engine.complete(CompletionRequest(model="base", prompt="the adapter", max_tokens=2))
            with engine.weights.lock:
                left = _adapter_device_bytes(engine, device, baseline)
            return accounted, params_only, with_tables, left
        finally:
            await engine.stop()

    accounted, params_only, with_tables, left = asyncio.run(run())
    assert max(accounted) <= bound and len(engine.weights.tiers.resident) <= 2
    # The adapters' own A and B on the device stay within the bound, as the allocator sees it.
    assert max(params_only) <= bound, (params_only, bound)
    # The stacked tables of a mixed forward (one slot per resident adapter, plus the base's empty slot) are a second,
    # padded copy, outside the bound: at most one more bound plus one adapter.
    assert max(with_tables) <= 2 * bound + one, (with_tables, bound)
    # Everything is given back once the adapters are gone (no leak through caches or tables); a few small tensors
    # (routing ids, a step's tokens) may come and go with the allocator's rounding.
    assert left < one // 4, (left, one)
