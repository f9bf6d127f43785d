"""/v1/embeddings equals `SentenceTransformer(dir).encode(texts)` (max abs difference 1e-5), on inputs of every
length: the packaged all-MiniLM-L6-v2 with and without a PEFT adapter, and tiny checkpoints saved by
sentence-transformers itself with CLS pooling (and prompts), mean pooling that excludes its prompt, and
last-token pooling on a left-padded decoder. `GET /v1/models/base` reports what was honoured."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from http_testkit import ADMIN_KEY, bearer, build_bert, make_adapter, make_settings, peft_files

from adapters import to_peft_bytes
from service.app import create_app
from service.base_model import default_base_model

st = pytest.importorskip("sentence_transformers")
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer  # noqa: E402

_WORDS = ("The quick brown fox jumps over the lazy dog while seven LoRA adapters share one frozen base model; "
          "embeddings must match the reference implementation token for token. ").split()
MINILM_TARGETS = {f"encoder.layer.{i}.attention.self.{m}": (384, 384) for i in range(6) for m in ("query", "value")}


def _text(words: int) -> str:
    return " ".join(_WORDS[i % len(_WORDS)] for i in range(words))


# short, ~40, ~300 tokens (between sentence-transformers' 256 and the model's 512), > 512 tokens
TEXTS = ["hello", "Hello World!", _text(40), _text(300), _text(700)]


def _serve(path: Path, store: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(path, store)), headers=bearer(ADMIN_KEY)) as client:
        yield client


def _ours(client: TestClient, model: str = "base", texts: list[str] = TEXTS, **extra) -> np.ndarray:
    r = client.post("/v1/embeddings", json={"model": model, "input": texts, **extra})
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]])


def _assert_parity(ours: np.ndarray, reference: np.ndarray) -> None:
    assert ours.shape == reference.shape
    worst = np.abs(ours - reference).max(axis=1)  # per text
    assert worst.max() <= 1e-5, f"max abs difference per text: {worst}"


# ------------------------------------------------------------------------------------------------ MiniLM
@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Iterator[TestClient]:
    yield from _serve(Path(default_base_model()), tmp_path_factory.mktemp("minilm-store"))


@pytest.fixture(scope="module")
def minilm_st():
    return st.SentenceTransformer(default_base_model(), device="cpu")


def test_minilm_matches_sentence_transformers(minilm: TestClient, minilm_st):
    _assert_parity(_ours(minilm), minilm_st.encode(TEXTS))


def test_minilm_truncates_at_its_max_seq_length(minilm: TestClient):
    r = minilm.post("/v1/embeddings", json={"model": "base", "input": [_text(700)]})
    assert r.json()["usage"]["prompt_tokens"] == 256  # sentence_bert_config.json, not the 512 positions


def test_minilm_with_a_peft_adapter_matches(minilm: TestClient, tmp_path: Path):
    weights = make_adapter(MINILM_TARGETS, rank=4, seed=5, scale=0.1)
    assert minilm.put("/v1/adapters/parity", files=peft_files(weights)).status_code == 201
    config, tensors = to_peft_bytes(weights)
    (tmp_path / "adapter_config.json").write_bytes(config)
    (tmp_path / "adapter_model.safetensors").write_bytes(tensors)
    reference = st.SentenceTransformer(default_base_model(), device="cpu")
    reference.load_adapter(str(tmp_path))
    expected = reference.encode(TEXTS)
    ours = _ours(minilm, "parity")
    _assert_parity(ours, expected)
    assert np.abs(ours - _ours(minilm)).max() > 1e-2  # the adapter really changes the embeddings


def test_minilm_model_card_reports_the_embedding(minilm: TestClient):
    for model in ("base", "parity"):
        card = minilm.get(f"/v1/models/{model}")
        if card.status_code == 404:  # the adapter test did not run first
            continue
        emb = card.json()["embedding"]
        assert emb["pooling"] == ["mean"] and emb["max_length"] == 256 and emb["normalize"] is True
        assert emb["similarity_fn_name"] == "cosine" and emb["dimensions"] == 384 and emb["lower_case"] is False
        assert card.json()["object"] == "model" and card.json()["root"] == "all-MiniLM-L6-v2"


# ------------------------------------------------------------------------------------------------ tiny models
def _save_st(transformer_dir: Path, out: Path, pooling: str, *, normalize: bool = True, max_length: int | None = None,
             include_prompt: bool = True, prompts: dict[str, str] | None = None, default_prompt: str | None = None):
    transformer = Transformer(str(transformer_dir))
    if max_length is not None:
        transformer.max_seq_length = max_length
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling,
                                    include_prompt=include_prompt)]
    model = st.SentenceTransformer(modules=modules + ([Normalize()] if normalize else []), device="cpu",
                                   prompts=prompts, default_prompt_name=default_prompt)
    model.save(str(out))
    return st.SentenceTransformer(str(out), device="cpu")  # the reference reads the saved files, as we do


def _build_decoder(path: Path) -> Path:
    """A tiny Qwen2Model (rotary positions, causal) with a byte-level BPE that pads on the left."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2Model

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([_text(200)] * 2, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        padding_side="left")
    torch.manual_seed(3)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=96)
    Qwen2Model(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("st-models")
    bert, decoder = build_bert(root / "bert"), _build_decoder(root / "qwen2")
    return {"bert": bert, "decoder": decoder, "root": root}


def test_cls_pooling_with_prompts_matches(tiny_dirs, tmp_path: Path):
    prompts = {"query": "query: ", "passage": "passage: "}
    reference = _save_st(tiny_dirs["bert"], tmp_path / "cls", "cls", max_length=48, prompts=prompts,
                         default_prompt="query")
    for client in _serve(tmp_path / "cls", tmp_path / "store"):
        _assert_parity(_ours(client), reference.encode(TEXTS))  # the default prompt, as encode applies it
        _assert_parity(_ours(client, prompt_name="passage"), reference.encode(TEXTS, prompt_name="passage"))
        _assert_parity(_ours(client, prompt="Represent: "), reference.encode(TEXTS, prompt="Represent: "))
        assert client.post("/v1/embeddings", json={"model": "base", "input": "x", "prompt_name": "nope"}
                           ).status_code == 400
        emb = client.get("/v1/models/base").json()["embedding"]
        assert emb["pooling"] == ["cls"] and emb["max_length"] == 48 and emb["normalize"] is True
        assert emb["prompts"].items() >= prompts.items() and emb["default_prompt_name"] == "query"


def test_mean_pooling_that_excludes_its_prompt_matches(tiny_dirs, tmp_path: Path):
    reference = _save_st(tiny_dirs["bert"], tmp_path / "mean", "mean", normalize=False, include_prompt=False,
                         prompts={"query": "Represent this sentence for retrieval: "}, default_prompt="query")
    for client in _serve(tmp_path / "mean", tmp_path / "store"):
        _assert_parity(_ours(client), reference.encode(TEXTS))
        assert client.get("/v1/models/base").json()["embedding"]["normalize"] is False


def test_last_token_pooling_on_a_left_padded_decoder_matches(tiny_dirs, tmp_path: Path):
    reference = _save_st(tiny_dirs["decoder"], tmp_path / "last", "lasttoken")
    assert reference.tokenizer.padding_side == "left"
    for client in _serve(tmp_path / "last", tmp_path / "store"):
        _assert_parity(_ours(client), reference.encode(TEXTS))
        emb = client.get("/v1/models/base").json()["embedding"]
        assert emb["pooling"] == ["lasttoken"] and emb["max_length"] == 96


def test_legacy_max_seq_length_and_do_lower_case_match(tiny_dirs, tmp_path: Path):
    """Older sentence-transformers wrote both into sentence_bert_config.json; the byte-level BPE is cased."""
    _save_st(tiny_dirs["decoder"], tmp_path / "lower", "mean")
    config = tmp_path / "lower" / "sentence_bert_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_seq_length": 40, "do_lower_case": True}))
    reference = st.SentenceTransformer(str(tmp_path / "lower"), device="cpu")
    texts = [*TEXTS, "HELLO WORLD!", "The LoRA"]
    for client in _serve(tmp_path / "lower", tmp_path / "store"):
        ours = _ours(client, texts=texts)
        _assert_parity(ours, reference.encode(texts))
        assert np.abs(ours[-2] - _ours(client, texts=["hello world!"])[0]).max() <= 1e-6  # lower-cased first
        emb = client.get("/v1/models/base").json()["embedding"]
        assert emb["max_length"] == 40 and emb["lower_case"] is True
