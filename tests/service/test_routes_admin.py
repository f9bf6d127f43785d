"""service/routes/admin.py (+ the merge route): state, fingerprints around merge and unmerge, compose."""

from __future__ import annotations

import threading

import pytest
import torch
from fastapi.testclient import TestClient
from http_testkit import BERT_TARGETS, make_adapter, peft_files, single_file

from adapters import LoraConfig, LoraWeights
from adapters.merge_kernel import fused_kernel_available


def _embed(client: TestClient, model: str, text: str = "merge me") -> torch.Tensor:
    r = client.post("/v1/embeddings", json={"model": model, "input": text})
    assert r.status_code == 200, r.text
    return torch.tensor(r.json()["data"][0]["embedding"])


def _state(client: TestClient) -> dict:
    """/v1/state with its fingerprints, which merge and unmerge responses (and a plain GET) leave null."""
    r = client.get("/v1/state", params={"fingerprints": "true"})
    assert r.status_code == 200, r.text
    return r.json()


def _upload(client: TestClient, name: str, weights: LoraWeights) -> dict:
    r = client.put(f"/v1/adapters/{name}", files=peft_files(weights))
    assert r.status_code == 201, r.text
    return r.json()


@pytest.mark.local_store
def test_state_when_nothing_is_merged(bert_client: TestClient):
    state = _state(bert_client)
    assert state["merged_adapter"] is None and state["mode"] == "unmerged"
    assert state["fingerprint"] == state["pristine_fingerprint"] and len(state["fingerprint"]) == 64
    assert isinstance(state["resident_adapters"], list) and state["merge_policy"]["policy"] == "auto"
    # The test base is float32 on the CPU, so merges run on the fused kernel wherever it was built.
    assert state["merge_kernel"] == ("fused" if fused_kernel_available() else "addmm")
    assert state["store"] == {"location": str(bert_client.app.state.settings.store), "name_cache": None}  # local


def test_merge_unmerge_and_plain_state_answer_without_hashing(bert_client: TestClient, unique: str, monkeypatch):
    """A switch over HTTP costs the switch: its answer carries null fingerprints, and nothing is hashed
    until a client asks with ?fingerprints=true."""
    import service.engine.weights as engine_module

    calls: list[bool] = []
    real = engine_module.fingerprint

    def counting(lm, *, pristine: bool = False) -> str:
        calls.append(pristine)
        return real(lm, pristine=pristine)

    monkeypatch.setattr(engine_module, "fingerprint", counting)
    _upload(bert_client, f"{unique}-a", make_adapter(BERT_TARGETS, seed=41))
    _upload(bert_client, f"{unique}-b", make_adapter(BERT_TARGETS, seed=42))
    answers = []
    try:
        answers.append(bert_client.post(f"/v1/adapters/{unique}-a/merge"))
        answers.append(bert_client.post(f"/v1/adapters/{unique}-b/merge"))  # a switch
        answers.append(bert_client.get("/v1/state"))
    finally:
        answers.append(bert_client.post("/v1/unmerge"))
    assert [r.status_code for r in answers] == [200] * 4
    assert [r.json()["merged_adapter"] for r in answers] == [f"{unique}-a", f"{unique}-b", f"{unique}-b", None]
    assert all(r.json()["fingerprint"] is None and r.json()["pristine_fingerprint"] is None for r in answers)
    assert calls == []
    state = _state(bert_client)
    assert state["fingerprint"] == state["pristine_fingerprint"] and len(state["fingerprint"]) == 64
    assert False in calls  # the current weights are hashed on every request that asks
    bad = bert_client.get("/v1/state", params={"fingerprints": "maybe"})
    assert bad.status_code == 422 and bad.json()["error"]["message"], bad.text


def test_fingerprint_does_not_depend_on_resident_adapters(bert_client: TestClient, unique: str):
    before = _state(bert_client)["fingerprint"]
    _upload(bert_client, unique, make_adapter(BERT_TARGETS, seed=12))
    _embed(bert_client, unique)  # now resident: its layers are wrapped, the base weights untouched
    assert unique in bert_client.get("/v1/state").json()["resident_adapters"]
    assert _state(bert_client)["fingerprint"] == before


def test_fingerprints_around_merge_and_unmerge(bert_client: TestClient, unique: str):
    _upload(bert_client, unique, make_adapter(BERT_TARGETS, seed=11))
    unmerged, base = _embed(bert_client, unique), _embed(bert_client, "base")
    before = _state(bert_client)
    r = bert_client.post(f"/v1/adapters/{unique}/merge")
    try:
        assert r.status_code == 200, r.text
        assert r.json()["merged_adapter"] == unique and r.json()["mode"] == "merged" and r.json()["pinned"]
        merged = _state(bert_client)
        assert merged["merged_adapter"] == unique and merged["mode"] == "merged" and merged["pinned"]
        assert merged["fingerprint"] != merged["pristine_fingerprint"]
        assert merged["pristine_fingerprint"] == before["fingerprint"]
        assert _state(bert_client)["fingerprint"] == merged["fingerprint"]
        # Merged or not, every request gets the same answer.
        torch.testing.assert_close(_embed(bert_client, unique), unmerged, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(_embed(bert_client, "base"), base, atol=1e-5, rtol=1e-4)
    finally:
        r = bert_client.post("/v1/unmerge")
    assert r.status_code == 200
    assert r.json()["merged_adapter"] is None and not r.json()["pinned"]
    after = _state(bert_client)
    assert after["merged_adapter"] is None and not after["pinned"]
    assert after["fingerprint"] == after["pristine_fingerprint"] == before["fingerprint"]  # bit-exact restore
    assert torch.equal(_embed(bert_client, "base"), base)


def test_switching_merged_adapters_restores_exactly(bert_client: TestClient, unique: str):
    before = _state(bert_client)["fingerprint"]
    _upload(bert_client, f"{unique}-a", make_adapter(BERT_TARGETS, seed=1))
    _upload(bert_client, f"{unique}-b", make_adapter(BERT_TARGETS, seed=2))

    def merge(name: str) -> str:
        assert bert_client.post(f"/v1/adapters/{name}/merge").status_code == 200
        return _state(bert_client)["fingerprint"]

    try:
        a = merge(f"{unique}-a")
        b = merge(f"{unique}-b")
        assert len({before, a, b}) == 3
        assert merge(f"{unique}-a") == a
    finally:
        assert bert_client.post("/v1/unmerge").status_code == 200
        assert _state(bert_client)["fingerprint"] == before


def test_refused_merge_leaves_the_base_untouched(gpt2_client: TestClient, unique: str):
    """GPT-2's lm_head shares its weight with the input embeddings: merging into it would change those too,
    so the merge is refused (422), nothing is written, and the adapter still serves unmerged."""
    vocab = gpt2_client.app.state.base.model.lm_head.weight.shape[0]
    gen = torch.Generator().manual_seed(4)
    weights = LoraWeights(LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head"]),
                          {"lm_head": (torch.randn(2, 32, generator=gen), torch.randn(vocab, 2, generator=gen))})
    _upload(gpt2_client, unique, weights)
    before = _state(gpt2_client)
    r = gpt2_client.post(f"/v1/adapters/{unique}/merge")
    assert r.status_code == 422 and r.json()["error"]["type"] == "merge_error", r.text
    assert "tied" in r.json()["error"]["message"]
    after = _state(gpt2_client)
    assert after["merged_adapter"] is None and after["fingerprint"] == before["fingerprint"]
    done = gpt2_client.post("/v1/completions", json={"model": unique, "prompt": "hello", "max_tokens": 2})
    assert done.status_code == 200 and gpt2_client.get("/readyz").status_code == 200


def test_an_adapter_whose_merge_would_overflow_is_refused_at_upload(bert_client: TestClient, unique: str):
    """Finite factors whose product overflows float32 never reach the store, so never a merge."""
    huge = make_adapter(BERT_TARGETS, scale=1.0)
    huge.lora = {p: (a * 1e20, b * 1e20) for p, (a, b) in huge.lora.items()}
    before = _state(bert_client)
    r = bert_client.put(f"/v1/adapters/{unique}", files=peft_files(huge))
    assert r.status_code == 422 and "s·B·A" in r.json()["error"]["message"], r.text
    assert bert_client.get(f"/v1/adapters/{unique}").status_code == 404
    assert _state(bert_client)["fingerprint"] == before["fingerprint"]


def test_delete_of_the_merged_adapter_unmerges(bert_client: TestClient, unique: str):
    before = _state(bert_client)["fingerprint"]
    _upload(bert_client, unique, make_adapter(BERT_TARGETS, seed=3))
    assert bert_client.post(f"/v1/adapters/{unique}/merge").status_code == 200
    assert bert_client.delete(f"/v1/adapters/{unique}").status_code == 200
    state = _state(bert_client)
    assert state["merged_adapter"] is None and state["fingerprint"] == before


def test_inference_during_merges_never_sees_half_merged_weights(bert_client: TestClient, unique: str):
    _upload(bert_client, unique, make_adapter(BERT_TARGETS, seed=21))
    reference = {m: _embed(bert_client, m) for m in (unique, "base")}
    errors: list[str] = []
    stop = threading.Event()

    def traffic(model: str) -> None:
        while not stop.is_set():
            got = _embed(bert_client, model)
            if not torch.allclose(got, reference[model], atol=1e-5, rtol=1e-4):
                errors.append(model)

    threads = [threading.Thread(target=traffic, args=(m,)) for m in (unique, "base", unique)]
    for t in threads:
        t.start()
    try:
        for _ in range(4):
            assert bert_client.post(f"/v1/adapters/{unique}/merge").status_code == 200
            assert bert_client.post("/v1/unmerge").status_code == 200
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        bert_client.post("/v1/unmerge")
    assert errors == []


# ---------------------------------------------------------------------------------------------- compose
def _delta(weights: LoraWeights, path: str) -> torch.Tensor:
    a, b = weights.lora[path]
    return weights.scaling_for(path) * (b.double() @ a.double())


def test_compose_exact(bert_client: TestClient, unique: str):
    x, y = make_adapter(BERT_TARGETS, rank=4, seed=1), make_adapter(BERT_TARGETS, rank=2, seed=2)
    _upload(bert_client, f"{unique}-x", x)
    _upload(bert_client, f"{unique}-y", y)
    items = [{"name": f"{unique}-x", "weight": 1.0}, {"name": f"{unique}-y", "weight": -0.5}]
    body = {"name": unique, "adapters": items}
    r = bert_client.post("/v1/compose", json=body)
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["relative_error"] is None and info["rank"] == 6 and set(info["ranks"].values()) == {6}
    assert info["meta"]["composed_from"] == body["adapters"]
    stored = bert_client.app.state.store.load_weights(unique)
    for path in BERT_TARGETS:
        torch.testing.assert_close(_delta(stored, path), _delta(x, path) - 0.5 * _delta(y, path), atol=1e-5, rtol=1e-5)
    assert bert_client.post("/v1/embeddings", json={"model": unique, "input": "hi"}).status_code == 200


def test_compose_truncated_reports_its_error(bert_client: TestClient, unique: str):
    _upload(bert_client, f"{unique}-x", make_adapter(BERT_TARGETS, rank=4, seed=1))
    _upload(bert_client, f"{unique}-y", make_adapter(BERT_TARGETS, rank=4, seed=2))
    body = {"name": unique, "adapters": [{"name": f"{unique}-x", "weight": 1}, {"name": f"{unique}-y", "weight": 1}],
            "rank": 2}
    info = bert_client.post("/v1/compose", json=body).json()
    assert info["rank"] == 2 and 0 < info["relative_error"] < 1
    assert bert_client.post("/v1/compose", json=body).status_code == 409
    again = bert_client.post("/v1/compose", json={**body, "rank": 8, "overwrite": True})
    assert again.status_code == 201 and again.json()["version"] == 2 and again.json()["relative_error"] < 1e-6
    as_advised = bert_client.post("/v1/compose?overwrite=true", json=body)  # what the 409 says to do
    assert as_advised.status_code == 201 and as_advised.json()["version"] == 3 and as_advised.json()["rank"] == 2


@pytest.mark.parametrize("case", ["unknown", "too_large", "bad_name", "empty", "bad_rank", "extra_field",
                                  "overflow", "overflow_svd"])
def test_compose_errors_change_nothing(bert_client: TestClient, unique: str, case: str):
    for i in range(5):
        bert_client.put(f"/v1/adapters/{unique}-{i}", files=single_file(make_adapter(BERT_TARGETS, rank=4, seed=i)))
    items = [{"name": f"{unique}-{i}", "weight": 1.0} for i in range(5)]
    body, status = {
        "unknown": ({"name": unique, "adapters": [{"name": "never-uploaded", "weight": 1}]}, 404),
        "too_large": ({"name": unique, "adapters": items}, 422),  # 5 × rank 4 = 20 > max_rank 16
        "bad_name": ({"name": "-bad", "adapters": items[:1]}, 422),
        "empty": ({"name": unique, "adapters": []}, 422),
        "bad_rank": ({"name": unique, "adapters": items[:1], "rank": 0}, 422),
        "extra_field": ({"name": unique, "adapters": items[:1], "mode": "svd"}, 422),
        # weights so large that the combination (or its SVD core) overflows float32
        "overflow": ({"name": unique, "adapters": [{**i, "weight": 1e38} for i in items[:2]]}, 422),
        "overflow_svd": ({"name": unique, "adapters": [{**i, "weight": 1e18} for i in items[:2]], "rank": 2}, 422),
    }[case]
    count = bert_client.app.state.store.count()
    r = bert_client.post("/v1/compose", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    assert bert_client.app.state.store.count() == count


def test_overwriting_a_pinned_merged_adapter_keeps_it_merged_in_its_new_version(bert_client: TestClient, unique: str):
    _upload(bert_client, unique, make_adapter(BERT_TARGETS, seed=31))
    assert bert_client.post(f"/v1/adapters/{unique}/merge").status_code == 200
    old = _state(bert_client)
    try:
        r = bert_client.put(f"/v1/adapters/{unique}?overwrite=true", files=peft_files(make_adapter(BERT_TARGETS,
                                                                                                  seed=32)))
        assert r.status_code == 201 and r.json()["version"] == 2
        state = _state(bert_client)
        assert state["merged_adapter"] == unique and state["pinned"]
        assert state["fingerprint"] not in (old["fingerprint"], state["pristine_fingerprint"])  # the new version
    finally:
        bert_client.post("/v1/unmerge")
    assert _state(bert_client)["fingerprint"] == old["pristine_fingerprint"]


def test_merge_kernel_addmm_setting_merges_through_addmm_with_the_same_result(model_dirs, tmp_path, bert_client,
                                                                              unique: str):
    """--merge-kernel addmm (the escape hatch from the C kernel): reported in /v1/state, and a merge through it
    gives the same embeddings as the default app's fused merge (to rounding) and unmerges to the same weights."""
    from http_testkit import ADMIN_KEY, bearer, make_settings

    from service.app import create_app

    weights = make_adapter(BERT_TARGETS, seed=21)
    settings = make_settings(model_dirs["bert"], tmp_path / "store", merge_kernel="ADDMM")  # case-insensitive
    with TestClient(create_app(settings), headers=bearer(ADMIN_KEY)) as client:
        assert client.get("/v1/state").json()["merge_kernel"] == "addmm"
        _upload(client, unique, weights)
        pristine = _state(client)["fingerprint"]
        assert client.post(f"/v1/adapters/{unique}/merge").status_code == 200
        by_addmm = _embed(client, unique)
        assert client.post("/v1/unmerge").status_code == 200
        assert _state(client)["fingerprint"] == pristine
    _upload(bert_client, unique, weights)
    assert bert_client.post(f"/v1/adapters/{unique}/merge").status_code == 200
    try:
        torch.testing.assert_close(_embed(bert_client, unique), by_addmm, atol=1e-5, rtol=1e-4)
    finally:
        assert bert_client.post("/v1/unmerge").status_code == 200
