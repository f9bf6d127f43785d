"""Reading an adapter upload: a size-capped body, then a multipart form parsed from it, then tensors.

The cap is enforced while the body streams in: a `Content-Length` above it is refused before a byte
is read, and a chunked or lying body is cut off as soon as the running total passes it (413). Only
then is the multipart parsed (python-multipart's parser, from memory), so Starlette never spools an
unbounded body to disk. Two forms are accepted:

    adapter_config.json + adapter_model.safetensors    a PEFT directory's two files
    adapter                                            the single-file safetensors form
    labels (optional, either form)                     a JSON list of label names; overrides the files' own

The two PEFT files are recognised by their field name or by the part's filename, so posting every file
of a directory as `save_pretrained` writes it (`-F file=@dir/README.md -F file=@dir/adapter_config.json
...`) works: other text files (README.md, *.txt, *.json, ...) are ignored. Pickle files
(`adapter_model.bin`, `.pt`, ...) are refused with 415 and never unpickled.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from adapters import LoraWeights, single_file_from_bytes, weights_from_bytes
from adapters.serialization import CONFIG_NAME, PICKLE_SUFFIXES, WEIGHTS_NAME, looks_pickled, parse_labels
from service.errors import BadRequest, PayloadTooLarge, Unprocessable, UnsupportedMediaType

__all__ = ["content_boundary", "read_capped_body", "parse_multipart", "weights_from_form", "read_adapter_upload",
           "SINGLE_FIELD", "LABELS_FIELD", "Part", "check_label_count"]

SINGLE_FIELD = "adapter"
LABELS_FIELD = "labels"
_ROLES = (CONFIG_NAME, WEIGHTS_NAME, SINGLE_FIELD, LABELS_FIELD)
# Companions a saved adapter directory holds (save_pretrained's README.md, lora-train's training_report.json).
_IGNORED_SUFFIXES = (".md", ".txt", ".json", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".rst")
_MAX_PARTS = 16
_MAX_BOUNDARY = 70  # RFC 2046, section 5.1.1


def content_boundary(request: Request) -> bytes:
    """The multipart boundary; 415 for any other content type, or for a compressed body (a Content-Encoding
    we would otherwise ignore, storing the compressed bytes as if they were the files)."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported for uploads; send the files "
                                   "uncompressed (safetensors is not worth compressing)")
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data":
        raise UnsupportedMediaType(f"uploads must be multipart/form-data, got {ctype.decode() or 'no content type'!r}"
                                   f"; send the fields {CONFIG_NAME!r} and {WEIGHTS_NAME!r}, or {SINGLE_FIELD!r}")
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("multipart/form-data without a boundary")
    if len(boundary) > _MAX_BOUNDARY:
        raise BadRequest(f"multipart boundary of {len(boundary)} characters; RFC 2046 allows at most {_MAX_BOUNDARY}")
    return boundary


async def read_capped_body(request: Request, limit: int) -> bytes:
    """The whole body, or 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadRequest(f"invalid Content-Length {declared!r}") from None
        if size > limit:
            raise PayloadTooLarge(f"upload of {size} bytes exceeds the limit of {limit} bytes (max_upload_bytes)")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise PayloadTooLarge(f"upload exceeds the limit of {limit} bytes (max_upload_bytes)")
    except ClientDisconnect:
        raise BadRequest("the client disconnected during the upload") from None
    return bytes(body)


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)

    def disposition(self) -> tuple[str | None, str | None]:
        kind, params = parse_options_header(self.headers.get("content-disposition", ""))
        if kind != b"form-data":
            return None, None
        name, filename = params.get(b"name"), params.get(b"filename")
        return (name.decode("utf-8", "replace") if name is not None else None,
                filename.decode("utf-8", "replace") if filename is not None else None)


class Part(NamedTuple):
    name: str
    filename: str | None
    data: bytes


def parse_multipart(body: bytes, boundary: bytes) -> list[Part]:
    """The form's parts in order; 400 on a malformed or truncated form. A field name may repeat (curl -F
    file=@a -F file=@b): which part is which file is decided by `weights_from_form`."""
    parts: list[_Part] = []
    header_field, header_value = bytearray(), bytearray()
    ended = False

    def on_part_begin() -> None:
        if len(parts) >= _MAX_PARTS:
            raise BadRequest(f"too many form fields (at most {_MAX_PARTS})")
        parts.append(_Part())

    def on_header_end() -> None:
        parts[-1].headers[header_field.decode("latin-1").lower()] = header_value.decode("latin-1")
        header_field.clear()
        header_value.clear()

    def on_end() -> None:
        nonlocal ended
        ended = True

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_part_data": lambda data, start, end: parts[-1].data.extend(data[start:end]),
        "on_header_field": lambda data, start, end: header_field.extend(data[start:end]),
        "on_header_value": lambda data, start, end: header_value.extend(data[start:end]),
        "on_header_end": on_header_end,
        "on_end": on_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except (MultipartParseError, FormParserError) as exc:
        raise BadRequest(f"malformed multipart body: {exc}") from None
    if not ended:
        raise BadRequest("truncated multipart body (no closing boundary)")
    fields: list[Part] = []
    for part in parts:
        name, filename = part.disposition()
        if name is None:
            raise BadRequest("a multipart part has no Content-Disposition: form-data; name=...")
        fields.append(Part(name, filename, bytes(part.data)))
    return fields


def _basename(filename: str | None) -> str:
    return (filename or "").replace("\\", "/").rsplit("/", 1)[-1]


def _refuse_pickle(parts: list[Part]) -> None:
    for name, filename, data in parts:
        names = [name, _basename(filename)]
        if any(n.lower().endswith(PICKLE_SUFFIXES) for n in names if n) or looks_pickled(data):
            raise UnsupportedMediaType(f"part {filename or name!r} holds a pickle/torch.save file; only safetensors "
                                       f"is accepted (send {WEIGHTS_NAME!r}; pickles are never unpickled)", key=name)


def _role(part: Part) -> str | None:
    """Which of our inputs a part is: by field name, else by filename (curl -F file=@dir/adapter_config.json)."""
    if part.name in _ROLES:
        return part.name
    base = _basename(part.filename)
    return base if base in (CONFIG_NAME, WEIGHTS_NAME) else None


def _sort_parts(parts: list[Part]) -> dict[str, bytes]:
    """{role: bytes}; ignores harmless text companions, 400 for anything else unknown or a role given twice."""
    found: dict[str, bytes] = {}
    for part in parts:
        role = _role(part)
        if role is None:
            label = _basename(part.filename) or part.name
            if label.lower().endswith(_IGNORED_SUFFIXES):
                continue  # README.md, training_report.json, ...: not ours, and harmless
            raise BadRequest(f"unexpected form part {label!r}: send {CONFIG_NAME!r} and {WEIGHTS_NAME!r} (as field "
                             f"names or filenames), or {SINGLE_FIELD!r}; text files (.md, .txt, .json) are ignored",
                             key=part.name)
        if role in found:
            raise BadRequest(f"the form holds {role!r} twice", key=role)
        found[role] = part.data
    return found


def weights_from_form(parts: Iterable[Part] | Mapping[str, tuple[str | None, bytes]]) -> LoraWeights:
    """The adapter in the form; AdapterError (422) when its files are not a valid adapter. A `labels` part
    (a JSON list) replaces the label names the files carry."""
    if isinstance(parts, Mapping):  # {field name: (filename, bytes)}
        parts = [Part(name, filename, data) for name, (filename, data) in parts.items()]
    parts = list(parts)
    _refuse_pickle(parts)
    found = _sort_parts(parts)
    files = set(found) - {LABELS_FIELD}
    if files == {SINGLE_FIELD}:
        weights = single_file_from_bytes(found[SINGLE_FIELD])
    elif files == {CONFIG_NAME, WEIGHTS_NAME}:
        weights = weights_from_bytes(found[CONFIG_NAME], found[WEIGHTS_NAME])
    else:
        missing = sorted({CONFIG_NAME, WEIGHTS_NAME} - files) if SINGLE_FIELD not in files else []
        raise BadRequest(f"the form must hold either {CONFIG_NAME!r} and {WEIGHTS_NAME!r} (a PEFT directory, as field "
                         f"names or filenames) or the one field {SINGLE_FIELD!r} (single-file safetensors); got "
                         f"{sorted(files)}" + (f", missing {missing}" if missing and files else ""))
    if LABELS_FIELD in found:
        weights.labels = parse_labels(found[LABELS_FIELD])
    return weights


def check_label_count(weights: LoraWeights, base_labels: list[str] | None) -> None:
    """On a classifier base every adapter answers with the base's outputs, so its label names must name them
    all (an adapter's own head is checked against its names in validation)."""
    if weights.labels is not None and base_labels is not None and len(weights.labels) != len(base_labels):
        raise Unprocessable(f"labels: {len(weights.labels)} names, but the base model classifies into "
                            f"{len(base_labels)} labels", key=LABELS_FIELD)


async def read_adapter_upload(request: Request, boundary: bytes, limit: int) -> LoraWeights:
    """Size cap (413), form (400), files (415 for pickles, 422): the upload, parsed into tensors."""
    body = await read_capped_body(request, limit)
    return await run_in_threadpool(lambda: weights_from_form(parse_multipart(body, boundary)))
