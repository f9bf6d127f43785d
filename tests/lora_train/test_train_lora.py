"""LoRA training on the synthetic task: it learns, only LoRA (+ head) changes, and the saved adapter
is a PEFT adapter that PEFT and our LoraModel run with equal outputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from adapters import LoraModel, load_peft_dir
from lora_train.report import REPORT_NAME, write_report
from lora_train.trainer import TrainArgs, train

SENTENCES = ["the apple is red", "a big truck near my boat", "my very old pear and one lemon", "this bus"]


def _fresh(base_dir):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(base_dir).eval()


def _batch(base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)(SENTENCES, return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def lora_run(tiny_bert_dir, classify_files, tmp_path_factory):
    train_file, eval_file = classify_files
    args = TrainArgs(data=str(train_file), eval=str(eval_file), out=str(tmp_path_factory.mktemp("lora-out")),
                     base_model=str(tiny_bert_dir), epochs=5, lr=3e-2, batch_size=16, seed=0, progress=False)
    result = train(args, log=lambda *a: None)
    write_report(args, result)
    return result


def test_lora_learns_well_above_chance(lora_run):
    accuracies = [e["eval_accuracy"] for e in lora_run.epochs]
    assert len(accuracies) == 5
    assert accuracies[-1] >= 0.75, accuracies  # chance is 0.5 on balanced labels
    assert lora_run.epochs[-1]["train_loss"] < lora_run.epochs[0]["train_loss"]


def test_only_lora_and_head_train_and_the_base_is_bit_identical(lora_run, tiny_bert_dir):
    assert lora_run.base_unchanged is True
    fresh = dict(_fresh(tiny_bert_dir).named_parameters())
    trained = dict(lora_run.lora.eject().named_parameters())  # the original module tree, LoRA removed
    assert trained.keys() == fresh.keys()
    for name, p in fresh.items():
        assert torch.equal(p, trained[name]), name  # the base head too: training used a copy
    # Trainable: exactly A and B of query/value in both layers, plus the classifier head.
    w = lora_run.weights
    assert sorted(w.lora) == [f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")]
    assert sorted(w.modules_to_save) == ["classifier.bias", "classifier.weight"]
    assert lora_run.trainable_parameters == w.num_parameters() == 4 * (8 * 32 + 32 * 8) + 2 * 32 + 2
    assert all(b.abs().sum() > 0 for _, b in w.lora.values())  # B started at zero: it moved
    assert not torch.equal(w.modules_to_save["classifier.weight"], fresh["classifier.weight"])


def test_saved_files_are_peft_format(lora_run):
    sd = load_file(f"{lora_run.out}/adapter_model.safetensors")
    assert "base_model.model.classifier.weight" in sd and "base_model.model.classifier.bias" in sd
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in sd
    config = json.loads(open(f"{lora_run.out}/adapter_config.json").read())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["peft_type"] == "LORA"


def test_adapter_loads_in_peft_and_in_lora_model_with_equal_outputs(lora_run, tiny_bert_dir):
    from peft import PeftModel

    batch = _batch(tiny_bert_dir)
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(_fresh(tiny_bert_dir), lora_run.out).eval()(**batch).logits
        base = _fresh(tiny_bert_dir)
        base_logits = base(**batch).logits
        lm = LoraModel(base)
        lm.add_adapter("trained", load_peft_dir(lora_run.out))
        lm.set_adapter("trained")
        ours = base(**batch).logits
    assert torch.allclose(peft_logits, ours, atol=1e-5), (peft_logits, ours)
    assert not torch.allclose(ours, base_logits, atol=1e-3)  # the adapter does something
    assert (ours.argmax(-1) == torch.tensor([1, 0, 1, 0])).all()  # pos, neg, pos, neg


def test_training_report(lora_run):
    report = json.loads(open(f"{lora_run.out}/{REPORT_NAME}").read())
    assert report["args"]["epochs"] == 5 and report["mode"] == "lora"
    assert [e["epoch"] for e in report["epochs"]] == [1, 2, 3, 4, 5]
    assert report["trainable_parameters"] == lora_run.trainable_parameters
    lora_only = sum(a.numel() + b.numel() for a, b in lora_run.weights.lora.values())  # the head copy replaces
    assert report["total_parameters"] == report["base_parameters"] + lora_only
    assert report["adapter_bytes"] < report["base_bytes"] / 100
    assert report["base_unchanged"] is True and report["labels"] == ["neg", "pos"]
    assert report["train_seconds"] > 0 and report["checkpoint_bytes"] > report["adapter_bytes"]


def test_same_seed_same_bytes_other_seed_other_bytes(tiny_bert_dir, classify_files, tmp_path):
    train_file, _ = classify_files
    outputs = []
    for i, seed in enumerate((7, 7, 8)):
        args = TrainArgs(data=str(train_file), out=str(tmp_path / f"run{i}"), base_model=str(tiny_bert_dir),
                         epochs=1, lr=3e-2, dropout=0.1, seed=seed, progress=False)  # dropout: RNG in the loop too
        train(args, log=lambda *a: None)
        outputs.append((tmp_path / f"run{i}" / "adapter_model.safetensors").read_bytes())
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]
