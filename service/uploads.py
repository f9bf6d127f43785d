"""Reading an adapter upload: a size-capped body, then a multipart form parsed from it, then tensors.

The cap is enforced while the body streams in: a `Content-Length` above it is refused before a byte
is read, and a chunked or lying body is cut off as soon as the running total passes it (413). Only
then is the multipart parsed (python-multipart's parser, from memory), so Starlette never spools an
unbounded body to disk. Two forms are accepted:

    adapter_config.json + adapter_model.safetensors    a PEFT directory's two files
    adapter                                            the single-file safetensors form

Pickle files (`adapter_model.bin`, `.pt`, ...) are refused with 415 and never unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from adapters import LoraWeights, single_file_from_bytes, weights_from_bytes
from adapters.serialization import CONFIG_NAME, PICKLE_SUFFIXES, WEIGHTS_NAME, looks_pickled
from service.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

__all__ = ["content_boundary", "read_capped_body", "parse_multipart", "weights_from_form", "read_adapter_upload",
           "SINGLE_FIELD"]

SINGLE_FIELD = "adapter"
_MAX_PARTS = 8
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


def parse_multipart(body: bytes, boundary: bytes) -> dict[str, tuple[str | None, bytes]]:
    """{field name: (filename, bytes)}; 400 on a malformed or truncated form or a repeated field."""
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
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in parts:
        name, filename = part.disposition()
        if name is None:
            raise BadRequest("a multipart part has no Content-Disposition: form-data; name=...")
        if name in fields:
            raise BadRequest(f"the form field {name!r} appears twice")
        fields[name] = (filename, bytes(part.data))
    return fields


def _refuse_pickle(fields: dict[str, tuple[str | None, bytes]]) -> None:
    for name, (filename, data) in fields.items():
        labels = [name] + ([filename] if filename else [])
        if any(label.lower().endswith(PICKLE_SUFFIXES) for label in labels) or looks_pickled(data):
            raise UnsupportedMediaType(f"field {name!r} holds a pickle/torch.save file; only safetensors is accepted "
                                       f"(send {WEIGHTS_NAME!r}; pickles are never unpickled)", key=name)


def weights_from_form(fields: dict[str, tuple[str | None, bytes]]) -> LoraWeights:
    """The adapter in the form; AdapterError (422) when its files are not a valid adapter."""
    _refuse_pickle(fields)
    names = set(fields)
    if names == {SINGLE_FIELD}:
        return single_file_from_bytes(fields[SINGLE_FIELD][1])
    if names == {CONFIG_NAME, WEIGHTS_NAME}:
        return weights_from_bytes(fields[CONFIG_NAME][1], fields[WEIGHTS_NAME][1])
    missing = sorted({CONFIG_NAME, WEIGHTS_NAME} - names) if SINGLE_FIELD not in names else []
    raise BadRequest(f"the form must hold either the fields {CONFIG_NAME!r} and {WEIGHTS_NAME!r} (a PEFT directory) "
                     f"or the one field {SINGLE_FIELD!r} (single-file safetensors); got {sorted(names)}"
                     + (f", missing {missing}" if missing and names & {CONFIG_NAME, WEIGHTS_NAME} else ""))


async def read_adapter_upload(request: Request, boundary: bytes, limit: int) -> LoraWeights:
    """Size cap (413), form (400), files (415 for pickles, 422): the upload, parsed into tensors."""
    body = await read_capped_body(request, limit)
    return await run_in_threadpool(lambda: weights_from_form(parse_multipart(body, boundary)))
