"""The engine's answers on every architecture family equal PEFT's: each request alone, all of them in one mixed
batch (several adapters and the base), requests joining a running decode, and with an adapter merged.

Decoders: greedy tokens equal, logprobs within 2e-3 (PEFT decodes each prompt alone, unpadded, without a cache;
the engine left-pads, routes rows per adapter and splices KV caches). Encoders: embeddings and class
probabilities close. Adapters are PEFT's own, rank 4 with random non-zero A and B on every linear layer.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adapters import load_peft_dir
from service.base_model import LoadedBase, load_base_model
from service.engine import CompletionRequest, Engine
from service.engine.generation import _token_text
from tests.adapters.family_models import DECODERS, Family, build
from tests.service.engine.conftest import TOKENIZER_FILES, DictStore, settings

LOGPROB_TOL = 2e-3
PROMPTS = {"a0": "the quick brown fox", "base": "hello", "a1": "adapters are small, the lazy dog", "a2": "fox jumps"}
MAX_TOKENS = 6


def _peft_adapters(base: torch.nn.Module, root: Path, names: list[str], **config) -> dict:
    """PEFT models with random non-zero A and B on every linear layer, saved under root/name; base: the bare one."""
    import warnings

    from peft import LoraConfig, get_peft_model

    models = {"base": base}
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GPT-2's Conv1D: PEFT sets fan_in_fan_out itself
            pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                               init_lora_weights=False, **config))
        with torch.no_grad():  # PEFT copies the base's classifier head: make each adapter's own, as training would
            for key, p in pm.named_parameters():
                if "modules_to_save" in key:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
        pm.save_pretrained(str(root / name))
        models[name] = pm.eval()
    return models


def _engine(model_dir: Path, root: Path, names: list[str], **config) -> tuple[Engine, dict]:
    """An engine over the checkpoint in `model_dir` holding PEFT-made adapters, and PEFT's model per name."""
    base = load_base_model(str(model_dir), "cpu", "float32")
    peft = _peft_adapters(copy.deepcopy(base.model), root, names, **config)
    store = DictStore()
    for name in names:
        store.items[name] = load_peft_dir(root / name)
    return Engine(base, settings(), store), peft


# ---------------------------------------------------------------------------------------------- decoders
@torch.inference_mode()
def _peft_greedy(model: torch.nn.Module, base: LoadedBase, prompt: str) -> tuple[list[str], list[float]]:
    ids = torch.tensor([base.tokenizer(prompt)["input_ids"]])  # (1, T)
    tokens, logprobs = [], []
    for _ in range(MAX_TOKENS):
        lp = model(input_ids=ids).logits[0, -1].float().log_softmax(-1)  # (V,)
        token = int(lp.argmax())
        if token in base.stop_ids:
            break
        tokens.append(_token_text(base.tokenizer, token))
        logprobs.append(float(lp[token]))
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)  # (1, T+1)
    return tokens, logprobs


def _request(name: str, max_tokens: int = MAX_TOKENS) -> CompletionRequest:
    return CompletionRequest(model=name, prompt=PROMPTS[name], max_tokens=max_tokens, temperature=0, logprobs=1)


def _check(results: list, want: dict, phase: str) -> None:
    for name, result in zip(PROMPTS, results, strict=True):
        tokens, logprobs = want[name]
        assert result.choice.tokens == tokens, f"{phase}: {name}'s tokens differ from PEFT's"
        assert result.choice.token_logprobs == pytest.approx(logprobs, abs=LOGPROB_TOL), f"{phase}: {name}"


def _no_fallback(caplog: pytest.LogCaptureFixture) -> None:
    """Every batch ran as one forward: the engine answers a failed batch by rerunning it one request at a
    time (right answers, but a fault that costs a forward per request), and logs that it did."""
    failures = [r.getMessage() for r in caplog.records if r.name.startswith("service.engine") and
                r.levelno >= logging.WARNING]
    assert not failures, failures


def _watch_joins(engine: Engine, newcomers: int) -> list[bool]:
    """Wrap the model's forward: at the first decode step, wait (on the loop thread) until `newcomers`
    requests are queued, so that they arrive while a decode runs; record whether a prefill then joined it."""
    model, forward, joined = engine.base.model, engine.base.model.forward, []

    def watched(*args, **kwargs):
        ids = kwargs["input_ids"]  # (B, T)
        if ids.shape[1] > 1:  # a prefill: does it join running rows?
            joined.append(engine.scheduler.decoder.running() > 0)
        elif len(joined) == 1:  # the first step of the first request alone
            deadline = time.monotonic() + 10
            while engine.scheduler.queue.qsize() < newcomers and time.monotonic() < deadline:
                time.sleep(0.001)
            joined.append(False)  # only once
        return forward(*args, **kwargs)

    model.forward = functools.wraps(forward)(watched)
    return joined


@pytest.fixture(scope="module")
def tokenizer(gpt2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gpt2_dir))


@pytest.mark.parametrize("family", DECODERS, ids=[f.name for f in DECODERS])
def test_decoder_answers_equal_peft_alone_mixed_staggered_and_merged(family: Family, tokenizer, tmp_path, caplog):
    build(family, len(tokenizer), tokenizer.eos_token_id).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    engine, peft = _engine(tmp_path / "model", tmp_path, ["a0", "a1", "a2"])
    want = {name: _peft_greedy(peft[name], engine.base, prompt) for name, prompt in PROMPTS.items()}
    unadapted = _peft_greedy(peft["base"], engine.base, PROMPTS["a0"])[1]
    assert want["a0"][1] != pytest.approx(unadapted, abs=1e-2), "the adapter must change the answer"

    async def main():
        await engine.start()
        alone = [await engine.complete(_request(name)) for name in PROMPTS]
        mixed = await asyncio.gather(*[engine.complete(_request(name)) for name in PROMPTS])
        await engine.merge("a0")  # a0 in the weights; the others exact around it
        merged = await asyncio.gather(*[engine.complete(_request(name)) for name in PROMPTS])
        await engine.unmerge()
        joined = _watch_joins(engine, newcomers=len(PROMPTS))
        first = asyncio.ensure_future(engine.complete(_request("a2", max_tokens=12)))
        deadline = time.monotonic() + 10
        while not joined and not first.done() and time.monotonic() < deadline:  # its prefill has run, and its
            await asyncio.sleep(0.001)  # first step waits for the newcomers
        staggered = await asyncio.gather(*[engine.complete(_request(name)) for name in PROMPTS])
        long = await first
        await engine.stop()
        return alone, mixed, merged, staggered, long, joined

    alone, mixed, merged, staggered, long, joined = asyncio.run(main())
    _no_fallback(caplog)
    _check(alone, want, "alone")
    _check(mixed, want, "mixed")
    _check(merged, want, "merged")
    _check(staggered, want, "staggered")
    assert long.choice.tokens[:len(want["a2"][0])] == want["a2"][0]
    # Plain KV caches take newcomers mid-decode; sliding-window ones make them wait for the running rows.
    assert any(joined) == family.joins, joined


# ---------------------------------------------------------------------------------------------- encoders
@pytest.fixture(scope="module")
def classifier_dir(bert_dir, tmp_path_factory) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("bert-cls")
    torch.manual_seed(1)
    BertForSequenceClassification(BertConfig.from_pretrained(str(bert_dir), num_labels=3)).save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(bert_dir / name, path / name)
    return path


TEXTS = {"a0": ["hello world"], "base": ["a second, longer text in the batch"], "a1": ["the fox", "lazy dog"]}


@torch.inference_mode()
def _peft_encode(model: torch.nn.Module, base: LoadedBase, text: str, classify: bool) -> list[float]:
    enc = base.tokenizer(text, return_tensors="pt")
    out = model(**enc)
    if classify:
        return out.logits[0].float().softmax(-1).tolist()  # (labels,)
    return F.normalize(out.last_hidden_state[0].float().mean(0), dim=-1).tolist()  # (T, H) -> (H,)


@pytest.mark.parametrize("task", ["embed", "classify"])
def test_encoder_answers_equal_peft_alone_mixed_and_merged(task, bert_dir, classifier_dir, tmp_path, caplog):
    classify = task == "classify"
    config = dict(task_type="SEQ_CLS") if classify else {}  # the classifier head travels in modules_to_save
    engine, peft = _engine(classifier_dir if classify else bert_dir, tmp_path, ["a0", "a1"], **config)
    want = {name: [_peft_encode(peft[name], engine.base, t, classify) for t in texts] for name, texts in TEXTS.items()}
    assert not torch.allclose(torch.tensor(want["a0"]), torch.tensor(_peft_encode(peft["base"], engine.base,
                                                                                  TEXTS["a0"][0], classify)))
    call = engine.classify if classify else engine.embed

    async def main():
        await engine.start()
        alone = [await call(name, texts) for name, texts in TEXTS.items()]
        mixed = await asyncio.gather(*[call(name, texts) for name, texts in TEXTS.items()])
        await engine.merge("a1")
        merged = await asyncio.gather(*[call(name, texts) for name, texts in TEXTS.items()])
        await engine.stop()
        return alone, mixed, merged

    outcomes = asyncio.run(main())
    _no_fallback(caplog)
    for phase, results in zip(["alone", "mixed", "merged"], outcomes, strict=True):
        for name, result in zip(TEXTS, results, strict=True):
            if classify:
                labels = engine.base.labels
                got = [{r["label"]: r["score"] for r in row} for row in result.results]
                got = [[scores[label] for label in labels] for scores in got]
            else:
                got = result.embeddings
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want[name]), atol=1e-4, rtol=1e-4,
                                       msg=lambda m, n=name, p=phase: f"{p}: {n}: {m}")
