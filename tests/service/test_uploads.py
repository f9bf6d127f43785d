"""service/uploads.py: the size cap holds while the body streams; the multipart form is parsed strictly."""

from __future__ import annotations

import asyncio

import pytest
from http_testkit import BERT_TARGETS, make_adapter
from starlette.requests import Request

from adapters import AdapterFormatError, to_peft_bytes, to_single_file_bytes
from service.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from service.uploads import SINGLE_FIELD, Part, content_boundary, parse_multipart, read_capped_body, weights_from_form


def _request(chunks: list[bytes], headers: dict[str, str] | None = None) -> tuple[Request, list[int]]:
    """A request whose body arrives chunk by chunk; the list records how many chunks were pulled."""
    pulled = [0]

    async def receive():
        i = pulled[0]
        pulled[0] += 1
        return {"type": "http.request", "body": chunks[i] if i < len(chunks) else b"", "more_body": i < len(chunks) - 1}

    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request({"type": "http", "method": "PUT", "path": "/", "headers": raw}, receive), pulled


def _form(boundary: str, fields: dict[str, tuple[str | None, bytes]]) -> bytes:
    out = b""
    for name, (filename, data) in fields.items():
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def test_stream_is_cut_off_once_the_limit_is_passed():
    request, pulled = _request([b"x" * 1000] * 100)  # 100 kB on its way, no Content-Length
    with pytest.raises(PayloadTooLarge):
        asyncio.run(read_capped_body(request, limit=4500))
    assert pulled[0] == 5  # stopped at the chunk that crossed 4,500 bytes, not at the end


def test_content_length_above_the_limit_is_refused_before_reading():
    request, pulled = _request([b"x" * 10], {"content-length": "1000000"})
    with pytest.raises(PayloadTooLarge):
        asyncio.run(read_capped_body(request, limit=1000))
    assert pulled[0] == 0


def test_body_within_the_limit_is_read_whole():
    request, _ = _request([b"ab", b"cd", b"e"], {"content-length": "5"})
    assert asyncio.run(read_capped_body(request, limit=5)) == b"abcde"
    request, _ = _request([b"x"], {"content-length": "lots"})
    with pytest.raises(BadRequest):
        asyncio.run(read_capped_body(request, limit=5))


def test_content_type_must_be_multipart_with_a_boundary():
    with pytest.raises(UnsupportedMediaType):
        content_boundary(_request([], {"content-type": "application/octet-stream"})[0])
    with pytest.raises(UnsupportedMediaType):
        content_boundary(_request([])[0])
    with pytest.raises(BadRequest):
        content_boundary(_request([], {"content-type": "multipart/form-data"})[0])
    assert content_boundary(_request([], {"content-type": "multipart/form-data; boundary=abc"})[0]) == b"abc"
    with pytest.raises(BadRequest, match="RFC 2046"):  # python-multipart itself would raise (a 500) past 256
        content_boundary(_request([], {"content-type": "multipart/form-data; boundary=" + "b" * 300})[0])


def test_parse_multipart_fields_and_files():
    body = _form("B", {"adapter_config.json": ("c.json", b"{}"), "note": (None, b"a\r\nb")})
    assert parse_multipart(body, b"B") == [Part("adapter_config.json", "c.json", b"{}"), Part("note", None, b"a\r\nb")]


@pytest.mark.parametrize("body", [
    b"--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nno closing boundary",
    b"garbage without any boundary",
    b"--B\r\nContent-Type: text/plain\r\n\r\nno disposition\r\n--B--\r\n",
])
def test_malformed_forms_are_400(body: bytes):
    with pytest.raises(BadRequest):
        parse_multipart(body, b"B")


def test_repeated_role_is_400_but_a_repeated_field_name_is_parsed():
    body = _form("B", {"adapter": (None, b"1")}).replace(b"--B--\r\n", b"") + _form("B", {"adapter": (None, b"2")})
    parts = parse_multipart(body, b"B")  # curl -F file=@a -F file=@b repeats the name: each part is kept
    assert parts == [Part("adapter", None, b"1"), Part("adapter", None, b"2")]
    with pytest.raises(BadRequest, match="twice"):
        weights_from_form(parts)


def test_both_forms_parse_to_the_same_weights():
    weights = make_adapter(BERT_TARGETS, seed=4)
    config, model = to_peft_bytes(weights)
    a = weights_from_form({"adapter_config.json": (None, config), "adapter_model.safetensors": (None, model)})
    b = weights_from_form({"adapter": ("x.safetensors", to_single_file_bytes(weights))})
    assert to_peft_bytes(a) == to_peft_bytes(b) == (config, model)


@pytest.mark.parametrize("fields", [
    {"adapter_model.bin": (None, b"\x80\x04..."), "adapter_config.json": (None, b"{}")},
    {"adapter": ("adapter.pt", b"anything")},
    {"adapter": (None, b"PK\x03\x04...")},
])
def test_pickles_are_refused_unread(fields):
    with pytest.raises(UnsupportedMediaType):
        weights_from_form(fields)


def test_wrong_fields_are_400_and_bad_files_422():
    with pytest.raises(BadRequest, match="missing"):
        weights_from_form({"adapter_config.json": (None, b"{}")})
    with pytest.raises(BadRequest):
        weights_from_form({})
    with pytest.raises(AdapterFormatError):
        weights_from_form({"adapter": (None, b"\x08\0\0\0\0\0\0\0{}")})
    deep = b"[" * 100_000 + b"]" * 100_000  # json.loads raises RecursionError, not ValueError, on this
    with pytest.raises(AdapterFormatError, match="nested too deeply"):
        weights_from_form({"adapter_config.json": (None, b'{"r": 4, "x": ' + deep + b"}"),
                           "adapter_model.safetensors": (None, to_peft_bytes(make_adapter(BERT_TARGETS))[1])})
    header = b'{"a": ' + deep + b"}"
    with pytest.raises(AdapterFormatError, match="nested too deeply"):
        weights_from_form({"adapter": (None, len(header).to_bytes(8, "little") + header)})


def test_parts_are_found_by_filename_and_text_companions_are_ignored():
    weights = make_adapter(BERT_TARGETS, seed=4)
    config, model = to_peft_bytes(weights)
    parts = [Part("file", "README.md", b"# card"), Part("file", "dir/adapter_config.json", config),
             Part("file", "adapter_model.safetensors", model), Part("file", "training_report.json", b"{}"),
             Part("notes", "notes.txt", b"hi")]
    assert to_peft_bytes(weights_from_form(parts)) == (config, model)
    with pytest.raises(BadRequest, match="unexpected form part 'logo.png'"):
        weights_from_form(parts + [Part("file", "logo.png", b"\x89PNG")])
    with pytest.raises(BadRequest, match="twice"):  # one by field name, one by filename
        weights_from_form(parts + [Part("adapter_config.json", None, config)])
    with pytest.raises(UnsupportedMediaType):  # a pickle is refused whatever its name claims
        weights_from_form(parts + [Part("file", "extra.json", b"\x80\x04K\x01.")])
    with pytest.raises(UnsupportedMediaType):
        weights_from_form(parts + [Part("file", "adapter_model.pth", b"anything")])


def test_a_labels_part_sets_the_label_names():
    weights = make_adapter(BERT_TARGETS, seed=4)
    parts = [Part(SINGLE_FIELD, "a.safetensors", to_single_file_bytes(weights)), Part("labels", None, b'["x", "y"]')]
    assert weights_from_form(parts).labels == ["x", "y"]
    with pytest.raises(AdapterFormatError) as info:
        weights_from_form(parts[:1] + [Part("labels", None, b'{"0": "x", "2": "y"}')])
    assert info.value.key == "labels"
