"""--mode last-layers/full, --compare, and the generate and embed tasks (smoke tests on tiny models)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import make_sentences, write_jsonl

from adapters import LoraModel, load_peft_dir
from lora_train.cli import main
from lora_train.modes import setup_mode
from lora_train.trainer import TrainArgs, train


def test_last_layers_opens_the_last_two_blocks_and_the_head():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=3))
    setup = setup_mode(model, "classify", "last-layers")
    open_ = {n for n, p in model.named_parameters() if p.requires_grad}
    assert open_ and all(n.startswith(("bert.encoder.layer.2.", "bert.encoder.layer.3.", "bert.pooler.", "classifier."))
                         for n in open_)
    assert any(n.startswith("bert.encoder.layer.2.") for n in open_) and "classifier.weight" in open_
    assert setup.trainable_parameters == sum(p.numel() for n, p in model.named_parameters() if n in open_)
    full = setup_mode(model, "classify", "full")
    assert full.trainable_parameters == sum(p.numel() for p in model.parameters())


def test_compare_runs_three_modes_and_prints_one_table(tiny_bert_dir, classify_files, tmp_path, capsys):
    train_file, eval_file = classify_files
    out = tmp_path / "cmp"
    code = main(["--base-model", str(tiny_bert_dir), "--data", str(train_file), "--eval", str(eval_file),
                 "--out", str(out), "--compare", "--epochs", "1", "--lr", "3e-2", "--dense-lr", "1e-3",
                 "--batch-size", "32", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| mode | trainable params | % of total | accuracy | checkpoint bytes")
    assert [row.split("|")[1].strip() for row in table[1:]] == ["lora", "last-layers", "full"]
    result = json.loads((out / "compare.json").read_text())
    rows = {r["mode"]: r for r in result["rows"]}
    assert rows["lora"]["trainable_parameters"] < rows["last-layers"]["trainable_parameters"]
    assert rows["last-layers"]["trainable_parameters"] < rows["full"]["trainable_parameters"]
    assert rows["lora"]["checkpoint_bytes"] * 50 < rows["full"]["checkpoint_bytes"]
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in rows.values())
    assert rows["lora"]["base_unchanged"] is True
    # The dense modes write whole checkpoints; last-layers leaves the embeddings exactly as they were.
    assert (out / "lora" / "adapter_model.safetensors").is_file()
    full_sd = load_file(out / "full" / "model.safetensors")
    last_sd = load_file(out / "last-layers" / "model.safetensors")
    base_sd = load_file(tiny_bert_dir / "model.safetensors")
    key = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(last_sd[key], base_sd[key]) and not torch.equal(full_sd[key], base_sd[key])
    for mode in ("lora", "last-layers", "full"):
        assert json.loads((out / mode / "training_report.json").read_text())["mode"] == mode


def test_generate_smoke_on_tiny_gpt2(tiny_gpt2_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [{"prompt": f"Q : what is the colour of the {thing} ? A :", "completion": f" {colour}"}
            for thing, colour in (("sky", "blue"), ("grass", "green"), ("sun", "yellow"))] * 8
    data = write_jsonl(tmp_path / "gen.jsonl", rows)
    out = tmp_path / "gen-out"
    result = train(TrainArgs(data=str(data), eval=str(data), out=str(out), base_model=str(tiny_gpt2_dir),
                             task="generate", epochs=4, lr=3e-2, batch_size=8, progress=False), log=lambda *a: None)
    assert result.epochs[-1]["eval_loss"] < result.epochs[0]["eval_loss"]
    assert "eval_perplexity" in result.epochs[-1] and result.base_unchanged is True
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["c_attn"] and config["fan_in_fan_out"] is True
    assert config["task_type"] == "CAUSAL_LM" and config["modules_to_save"] is None
    # GPT-2's Conv1D layout survives the round trip: PEFT and LoraModel agree.
    ids = AutoTokenizer.from_pretrained(tiny_gpt2_dir)(["Q : what is the colour of the sky ? A :"],
                                                       return_tensors="pt")
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval(),
                                                str(out)).eval()(**ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
        lm = LoraModel(base)
        lm.add_adapter("gen", load_peft_dir(out))
        lm.set_adapter("gen")
        ours = base(**ids).logits
    assert torch.allclose(peft_logits, ours, atol=1e-5)


def test_embed_smoke_on_tiny_bert(tiny_bert_dir, tmp_path):


    rows = [{"text": r["text"], "positive": r["text"].upper()} for r in make_sentences(64, 5)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "embed-out"
    result = train(TrainArgs(data=str(data), out=str(out), base_model=str(tiny_bert_dir), task="embed",
                             eval_fraction=0.25, epochs=2, lr=1e-2, batch_size=16, progress=False), log=lambda *a: None)
    assert 0.0 <= result.epochs[-1]["eval_retrieval_accuracy"] <= 1.0 and result.base_unchanged is True
    weights = load_peft_dir(out)
    assert weights.config.task_type == "FEATURE_EXTRACTION" and not weights.modules_to_save
    assert all(p.startswith("encoder.layer.") for p in weights.lora)  # keys of the bare encoder (AutoModel)


def test_generate_refuses_an_encoder_and_a_base_without_tokenizer(tiny_bert_dir, tiny_gpt2_dir, tmp_path):
    """MiniLM-like encoders load as *LMHeadModel with a random head and non-causal attention."""
    import shutil

    rows = [{"prompt": "Q : sky ? A :", "completion": " blue"}] * 4
    data = write_jsonl(tmp_path / "gen.jsonl", rows)
    with pytest.raises(ValueError, match="language-model head|not causal"):
        train(TrainArgs(data=str(data), out=str(tmp_path / "o1"), base_model=str(tiny_bert_dir), task="generate",
                        progress=False), log=lambda *a: None)
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for f in tiny_gpt2_dir.iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, bare / f.name)
    with pytest.raises(ValueError, match="tokenizer"):
        train(TrainArgs(data=str(data), out=str(tmp_path / "o2"), base_model=str(bare), task="generate",
                        progress=False), log=lambda *a: None)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
