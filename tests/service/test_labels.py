"""Label names inside the adapter files: lora-train writes them, an upload of the directory as it is keeps
them, /v1/classify answers with them; a `labels` form field overrides them; PEFT still loads the files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from http_testkit import BERT_TARGETS, make_adapter, peft_files

from adapters import load_peft_dir

_WORDS = {"paint": ["red", "blue", "green", "brush", "canvas"], "tool": ["hammer", "saw", "drill", "wrench", "nail"]}


@pytest.fixture(scope="module")
def trained_dir(model_dirs, tmp_path_factory) -> Path:
    """`lora-train --task classify` on paint/tool rows, on the bare BERT the bert_client serves."""
    from lora_train.trainer import TrainArgs, train

    rng = random.Random(0)
    root = tmp_path_factory.mktemp("labels-run")
    rows = [{"text": " ".join(rng.choices(_WORDS[label], k=4)), "label": label} for label in ["paint", "tool"] * 16]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-wide model: more threads only synchronise
    try:
        train(TrainArgs(data=str(root / "train.jsonl"), out=str(root / "out"), base_model=str(model_dirs["bert"]),
                        epochs=1, batch_size=8, max_length=16, progress=False), log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    return root / "out"


def _every_file(directory: Path) -> list[tuple[str, tuple[str, bytes]]]:
    """What `curl -F file=@dir/<each file>` sends: one field name, repeated, the real names as filenames."""
    return [("file", (p.name, p.read_bytes())) for p in sorted(directory.iterdir())]


def _labels_of(client: TestClient, model: str) -> set[str]:
    r = client.post("/v1/classify", json={"model": model, "input": ["red brush", "hammer saw"]})
    assert r.status_code == 200, r.text
    return {s["label"] for row in r.json()["data"] for s in row["scores"]}


def test_lora_train_labels_reach_classify_through_an_upload_of_the_directory(bert_client: TestClient,
                                                                             trained_dir: Path, unique: str):
    assert load_peft_dir(trained_dir).labels == ["paint", "tool"]
    (trained_dir / "README.md").write_text("---\nlibrary_name: peft\n---\n# Model card\n")  # as save_pretrained
    r = bert_client.put(f"/v1/adapters/{unique}", files=_every_file(trained_dir))
    assert r.status_code == 201, r.text
    assert _labels_of(bert_client, unique) == {"paint", "tool"}  # not LABEL_0 / LABEL_1
    # The stored canonical files keep them, so a download uploads again with its names.
    model = bert_client.get(f"/v1/adapters/{unique}/files/adapter_model.safetensors").content
    assert json.loads(model[8:8 + int.from_bytes(model[:8], "little")])["__metadata__"]["labels"] == \
        '["paint", "tool"]'


def test_peft_loads_the_lora_train_output_that_carries_labels(model_dirs, trained_dir: Path):
    peft = pytest.importorskip("peft")
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    with safe_open(trained_dir / "adapter_model.safetensors", "pt") as f:  # the names ride in the metadata
        assert json.loads(f.metadata()["labels"]) == ["paint", "tool"]

    base = AutoModelForSequenceClassification.from_pretrained(model_dirs["bert"], num_labels=2)
    model = peft.PeftModel.from_pretrained(base, trained_dir).eval()
    ours = load_peft_dir(trained_dir)
    head = model.base_model.model.classifier.modules_to_save["default"].weight
    assert torch.equal(head, ours.modules_to_save["classifier.weight"])


def test_a_labels_field_overrides_the_files_and_is_checked(bert_client: TestClient, trained_dir: Path,
                                                           unique: str):
    files = _every_file(trained_dir) + [("labels", (None, b'["warm", "cold"]'))]
    assert bert_client.put(f"/v1/adapters/{unique}", files=files).status_code == 201
    assert _labels_of(bert_client, unique) == {"warm", "cold"}
    for bad in (b'["one", "two", "three"]', b'"paint"', b'["a", "a"]', b"[1, 2]", b"not json"):
        r = bert_client.put(f"/v1/adapters/{unique}-x", files=_every_file(trained_dir) + [("labels", (None, bad))])
        assert r.status_code == 422 and r.json()["error"]["param"] == "labels", (bad, r.text)


def test_an_adapters_own_labels_take_precedence_over_the_bases(cls_client: TestClient, unique: str):
    weights = make_adapter(BERT_TARGETS, seed=3)
    assert cls_client.put(f"/v1/adapters/{unique}", files=peft_files(weights)).status_code == 201
    assert _labels_of(cls_client, unique) == {"neg", "neu", "pos"}  # no names of its own: the base's id2label
    weights.labels = ["sad", "meh", "glad"]
    assert cls_client.put(f"/v1/adapters/{unique}-named", files=peft_files(weights)).status_code == 201
    assert _labels_of(cls_client, f"{unique}-named") == {"sad", "meh", "glad"}
    weights.labels = ["sad", "glad"]  # the base classifies into three
    r = cls_client.put(f"/v1/adapters/{unique}-two", files=peft_files(weights))
    assert r.status_code == 422 and r.json()["error"]["param"] == "labels"


def test_labels_must_name_every_output_of_the_adapters_head(bert_client: TestClient, unique: str):
    head = {"classifier.weight": torch.randn(2, 32), "classifier.bias": torch.zeros(2)}
    weights = make_adapter(BERT_TARGETS, seed=5, modules_to_save=head)
    weights.labels = ["a", "b", "c"]
    r = bert_client.put(f"/v1/adapters/{unique}", files=peft_files(weights))
    assert r.status_code == 422 and r.json()["error"]["param"] == "labels", r.text
