"""service/routes/inference.py: OpenAI-compatible completions (with SSE), embeddings, classify, models."""

from __future__ import annotations

import base64
import json
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient
from http_testkit import BERT_TARGETS, GPT2_TARGETS, make_adapter, peft_files


def _upload(client: TestClient, name: str, weights) -> None:
    r = client.put(f"/v1/adapters/{name}", files=peft_files(weights))
    assert r.status_code == 201, r.text


@pytest.fixture(scope="module")
def gpt2_adapter(gpt2_client: TestClient) -> str:
    _upload(gpt2_client, "gen-a", make_adapter(GPT2_TARGETS, rank=4, seed=3, scale=2.0, fan_in_fan_out=True))
    return "gen-a"


def _complete(client: TestClient, **body) -> dict:
    r = client.post("/v1/completions", json={"max_tokens": 6, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------------------------------------- completions
def test_completion_shape_and_usage(gpt2_client: TestClient, gpt2_adapter: str):
    out = _complete(gpt2_client, model=gpt2_adapter, prompt="hello world")
    assert out["object"] == "text_completion" and out["model"] == gpt2_adapter and out["id"].startswith("cmpl-")
    (choice,) = out["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    usage = out["usage"]
    assert 0 < usage["completion_tokens"] <= 6 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_adapter_changes_the_completion(gpt2_client: TestClient, gpt2_adapter: str):
    with_adapter = _complete(gpt2_client, model=gpt2_adapter, prompt="the quick", logprobs=1)
    base = _complete(gpt2_client, model="base", prompt="the quick", logprobs=1)
    assert with_adapter["choices"][0]["logprobs"]["token_logprobs"] != base["choices"][0]["logprobs"]["token_logprobs"]


def test_greedy_and_seeded_sampling_are_reproducible(gpt2_client: TestClient, gpt2_adapter: str):
    greedy = [_complete(gpt2_client, model=gpt2_adapter, prompt="lora")["choices"] for _ in range(2)]
    assert greedy[0] == greedy[1]
    a = _complete(gpt2_client, model=gpt2_adapter, prompt="lora", temperature=1.0, top_p=0.9, seed=7)
    b = _complete(gpt2_client, model=gpt2_adapter, prompt="lora", temperature=1.0, top_p=0.9, seed=7)
    assert a["choices"] == b["choices"]


def test_logprobs(gpt2_client: TestClient, gpt2_adapter: str):
    choice = _complete(gpt2_client, model=gpt2_adapter, prompt="hello", logprobs=0)["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == len(lp["top_logprobs"]) > 0
    assert all(x <= 0 for x in lp["token_logprobs"]) and lp["top_logprobs"] == [{}] * len(lp["tokens"])


def test_top_logprobs_are_the_most_likely_tokens(gpt2_client: TestClient, gpt2_adapter: str):
    greedy = _complete(gpt2_client, model=gpt2_adapter, prompt="hello", logprobs=3)["choices"][0]["logprobs"]
    sampled = _complete(gpt2_client, model=gpt2_adapter, prompt="hello", logprobs=5, temperature=1.0, seed=3,
                        max_tokens=12)["choices"][0]["logprobs"]
    for lp in (greedy, sampled):
        n = 3 if lp is greedy else 5
        for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
            values = list(top.values())
            assert 0 < len(top) <= n and values == sorted(values, reverse=True) and all(v <= 0 for v in values)
            assert logprob <= values[0] + 1e-6  # nothing beats the most likely token
            if token in top and "\ufffd" not in token:  # its entry is its own logprob (partial UTF-8 bytes all
                assert top[token] == pytest.approx(logprob, abs=1e-5)  # read U+FFFD: the likeliest keeps it)
    # greedy decoding picks the most likely token each step, so it heads each list
    for token, logprob, top in zip(greedy["tokens"], greedy["token_logprobs"], greedy["top_logprobs"], strict=True):
        assert next(iter(top)) == token and top[token] == pytest.approx(logprob, abs=1e-5)


def test_max_tokens_and_stop(gpt2_client: TestClient, gpt2_adapter: str):
    full = _complete(gpt2_client, model=gpt2_adapter, prompt="hello", max_tokens=8)["choices"][0]
    assert full["finish_reason"] == "length"
    stop = full["text"][2:4]
    assert len(stop) == 2
    cut = _complete(gpt2_client, model=gpt2_adapter, prompt="hello", max_tokens=8, stop=[stop])["choices"][0]
    assert cut["finish_reason"] == "stop" and stop not in cut["text"] and full["text"].startswith(cut["text"])


def test_several_prompts_give_one_choice_each(gpt2_client: TestClient, gpt2_adapter: str):
    out = _complete(gpt2_client, model=gpt2_adapter, prompt=["one", "two", "three"])
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    alone = _complete(gpt2_client, model=gpt2_adapter, prompt="two")["choices"][0]
    assert out["choices"][1]["text"] == alone["text"]


def test_stream_is_sse_and_matches_the_plain_answer(gpt2_client: TestClient, gpt2_adapter: str):
    plain = _complete(gpt2_client, model=gpt2_adapter, prompt="hello world")["choices"][0]
    with gpt2_client.stream("POST", "/v1/completions", json={"model": gpt2_adapter, "prompt": "hello world",
                                                              "max_tokens": 6, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["finish_reason"]
    assert len({c["id"] for c in chunks}) == 1


def test_stream_usage_when_asked(gpt2_client: TestClient, gpt2_adapter: str):
    plain = _complete(gpt2_client, model=gpt2_adapter, prompt="hello world")
    body = {"model": gpt2_adapter, "prompt": "hello world", "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with gpt2_client.stream("POST", "/v1/completions", json=body) as r:
        events = [json.loads(line[len("data: "):]) for line in r.iter_lines() if line and line != "data: [DONE]"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]
    assert all("usage" not in e for e in events[:-1])
    r = gpt2_client.post("/v1/completions", json={**body, "stream_options": {"include_usage": True, "x": 1}})
    assert r.status_code == 422


def test_stream_errors_come_before_the_stream(gpt2_client: TestClient):
    r = gpt2_client.post("/v1/completions", json={"model": "never-uploaded", "prompt": "x", "stream": True})
    assert r.status_code == 404 and r.json()["error"]["type"] == "unknown_adapter_error"
    r = gpt2_client.post("/v1/completions", json={"model": "base", "prompt": ["a", "b"], "stream": True})
    assert r.status_code == 400


@pytest.mark.parametrize("body", [
    {"prompt": "x"},  # no model
    {"model": "base"},  # no prompt
    {"model": "base", "prompt": "x", "temperature": 3},
    {"model": "base", "prompt": "x", "top_p": 0},
    {"model": "base", "prompt": "x", "max_tokens": -1},
    {"model": "base", "prompt": "x", "logprobs": 21},  # OpenAI allows up to 20
    {"model": "base", "prompt": "x", "n": 2},
    {"model": "base", "prompt": []},
    {"model": "base", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]},
])
def test_completion_validation_is_422(gpt2_client: TestClient, body: dict):
    r = gpt2_client.post("/v1/completions", json=body)
    assert r.status_code == 422 and r.json()["error"]["type"] == "validation_error"


@pytest.mark.parametrize("field", ["temperature", "top_p"])
def test_non_finite_sampling_settings_are_422_saying_so(gpt2_client: TestClient, field: str):
    body = '{"model": "base", "prompt": "x", "' + field + '": NaN}'
    r = gpt2_client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "finite" in r.json()["error"]["message"]


def test_a_top_p_below_float32_range_keeps_the_top_token(gpt2_client: TestClient):
    greedy = _complete(gpt2_client, model="base", prompt="hello", max_tokens=4)["choices"][0]["text"]
    tiny = _complete(gpt2_client, model="base", prompt="hello", max_tokens=4, temperature=1.0, top_p=1e-300)
    assert tiny["choices"][0]["text"] == greedy


def test_prompt_longer_than_the_model_is_400(gpt2_client: TestClient):
    r = gpt2_client.post("/v1/completions", json={"model": "base", "prompt": "hello " * 100, "max_tokens": 100})
    assert r.status_code == 400 and "exceeds" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- embeddings
def test_embeddings(bert_client: TestClient, unique: str):
    _upload(bert_client, unique, make_adapter(BERT_TARGETS, seed=8))
    out = bert_client.post("/v1/embeddings", json={"model": unique, "input": ["hello", "world"]}).json()
    assert out["object"] == "list" and out["model"] == unique and out["usage"]["prompt_tokens"] > 0
    vectors = torch.tensor([d["embedding"] for d in out["data"]])
    assert [d["index"] for d in out["data"]] == [0, 1] and vectors.shape == (2, 32)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(2))
    base = bert_client.post("/v1/embeddings", json={"model": "base", "input": "hello"}).json()["data"][0]["embedding"]
    assert not torch.allclose(torch.tensor(base), vectors[0])


def test_embeddings_base64(bert_client: TestClient):
    floats = bert_client.post("/v1/embeddings", json={"model": "base", "input": "hi"}).json()["data"][0]["embedding"]
    encoded = bert_client.post("/v1/embeddings", json={"model": "base", "input": "hi", "encoding_format": "base64"})
    raw = base64.b64decode(encoded.json()["data"][0]["embedding"])
    torch.testing.assert_close(torch.tensor(struct.unpack(f"<{len(raw) // 4}f", raw)), torch.tensor(floats))


def test_concurrent_mixed_adapters_match_solo_answers(bert_client: TestClient, unique: str):
    names = [f"{unique}-{i}" for i in range(3)]
    for i, name in enumerate(names):
        _upload(bert_client, name, make_adapter(BERT_TARGETS, seed=30 + i))
    models = (names + ["base"]) * 4
    solo = {m: bert_client.post("/v1/embeddings", json={"model": m, "input": m}).json()["data"][0]["embedding"]
            for m in set(models)}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda m: bert_client.post("/v1/embeddings", json={"model": m, "input": m}), models))
    for model, r in zip(models, answers, strict=True):
        torch.testing.assert_close(torch.tensor(r.json()["data"][0]["embedding"]), torch.tensor(solo[model]),
                                   atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- classify
def test_classify_on_a_classifier(cls_client: TestClient, unique: str):
    _upload(cls_client, unique, make_adapter(BERT_TARGETS, seed=4))
    out = cls_client.post("/v1/classify", json={"model": unique, "input": ["good", "bad"]}).json()
    assert out["model"] == unique and len(out["data"]) == 2
    for item in out["data"]:
        assert {s["label"] for s in item["scores"]} == {"neg", "neu", "pos"}
        assert item["label"] == item["scores"][0]["label"] and item["score"] == max(s["score"] for s in item["scores"])
        assert sum(s["score"] for s in item["scores"]) == pytest.approx(1.0, abs=1e-5)
    base = cls_client.post("/v1/classify", json={"model": "base", "input": "good"}).json()["data"][0]
    assert base["scores"] != out["data"][0]["scores"]


def test_classify_with_a_head_on_an_encoder(bert_client: TestClient, unique: str):
    head = {"classifier.weight": torch.randn(2, 32), "classifier.bias": torch.zeros(2)}
    _upload(bert_client, unique, make_adapter(BERT_TARGETS, seed=6, modules_to_save=head))
    out = bert_client.post("/v1/classify", json={"model": unique, "input": "hello"})
    assert out.status_code == 200, out.text
    assert {s["label"] for s in out.json()["data"][0]["scores"]} == {"LABEL_0", "LABEL_1"}
    r = bert_client.post("/v1/classify", json={"model": "base", "input": "hello"})
    assert r.status_code == 400 and "classifier" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- errors, models
@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"model": "base", "prompt": "x"}),
    ("/v1/classify", {"model": "base", "input": "x"}),
])
def test_wrong_task_is_400(bert_client: TestClient, path: str, body: dict):
    r = bert_client.post(path, json=body)
    assert r.status_code == 400 and r.json()["error"]["message"]


def test_embeddings_on_a_generator_is_400(gpt2_client: TestClient):
    r = gpt2_client.post("/v1/embeddings", json={"model": "base", "input": "x"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "wrong_task_error"


@pytest.mark.parametrize("path,body", [
    ("/v1/embeddings", {"model": "never-uploaded", "input": "x"}),
    ("/v1/embeddings", {"model": "../etc", "input": "x"}),
])
def test_unknown_adapter_is_404(bert_client: TestClient, path: str, body: dict):
    r = bert_client.post(path, json=body)
    assert r.status_code == 404 and r.json()["error"]["type"] == "unknown_adapter_error"


def test_empty_input_is_422(bert_client: TestClient):
    assert bert_client.post("/v1/embeddings", json={"model": "base", "input": []}).status_code == 422


def test_models_lists_base_and_adapters(gpt2_client: TestClient, gpt2_adapter: str):
    out = gpt2_client.get("/v1/models").json()
    assert out["object"] == "list"
    ids = [m["id"] for m in out["data"]]
    assert ids[0] == "base" and gpt2_adapter in ids
    card = out["data"][ids.index(gpt2_adapter)]
    assert card["object"] == "model" and card["parent"] == "base" and card["created"] > 0
    assert gpt2_client.get(f"/v1/models/{gpt2_adapter}").json() == card  # what client.models.retrieve() calls
    assert gpt2_client.get("/v1/models/base").json() == out["data"][0]
    missing = gpt2_client.get("/v1/models/never-uploaded")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "unknown_adapter_error"


def test_max_tokens_null_means_the_default(gpt2_client: TestClient, gpt2_adapter: str):
    out = _complete(gpt2_client, model=gpt2_adapter, prompt="hello", max_tokens=None, temperature=0)
    default = gpt2_client.post("/v1/completions", json={"model": gpt2_adapter, "prompt": "hello", "temperature": 0})
    assert out["choices"] == default.json()["choices"] and out["usage"]["completion_tokens"] <= 16


@pytest.mark.parametrize("head", [
    {"classifier.weight": torch.randn(2, 31)},  # hidden size 32
    {"classifier.weight": torch.randn(64)},  # not 2-D
    {"classifier.weight": torch.randn(2, 32), "classifier.bias": torch.zeros(3)},  # labels disagree
    {"classifier.bias": torch.zeros(2)},  # a bias without a weight
    {"classifier.weight": torch.randn(0, 32)},  # no labels
])
def test_a_detached_head_of_the_wrong_shape_is_refused_at_upload(bert_client: TestClient, unique: str, head):
    r = bert_client.put(f"/v1/adapters/{unique}", files=peft_files(make_adapter(BERT_TARGETS, modules_to_save=head)))
    assert r.status_code == 422 and "classifier" in r.json()["error"]["message"], r.text
    assert bert_client.get(f"/v1/adapters/{unique}").status_code == 404


@pytest.mark.parametrize("head", [
    {"pre_classifier.weight": torch.randn(32, 32), "pre_classifier.bias": torch.zeros(32),  # DistilBERT's
     "classifier.weight": torch.randn(2, 32), "classifier.bias": torch.zeros(2)},
    {"classifier.dense.weight": torch.randn(32, 32), "classifier.dense.bias": torch.zeros(32),  # RoBERTa's
     "classifier.out_proj.weight": torch.randn(2, 32), "classifier.out_proj.bias": torch.zeros(2)},
], ids=["pre_classifier", "nested"])
def test_a_multi_layer_head_on_an_encoder_is_not_half_applied(bert_client: TestClient, unique: str, head):
    _upload(bert_client, unique, make_adapter(BERT_TARGETS, seed=6, modules_to_save=head))
    assert bert_client.post("/v1/embeddings", json={"model": unique, "input": "hello"}).status_code == 200
    r = bert_client.post("/v1/classify", json={"model": unique, "input": "hello"})
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "more than one layer" in message and next(iter(sorted(head))) in message


def test_an_adapter_far_larger_than_any_trained_one_is_refused_at_upload(bert_client: TestClient, unique: str):
    r = bert_client.put(f"/v1/adapters/{unique}", files=peft_files(make_adapter(BERT_TARGETS, scale=1e3)))
    assert r.status_code == 422 and "s·B·A" in r.json()["error"]["message"]
    assert bert_client.get(f"/v1/adapters/{unique}").status_code == 404


def test_non_finite_outputs_are_a_clear_error_for_their_own_request_only(bert_client: TestClient, unique: str):
    """An adapter within the upload bound can still overflow on a float16 base; simulated here by poisoning
    the pooled output of one adapter's rows."""
    import service.engine.batch as batch_module

    _upload(bert_client, unique, make_adapter(BERT_TARGETS, seed=8))
    key = bert_client.get(f"/v1/adapters/{unique}").json()["sha256"]  # rows are routed by the adapter's sha256
    embed_rows = batch_module.embed_rows

    def poisoned(lm, base, texts, names):
        rows, tokens = embed_rows(lm, base, texts, names)
        return [[float("nan")] * len(r) if n == key else r for r, n in zip(rows, names, strict=True)], tokens

    original = batch_module.embed_rows
    batch_module.embed_rows = poisoned
    try:
        with ThreadPoolExecutor(2) as pool:
            bad, good = pool.map(lambda m: bert_client.post("/v1/embeddings", json={"model": m, "input": "hi"}),
                                 [unique, "base"])
    finally:
        batch_module.embed_rows = original
    assert bad.status_code == 422 and "non-finite" in bad.json()["error"]["message"]
    assert good.status_code == 200 and None not in good.json()["data"][0]["embedding"]


# ---------------------------------------------------------------------------------------------- system_fingerprint
def test_every_answer_names_the_version_that_answered(bert_client: TestClient, unique: str):
    """OpenAI's system_fingerprint: "<adapter>@v<version>:<sha256[:12]>", or "base"; an overwrite is the next one."""
    _upload(bert_client, unique, make_adapter(BERT_TARGETS, seed=9041))  # bytes no other test uploads
    v1 = bert_client.get(f"/v1/adapters/{unique}").json()
    first = bert_client.post("/v1/embeddings", json={"model": unique, "input": "hi"}).json()
    assert first["system_fingerprint"] == f"{unique}@v1:{v1['sha256'][:12]}"
    r = bert_client.put(f"/v1/adapters/{unique}?overwrite=true",
                        files=peft_files(make_adapter(BERT_TARGETS, seed=9042)))
    assert r.status_code == 201
    second = bert_client.post("/v1/embeddings", json={"model": unique, "input": "hi"}).json()
    assert second["system_fingerprint"] == f"{unique}@v2:{r.json()['sha256'][:12]}"
    assert second["data"][0]["embedding"] != first["data"][0]["embedding"]
    assert bert_client.post("/v1/embeddings", json={"model": "base", "input": "hi"}).json()["system_fingerprint"] \
        == "base"
    state = bert_client.get("/v1/state").json()
    assert {"name": unique, "version": 2, "sha256": r.json()["sha256"]} in state["resident"]
    assert state["resident_adapters"].count(unique) == 1


def test_completions_name_their_version_plain_and_streamed(gpt2_client: TestClient, gpt2_adapter: str):
    sha = gpt2_client.get(f"/v1/adapters/{gpt2_adapter}").json()["sha256"]
    expected = f"{gpt2_adapter}@v1:{sha[:12]}"
    assert _complete(gpt2_client, model=gpt2_adapter, prompt=["hello", "world"])["system_fingerprint"] == expected
    body = {"model": gpt2_adapter, "prompt": "hello", "max_tokens": 3, "stream": True}
    with gpt2_client.stream("POST", "/v1/completions", json=body) as r:
        events = [json.loads(line.removeprefix("data: ")) for line in r.iter_lines() if line and "[DONE]" not in line]
    assert events and all(e["system_fingerprint"] == expected for e in events)
