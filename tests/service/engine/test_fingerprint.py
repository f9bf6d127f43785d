"""service/engine/fingerprint.py and Engine.state(): fingerprints are hashed only on request, in a worker thread
under the engine lock, the pristine one once; their values are those of the bare model's weights."""

from __future__ import annotations

import asyncio
import hashlib
import threading

import pytest
from torch import nn

import service.engine.weights as engine_module
from adapters.layer import conv1d_type
from service.engine import Engine, load_base_model
from tests.service.engine.conftest import DictStore, random_adapter, settings


def _engine(model_dir) -> Engine:
    base = load_base_model(str(model_dir), "cpu", "float32")
    store = DictStore()
    for i in range(2):
        store.items[f"a{i}"] = random_adapter(base.model, ["query", "value", "dense"], seed=i)
    return Engine(base, settings(), store)


def _reference(model: nn.Module) -> str:
    """The digest spelled out independently: every Linear/Conv1D weight of the bare model, name then bytes."""
    h = hashlib.sha256()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, conv1d_type())):
            h.update(name.encode())
            h.update(module.weight.detach().numpy().tobytes())
    return h.hexdigest()


class Spy:
    """Wraps fingerprint(): records, per call, the thread it ran on, whether another thread could take the
    engine lock meanwhile, and which fingerprint it was."""

    def __init__(self, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.engine, self.calls = engine, []
        self._real = engine_module.fingerprint
        monkeypatch.setattr(engine_module, "fingerprint", self)

    def _lock_is_free(self) -> bool:
        free: list[bool] = []

        def probe() -> None:
            free.append(self.engine.weights.lock.acquire(blocking=False))
            if free[0]:
                self.engine.weights.lock.release()

        t = threading.Thread(target=probe)
        t.start()
        t.join()
        return free[0]

    def __call__(self, lm, *, pristine: bool = False) -> str:
        self.calls.append({"thread": threading.current_thread(), "lock_free": self._lock_is_free(),
                           "pristine": pristine})
        return self._real(lm, pristine=pristine)


def test_merge_unmerge_and_plain_state_hash_nothing(bert_dir, monkeypatch):
    engine = _engine(bert_dir)
    spy = Spy(engine, monkeypatch)

    async def main():
        await engine.start()
        answers = [await engine.merge("a0"), await engine.merge("a1"), await engine.state(fingerprints=False),
                   await engine.unmerge()]
        await engine.stop()
        return answers

    answers = asyncio.run(main())
    assert spy.calls == []
    assert [a["merged_adapter"] for a in answers] == ["a0", "a1", "a1", None]
    assert all(a["fingerprint"] is None and a["pristine_fingerprint"] is None for a in answers)


def test_hashing_runs_in_a_worker_thread_holding_the_engine_lock(bert_dir, monkeypatch):
    engine = _engine(bert_dir)
    spy = Spy(engine, monkeypatch)

    async def main():
        await engine.start()
        await engine.merge("a0")
        state = await engine.state(fingerprints=True)
        threads = engine.scheduler.thread, threading.current_thread()  # the loop thread, the event loop's
        await engine.stop()
        return state, threads

    state, (loop_thread, event_loop_thread) = asyncio.run(main())
    assert len(spy.calls) == 2  # the current weights and, the first time, the pristine ones
    for call in spy.calls:
        assert call["thread"] not in (loop_thread, event_loop_thread)
        assert not call["lock_free"]  # no forward or weight change can run mid-hash
    assert state["merged_adapter"] == "a0" and state["fingerprint"] != state["pristine_fingerprint"]


def test_the_pristine_fingerprint_is_hashed_once(bert_dir, monkeypatch):
    engine = _engine(bert_dir)
    spy = Spy(engine, monkeypatch)

    async def main():
        await engine.start()
        states = list(await asyncio.gather(*[engine.state(fingerprints=True) for _ in range(3)]))  # concurrent
        await engine.merge("a1")
        states.append(await engine.state(fingerprints=True))
        await engine.unmerge()
        states.append(await engine.state(fingerprints=True))
        await engine.stop()
        return states

    states = asyncio.run(main())
    assert sum(call["pristine"] for call in spy.calls) == 1
    assert sum(not call["pristine"] for call in spy.calls) == len(states)  # the current weights: every time
    assert len({s["pristine_fingerprint"] for s in states}) == 1
    assert states[3]["fingerprint"] != states[3]["pristine_fingerprint"]  # merged
    assert states[4]["fingerprint"] == states[4]["pristine_fingerprint"]  # unmerged: restored bit for bit


def test_digests_are_those_of_the_bare_model(bert_dir):
    """Same values as before the fingerprint read through LoraModel: names of the bare model, and every
    Linear weight of the base, wrapped by an adapter (query, value, dense) or not (key, the pooler's ...)."""
    engine = _engine(bert_dir)
    bare = _reference(engine.base.model)

    async def main():
        await engine.start()
        await engine.embed("a0", ["hello"])  # a0 resident: its layers are wrapped
        resident = await engine.state(fingerprints=True)
        await engine.merge("a0")
        merged = await engine.state(fingerprints=True)
        await engine.unmerge()
        await engine.embed("a1", ["hello"])
        after = await engine.state(fingerprints=True)
        await engine.stop()
        return resident, merged, after

    resident, merged, after = asyncio.run(main())
    assert resident["fingerprint"] == resident["pristine_fingerprint"] == bare
    assert merged["pristine_fingerprint"] == bare != merged["fingerprint"]
    assert after["fingerprint"] == after["pristine_fingerprint"] == bare
