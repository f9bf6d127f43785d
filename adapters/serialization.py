"""Reading and writing adapters in PEFT's on-disk format, and in a single-file form.

PEFT directory:  adapter_config.json + adapter_model.safetensors (byte-compatible with PEFT).
Single file:     one .safetensors whose `__metadata__["adapter_config"]` holds the same JSON;
                 `pack_peft_dir` (or `python -m adapters.pack DIR OUT`) makes it from a directory.
Label names:     `__metadata__["labels"]`, a JSON list (`["paint", "tool"]`: output j is labels[j]), in
                 either form. PEFT ignores `__metadata__`, so the files still load in PeftModel. A JSON
                 object `__metadata__["id2label"]` ({"0": "paint", ...}, as in a transformers config) is
                 read too.

Nothing here unpickles. Before safetensors touches a buffer, its header is checked by hand: a header
length beyond the file or the configured limit, offsets outside the data, or sizes that disagree with
dtype x shape are refused, so a truncated, corrupted or hostile file gives an AdapterFormatError rather
than a crash, a hang or a huge allocation.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapters.config import LoraConfig
from adapters.errors import AdapterFormatError, AdapterTooLargeError, parse_json
from adapters.weights import LoraWeights

__all__ = [
    "CONFIG_NAME", "WEIGHTS_NAME", "METADATA_KEY", "load_peft_dir", "save_peft_dir", "load_single_file",
    "save_single_file", "weights_from_bytes", "single_file_from_bytes", "to_peft_bytes", "to_single_file_bytes",
    "check_safetensors_header", "looks_pickled", "PICKLE_SUFFIXES", "LABELS_KEY", "parse_labels", "pack_peft_dir",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
METADATA_KEY = "adapter_config"
LABELS_KEY = "labels"
_ID2LABEL_KEY = "id2label"
MAX_LABELS, MAX_LABEL_CHARS = 100_000, 1024  # far beyond any real classifier; bounds what a header can claim
MAX_HEADER_BYTES = 16 * 1024 * 1024  # safetensors' own limit is 100 MB; adapters need far less

_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def looks_pickled(data: bytes | memoryview) -> bool:
    """True for a torch.save zip or a raw pickle, False for anything that could be a safetensors file.

    The pickle opcode PROTO (0x80 0x02..0x05) is also how a safetensors header length of 640, 896, 1152...
    begins (little-endian), so those two bytes alone prove nothing: a safetensors file is recognised by
    its length prefix being followed, inside the buffer, by a JSON object."""
    head = bytes(data[:9])
    if head[:4] == b"PK\x03\x04":  # zip; as a header length it would be 67 MB, beyond any accepted header
        return True
    if len(head) < 2 or head[0] != 0x80 or head[1] not in (2, 3, 4, 5):
        return False
    if len(head) == 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        return 8 + header_len > len(data)
    return True


def check_safetensors_header(data: bytes | memoryview, *, max_header_bytes: int = MAX_HEADER_BYTES
                             ) -> tuple[dict, dict[str, str]]:
    """Validate a whole safetensors buffer's header; returns (tensor entries, metadata)."""
    size = len(data)
    if looks_pickled(data):
        raise AdapterFormatError("this is a pickle/torch.save file; only safetensors is accepted (never unpickled)")
    if size < 8:
        raise AdapterFormatError(f"safetensors file is truncated: {size} bytes, no header")
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    if header_len > max_header_bytes:
        raise AdapterTooLargeError(f"safetensors header claims {header_len} bytes (limit {max_header_bytes})")
    if 8 + header_len > size:
        raise AdapterFormatError(
            f"safetensors file is truncated: header claims {header_len} bytes, file has {size - 8}")
    header = parse_json(bytes(data[8:8 + header_len]), "safetensors header")
    if not isinstance(header, dict):
        raise AdapterFormatError("safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFormatError("safetensors __metadata__ must map strings to strings")
    data_len = size - 8 - header_len
    for key, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise AdapterFormatError(f"safetensors entry {key!r} is malformed", key=key)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _DTYPE_SIZES:
            raise AdapterFormatError(f"tensor {key!r} has unknown dtype {dtype!r}", key=key)
        if dtype not in _FLOAT_DTYPES:
            raise AdapterFormatError(f"tensor {key!r} has dtype {dtype}; adapters must be floating point", key=key)
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise AdapterFormatError(f"tensor {key!r} has an invalid shape {shape!r}", key=key)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise AdapterFormatError(f"tensor {key!r} has invalid data_offsets", key=key)
        begin, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= begin <= end <= data_len:
            raise AdapterFormatError(f"tensor {key!r} points outside the file (truncated?)", key=key)
        if end - begin != numel * _DTYPE_SIZES[dtype]:
            raise AdapterFormatError(f"tensor {key!r}: {end - begin} bytes for shape {shape} {dtype}", key=key)
    return header, metadata


def _load_tensors(data: bytes, max_header_bytes: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    _, metadata = check_safetensors_header(data, max_header_bytes=max_header_bytes)
    try:
        tensors = st_load(bytes(data))
    except Exception as exc:  # safetensors raises its own SafetensorError for anything we missed
        raise AdapterFormatError(f"cannot read safetensors data: {exc}") from exc
    return tensors, metadata


# ------------------------------------------------------------------------- label names
def parse_labels(value: str | bytes | list | dict) -> list[str]:
    """Label names from a JSON list (["paint", "tool"]) or an id2label object ({"0": "paint", "1": "tool"}),
    as text or already parsed; AdapterFormatError naming "labels" unless they are distinct, non-empty strings."""
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise AdapterFormatError(f"labels must be a JSON list of strings: {exc}", key=LABELS_KEY) from None
    if isinstance(value, dict):  # id2label: every id from 0 to n-1, exactly once
        try:
            ids = {int(k): v for k, v in value.items()}
        except (TypeError, ValueError):
            raise AdapterFormatError("id2label keys must be the integers 0..n-1", key=LABELS_KEY) from None
        if sorted(ids) != list(range(len(ids))):
            raise AdapterFormatError("id2label keys must be the integers 0..n-1", key=LABELS_KEY)
        value = [ids[i] for i in range(len(ids))]
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_LABELS:
        raise AdapterFormatError(f"labels must be a JSON list of 1 to {MAX_LABELS} strings", key=LABELS_KEY)
    if not all(isinstance(v, str) and 0 < len(v) <= MAX_LABEL_CHARS for v in value):
        raise AdapterFormatError(f"labels must be non-empty strings of at most {MAX_LABEL_CHARS} characters",
                                 key=LABELS_KEY)
    if len(set(value)) != len(value):
        raise AdapterFormatError("labels must be distinct", key=LABELS_KEY)
    return list(value)


def _labels_from(metadata: dict[str, str]) -> list[str] | None:
    if LABELS_KEY in metadata:
        return parse_labels(metadata[LABELS_KEY])
    if _ID2LABEL_KEY in metadata:
        return parse_labels(metadata[_ID2LABEL_KEY])
    return None


def _metadata(weights: LoraWeights, **extra: str) -> dict[str, str]:
    metadata = {"format": "pt", **extra}  # "format": "pt" is what PEFT's save_pretrained writes
    if weights.labels is not None:
        metadata[LABELS_KEY] = json.dumps(weights.labels, ensure_ascii=False)
    return metadata


# ------------------------------------------------------------------------- from bytes (uploads)
def weights_from_bytes(config_bytes: bytes | str, model_bytes: bytes, *,
                       max_header_bytes: int = MAX_HEADER_BYTES) -> LoraWeights:
    """A PEFT directory's two files, as bytes."""
    config = LoraConfig.from_json(config_bytes)
    tensors, metadata = _load_tensors(model_bytes, max_header_bytes)
    weights = LoraWeights.from_state_dict(config, tensors)
    weights.labels = _labels_from(metadata)
    return weights


def single_file_from_bytes(data: bytes, *, max_header_bytes: int = MAX_HEADER_BYTES) -> LoraWeights:
    tensors, metadata = _load_tensors(data, max_header_bytes)
    if METADATA_KEY not in metadata:
        raise AdapterFormatError(f"single-file adapter has no __metadata__[{METADATA_KEY!r}] holding its config")
    weights = LoraWeights.from_state_dict(LoraConfig.from_json(metadata[METADATA_KEY]), tensors)
    weights.labels = _labels_from(metadata)
    return weights


def to_peft_bytes(weights: LoraWeights) -> tuple[bytes, bytes]:
    return weights.config.to_json().encode(), _save(weights.to_state_dict(), _metadata(weights))


def to_single_file_bytes(weights: LoraWeights) -> bytes:
    return _save(weights.to_state_dict(), _metadata(weights, **{METADATA_KEY: weights.config.to_json()}))


def _save(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with `__metadata__` in sorted key order. safetensors writes it from a hash map, in an
    order that changes from one call to the next, and the store names canonical bytes by their sha256."""
    data = st_save(tensors, metadata=metadata)
    if len(metadata) < 2:
        return data
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])  # a dict keeps the tensors' order, which is already fixed
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # as safetensors pads it: the tensor data stays 8-byte aligned
    return struct.pack("<Q", len(text)) + text + data[8 + header_len:]


# ------------------------------------------------------------------------- files
def load_peft_dir(path: str | os.PathLike, *, max_header_bytes: int = MAX_HEADER_BYTES) -> LoraWeights:
    path = Path(path)
    if path.is_file():
        return load_single_file(path, max_header_bytes=max_header_bytes)
    weights_file = path / WEIGHTS_NAME
    if not weights_file.exists():
        pickled = [p.name for p in path.glob("*") if p.suffix in PICKLE_SUFFIXES]
        if pickled:
            raise AdapterFormatError(
                f"{pickled[0]} is a pickle file; only {WEIGHTS_NAME} is accepted (never unpickled)")
        raise AdapterFormatError(f"{path} has no {WEIGHTS_NAME}")
    if not (path / CONFIG_NAME).exists():
        raise AdapterFormatError(f"{path} has no {CONFIG_NAME}")
    return weights_from_bytes((path / CONFIG_NAME).read_bytes(), weights_file.read_bytes(),
                              max_header_bytes=max_header_bytes)


def load_single_file(path: str | os.PathLike, *, max_header_bytes: int = MAX_HEADER_BYTES) -> LoraWeights:
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise AdapterFormatError(f"{path.name} is a pickle file; only safetensors is accepted (never unpickled)")
    return single_file_from_bytes(path.read_bytes(), max_header_bytes=max_header_bytes)


def save_peft_dir(weights: LoraWeights, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config_bytes, model_bytes = to_peft_bytes(weights)
    (path / CONFIG_NAME).write_bytes(config_bytes)
    (path / WEIGHTS_NAME).write_bytes(model_bytes)
    return path


def save_single_file(weights: LoraWeights, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.write_bytes(to_single_file_bytes(weights))
    return path


def pack_peft_dir(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A PEFT directory (what save_pretrained or lora-train wrote) as one single-file .safetensors."""
    return save_single_file(load_peft_dir(src), out)
