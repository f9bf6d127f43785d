"""service/embedding_spec.py: what a checkpoint's sentence-transformers files say, read with the defaults where
they are absent, and refused where they ask for what the service cannot reproduce."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from service.embedding_spec import EmbeddingSpecError, read_embedding_spec

_TOKENIZER = SimpleNamespace(model_max_length=512)  # enough for files without do_lower_case or prompts


def _write(root: Path, files: dict[str, object]) -> Path:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(content))
    return root


def _modules(*kinds: str) -> list[dict]:
    paths = {"Transformer": "", "Pooling": "1_Pooling", "Normalize": "2_Normalize"}
    return [{"idx": i, "name": str(i), "path": paths.get(k, f"{i}_{k}"), "type": f"sentence_transformers.models.{k}"}
            for i, k in enumerate(kinds)]


def test_defaults_without_sentence_transformers_files(tmp_path: Path):
    spec = read_embedding_spec(tmp_path, _TOKENIZER, positions=128, hidden=32)
    assert (spec.pooling, spec.normalize, spec.max_length, spec.dimensions) == (("mean",), True, 128, 32)
    assert spec.source == "defaults" and spec.similarity_fn_name == "cosine" and spec.resolve_prompt() == ""
    # RoBERTa's table has 514 rows for 512 tokens: the tokenizer's own limit caps the positions
    assert read_embedding_spec(tmp_path, _TOKENIZER, positions=514, hidden=32).max_length == 512
    _write(tmp_path, {"sentence_bert_config.json": {"max_seq_length": 1024}})
    assert read_embedding_spec(tmp_path, _TOKENIZER, positions=514, hidden=32).max_length == 514  # no IndexError


def test_legacy_files(tmp_path: Path):
    _write(tmp_path, {"modules.json": _modules("Transformer", "Pooling"),
                      "sentence_bert_config.json": {"max_seq_length": 200, "do_lower_case": False},
                      "1_Pooling/config.json": {"word_embedding_dimension": 32, "pooling_mode_cls_token": True,
                                                "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False},
                      "config_sentence_transformers.json": {"similarity_fn_name": "dot"}})
    spec = read_embedding_spec(tmp_path, _TOKENIZER, positions=512, hidden=32)
    assert spec.pooling == ("cls", "mean") and spec.dimensions == 64  # concatenated, in sentence-transformers' order
    assert spec.normalize is False and spec.max_length == 200 and spec.similarity_fn_name == "dot"
    assert spec.source == "sentence-transformers"


@pytest.mark.parametrize("files, message", [
    ({"modules.json": _modules("Transformer", "Pooling", "Dense", "Normalize")}, "Dense"),
    ({"modules.json": [{"idx": 0, "name": "0", "path": "0_Transformer",
                        "type": "sentence_transformers.models.Transformer"}]}, "0_Transformer"),
    ({"modules.json": _modules("Transformer", "Pooling"),
      "1_Pooling/config.json": {"pooling_mode": "attention"}}, "attention"),
    ({"config_sentence_transformers.json": {"prompts": {"query": "q: "}, "default_prompt_name": "doc"}}, "doc"),
])
def test_what_cannot_be_reproduced_is_refused(tmp_path: Path, files: dict, message: str):
    with pytest.raises(EmbeddingSpecError, match=message):
        read_embedding_spec(_write(tmp_path, files), _TOKENIZER, positions=512, hidden=32)


def test_prompts_resolve_as_encode_does(tmp_path: Path):
    _write(tmp_path, {"config_sentence_transformers.json": {"prompts": {"query": "q: ", "doc": "d: "},
                                                            "default_prompt_name": "query"}})
    spec = read_embedding_spec(tmp_path, _TOKENIZER, positions=512, hidden=32)
    assert spec.resolve_prompt() == "q: " and spec.resolve_prompt(prompt_name="doc") == "d: "
    assert spec.resolve_prompt(prompt="x: ", prompt_name="doc") == "x: " and spec.resolve_prompt(prompt="") == ""
    with pytest.raises(EmbeddingSpecError, match="nope"):
        spec.resolve_prompt(prompt_name="nope")


def test_do_lower_case_lower_cases_in_the_tokenizer(tmp_path: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()  # byte-level BPE is cased
    bpe.train_from_iterator(["Hello hello HELLO world"] * 4, vocab_size=280, min_frequency=1)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe)
    assert tokenizer("HELLO World")["input_ids"] != tokenizer("hello world")["input_ids"]
    _write(tmp_path, {"sentence_bert_config.json": {"max_seq_length": 64, "do_lower_case": True}})
    spec = read_embedding_spec(tmp_path, tokenizer, positions=128, hidden=32)
    assert spec.lower_case and tokenizer("HELLO World")["input_ids"] == tokenizer("hello world")["input_ids"]
