"""PEFT directory and single-file forms; hostile and broken bytes are refused before anything is built."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from lora_fixtures import make_gpt2, random_weights
from safetensors.torch import save as st_save

from adapters import (
    AdapterFormatError,
    AdapterTooLargeError,
    LoraWeights,
    load_peft_dir,
    load_single_file,
    save_peft_dir,
    save_single_file,
    single_file_from_bytes,
    to_peft_bytes,
    to_single_file_bytes,
    weights_from_bytes,
)
from adapters.serialization import CONFIG_NAME, METADATA_KEY, WEIGHTS_NAME


@pytest.fixture
def weights() -> LoraWeights:
    w = random_weights(make_gpt2(), 1, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], use_rslora=True,
                       rank_pattern={"h.1.mlp.c_fc": 2}, alpha_pattern={"c_attn": 3.0},
                       modules_to_save=["score"])
    w.modules_to_save = {"score.weight": torch.randn(2, 32)}
    return w


def _assert_same(a: LoraWeights, b: LoraWeights) -> None:
    assert a.config == b.config
    assert a.lora.keys() == b.lora.keys() and a.modules_to_save.keys() == b.modules_to_save.keys()
    for path in a.lora:
        assert all(torch.equal(x, y) for x, y in zip(a.lora[path], b.lora[path], strict=True))
    assert all(torch.equal(a.modules_to_save[k], b.modules_to_save[k]) for k in a.modules_to_save)


def test_peft_dir_round_trip(weights, tmp_path):
    save_peft_dir(weights, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    _assert_same(load_peft_dir(tmp_path), weights)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert list(config["alpha_pattern"]) == ["c_attn"] and config["rank_pattern"] == {"h.1.mlp.c_fc": 2}


def test_modules_to_save_are_full_tensors_under_their_module_path(weights):
    _, data = to_peft_bytes(weights)
    header = _header(data)
    assert header["base_model.model.score.weight"]["shape"] == [2, 32]
    assert "base_model.model.transformer.h.1.mlp.c_fc.lora_A.weight" in header


def test_single_file_round_trip(weights, tmp_path):
    data = to_single_file_bytes(weights)
    assert METADATA_KEY in _header(data)["__metadata__"]
    _assert_same(single_file_from_bytes(data), weights)
    path = save_single_file(weights, tmp_path / "adapter.safetensors")
    _assert_same(load_single_file(path), weights)
    _assert_same(load_peft_dir(path), weights)  # a file path is read as the single-file form


def test_bytes_round_trip(weights):
    _assert_same(weights_from_bytes(*to_peft_bytes(weights)), weights)


def test_rank_pattern_order_survives_saving():
    """The first matching pattern wins, so saving must not reorder them (json sort_keys would)."""
    w = random_weights(make_gpt2(), 1, r=4, lora_alpha=8, target_modules=["c_attn"],
                       rank_pattern={"h.1.attn.c_attn": 2, "c_attn": 3}, alpha_pattern={"z.*": 1.0, "c_attn": 5.0})
    back = weights_from_bytes(*to_peft_bytes(w))
    assert list(back.config.rank_pattern) == ["h.1.attn.c_attn", "c_attn"]
    assert list(back.config.alpha_pattern) == ["z.*", "c_attn"]
    assert back.config.rank_for("transformer.h.1.attn.c_attn") == 2


# ------------------------------------------------------------------------------------------ never unpickle
class _Boom:
    """Unpickling this writes a marker file: proof of whether anything was unpickled."""

    marker: Path

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled!"))


def _hostile_pickles(tmp_path: Path) -> dict[str, bytes]:
    _Boom.marker = tmp_path / "UNPICKLED"
    obj = {"base_model.model.x.lora_A.weight": _Boom()}
    zipped = tmp_path / "zip.bin"
    torch.save(obj, zipped)  # torch.save's zip format
    return {"zip": zipped.read_bytes(), **{f"proto{p}": pickle.dumps(obj, protocol=p) for p in (2, 3, 4, 5)}}


def test_pickle_bytes_are_refused_without_unpickling(weights, tmp_path):
    config, _ = to_peft_bytes(weights)
    for kind, data in _hostile_pickles(tmp_path).items():
        with pytest.raises(AdapterFormatError, match="pickle"):
            weights_from_bytes(config, data)
        with pytest.raises(AdapterFormatError):
            single_file_from_bytes(data)
        assert not (tmp_path / "UNPICKLED").exists(), kind


def test_bin_adapter_files_are_refused(weights, tmp_path):
    data = _hostile_pickles(tmp_path)["zip"]
    adapter = tmp_path / "peft_bin"
    adapter.mkdir()
    (adapter / CONFIG_NAME).write_bytes(to_peft_bytes(weights)[0])
    (adapter / "adapter_model.bin").write_bytes(data)
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.bin is a pickle"):
        load_peft_dir(adapter)
    (tmp_path / "a.bin").write_bytes(data)
    with pytest.raises(AdapterFormatError, match="pickle"):
        load_single_file(tmp_path / "a.bin")
    assert not (tmp_path / "UNPICKLED").exists()


# ------------------------------------------------------------------------------------------ broken files
def _header(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n])


def _with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.mark.parametrize("cut", [0, 5, 20, -1, -100])
def test_truncated_safetensors(weights, cut):
    config, data = to_peft_bytes(weights)
    with pytest.raises(AdapterFormatError, match="truncated|outside the file"):
        weights_from_bytes(config, data[:cut])


def test_corrupted_header(weights):
    config, data = to_peft_bytes(weights)
    (n,) = struct.unpack("<Q", data[:8])
    garbage = data[:8] + b"\xff" * n + data[8 + n:]
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        weights_from_bytes(config, garbage)
    header = _header(data)
    body = data[8 + n:]
    key = next(k for k in header if k != "__metadata__")
    for broken in (
        {**header, key: {**header[key], "shape": [1, 2, 3]}},  # size disagrees with dtype x shape
        {**header, key: {**header[key], "data_offsets": [0, 10**12]}},  # points outside the data
        {**header, key: {**header[key], "dtype": "Q9"}},  # unknown dtype
        {**header, key: "nonsense"},
        ["not", "an", "object"],
    ):
        with pytest.raises(AdapterFormatError):
            weights_from_bytes(config, _with_header(broken, body))


def test_header_claiming_gigabytes_neither_allocates_nor_hangs(weights):
    """Refused from the header alone: the peak allocation stays far below what the claims would need."""
    import tracemalloc

    config, data = to_peft_bytes(weights)
    # A tensor entry claiming 16 GB inside a small file.
    huge = {"base_model.model.x.lora_A.weight": {"dtype": "F32", "shape": [2**16, 2**16], "data_offsets": [0, 2**34]}}
    tracemalloc.start()
    try:
        for claim in (2**33, 2**63):
            with pytest.raises(AdapterTooLargeError, match="header claims"):
                weights_from_bytes(config, struct.pack("<Q", claim) + data[8:])
        with pytest.raises(AdapterFormatError, match="outside the file"):
            weights_from_bytes(config, _with_header(huge, b"\0" * 64))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * len(data) + (1 << 20)


def test_integer_tensor_is_refused_naming_the_key(weights):
    config, _ = to_peft_bytes(weights)
    data = st_save({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.ones(4, 32, dtype=torch.int32),
                    "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": torch.ones(96, 4)})
    with pytest.raises(AdapterFormatError, match="floating point") as err:
        weights_from_bytes(config, data)
    assert err.value.key == "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"


def test_single_file_without_config_metadata(weights):
    with pytest.raises(AdapterFormatError, match="__metadata__"):
        single_file_from_bytes(st_save(weights.to_state_dict()))


def test_missing_files(tmp_path):
    with pytest.raises(AdapterFormatError, match=WEIGHTS_NAME):
        load_peft_dir(tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"")
    with pytest.raises(AdapterFormatError, match=CONFIG_NAME):
        load_peft_dir(tmp_path)


@pytest.mark.parametrize("config", [b"[1, 2]", b'{"r": "8"}', b"{not json", b"\xff\xfe", b'{"target_modules": 5}'])
def test_wrong_config_type_in_bytes(weights, config):
    _, data = to_peft_bytes(weights)
    with pytest.raises(AdapterFormatError):
        weights_from_bytes(config, data)


@pytest.mark.parametrize("header_len", [640, 896, 1152, 1408, 19280])
def test_header_lengths_that_start_like_a_pickle_opcode_still_load(header_len):
    """A header length of 640 is b"\\x80\\x02..." little-endian, the pickle PROTO opcode, and 19280 is b"PK...",
    a zip's first two bytes; both are valid safetensors files."""
    from adapters.serialization import looks_pickled

    a, b = torch.ones(2, 4), torch.full((3, 2), 2.0)
    header = {"__metadata__": {METADATA_KEY: '{"r": 2, "target_modules": ["q"]}'},
              "base_model.model.enc.q.lora_A.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
              "base_model.model.enc.q.lora_B.weight": {"dtype": "F32", "shape": [3, 2], "data_offsets": [32, 56]}}
    text = json.dumps(header).encode()
    data = struct.pack("<Q", header_len) + text.ljust(header_len) + a.numpy().tobytes() + b.numpy().tobytes()
    assert data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK") and not looks_pickled(data)
    w = single_file_from_bytes(data)
    assert torch.equal(w.lora["enc.q"][0], a) and torch.equal(w.lora["enc.q"][1], b)


def test_pickles_and_zips_are_still_recognised():
    from adapters.serialization import looks_pickled

    assert looks_pickled(pickle.dumps({"a": 1}, protocol=2)) and looks_pickled(pickle.dumps([1] * 300, protocol=4))
    assert looks_pickled(b"PK\x03\x04" + b"\0" * 100)
    assert not looks_pickled(b"PKxx") and not looks_pickled(b"")


# ---------------------------------------------------------------------------------------- label names
def test_labels_travel_in_the_safetensors_metadata_of_both_forms(weights, tmp_path):
    weights.labels = ["paint", "tool"]
    config_bytes, model_bytes = to_peft_bytes(weights)
    assert _header(model_bytes)["__metadata__"]["labels"] == '["paint", "tool"]'
    assert json.loads(config_bytes).keys().isdisjoint({"labels", "id2label"})  # PEFT's config stays PEFT's
    assert weights_from_bytes(config_bytes, model_bytes).labels == ["paint", "tool"]
    assert single_file_from_bytes(to_single_file_bytes(weights)).labels == ["paint", "tool"]
    assert load_peft_dir(save_peft_dir(weights, tmp_path / "d")).labels == ["paint", "tool"]
    weights.labels = None  # no names: the bytes are what they were before labels existed
    assert "labels" not in _header(to_peft_bytes(weights)[1])["__metadata__"]


def test_id2label_metadata_is_read_and_bad_labels_are_refused(weights):
    config_bytes, model_bytes = to_peft_bytes(weights)
    tensors = weights.to_state_dict()
    as_id2label = st_save(tensors, metadata={"format": "pt", "id2label": '{"1": "tool", "0": "paint"}'})
    assert weights_from_bytes(config_bytes, as_id2label).labels == ["paint", "tool"]
    for bad in ('"paint"', '["paint", "paint"]', '["paint", ""]', "[1, 2]", "[]", "{oops", '{"0": "a", "2": "b"}'):
        with pytest.raises(AdapterFormatError) as info:
            weights_from_bytes(config_bytes, st_save(tensors, metadata={"format": "pt", "labels": bad}))
        assert info.value.key == "labels", bad


def test_pack_makes_the_single_file_form_of_a_directory(weights, tmp_path, capsys):
    from adapters.pack import main

    weights.labels = ["paint", "tool"]
    save_peft_dir(weights, tmp_path / "d")
    assert main([str(tmp_path / "d"), str(tmp_path / "one.safetensors")]) == 0
    packed = load_single_file(tmp_path / "one.safetensors")
    _assert_same(packed, weights)
    assert packed.labels == ["paint", "tool"]
    assert (tmp_path / "one.safetensors").read_bytes() == to_single_file_bytes(weights)
    assert main([str(tmp_path / "missing"), str(tmp_path / "x.safetensors")]) == 2
    assert "has no adapter_model.safetensors" in capsys.readouterr().err
