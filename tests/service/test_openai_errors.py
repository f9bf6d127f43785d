"""OpenAI's error object as the official `openai` client reads it (.status_code, .code, .param), the
Content-Type hint for a JSON body sent without it, and OpenAI's limit of 20 top logprobs."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient
from http_testkit import INFERENCE_KEY

openai = pytest.importorskip("openai")


class _AppTransport(httpx.BaseTransport):
    """Sends the openai client's requests through a TestClient, to the live app it holds (lifespan started)."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        r = self.client.request(request.method, request.url.raw_path.decode(), content=request.read(),
                                headers=dict(request.headers))
        return httpx.Response(r.status_code, headers=list(r.headers.multi_items()), content=r.content)


def _openai(client: TestClient):
    return openai.OpenAI(api_key=INFERENCE_KEY, base_url="http://testserver/v1", max_retries=0,
                         http_client=httpx.Client(transport=_AppTransport(client)))


def test_openai_client_reads_code_and_param_of_an_unknown_model(bert_client: TestClient):
    with pytest.raises(openai.NotFoundError) as info:
        _openai(bert_client).embeddings.create(model="never-uploaded", input="hello")
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found" and info.value.param == "model"
    assert info.value.type == "unknown_adapter_error" and "never-uploaded" in info.value.message
    assert info.value.body["key"] == "never-uploaded"  # kept for older clients


def test_openai_client_reads_code_and_param_of_a_bad_request(bert_client: TestClient, gpt2_client: TestClient):
    client = _openai(bert_client)
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.embeddings.create(model="base", input="hello", extra_body={"temprature": 0.5})
    assert info.value.status_code == 422
    assert info.value.code == "unknown_parameter" and info.value.param == "temprature"
    with pytest.raises(openai.BadRequestError) as info:  # completions on an encoder
        client.completions.create(model="base", prompt="hi", max_tokens=1)
    assert info.value.status_code == 400 and info.value.code == "wrong_task" and info.value.param is None
    with pytest.raises(openai.UnprocessableEntityError) as info:
        _openai(gpt2_client).completions.create(model="base", prompt="hi", max_tokens=1, logprobs=21)
    assert info.value.code == "invalid_value" and info.value.param == "logprobs"


def test_every_error_has_the_openai_fields(bert_client: TestClient):
    answers = [bert_client.get("/v2/nothing"), bert_client.patch("/v1/adapters"),
               bert_client.get("/v1/adapters/never-uploaded"), bert_client.put("/v1/adapters/base", content=b"x"),
               bert_client.post("/v1/embeddings", json={"model": "base"}),
               bert_client.post("/v1/embeddings", json={"model": "base", "input": "x"}, headers={"Authorization": ""})]
    for r in answers:
        error = r.json()["error"]
        assert {"message", "type", "param", "code", "key"} <= set(error), r.text
        assert isinstance(error["code"], str) and error["code"], r.text
    assert answers[2].json()["error"]["code"] == "adapter_not_found"
    assert answers[4].json()["error"] | {"message": ""} == {"message": "", "type": "validation_error",
                                                           "param": "input", "code": "missing_required_parameter",
                                                           "key": "input"}


def test_a_json_body_without_its_content_type_is_told_to_send_it(bert_client: TestClient):
    body = json.dumps({"model": "base", "input": "hello"}).encode()
    r = bert_client.post("/v1/embeddings", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415, r.text  # what `curl -d` sends without -H
    error = r.json()["error"]
    assert "Content-Type: application/json" in error["message"] and error["code"] == "unsupported_content_type"
    assert bert_client.post("/v1/embeddings", content=body, headers={"Content-Type": "application/json"}
                            ).status_code == 200


def test_a_json_body_with_no_content_type_at_all_is_told_to_send_it(bert_client: TestClient):
    """What a raw HTTP client sends when it is given bytes and no header (httpx's `content=`, for one)."""
    body = json.dumps({"model": "base", "input": "hello"}).encode()
    request = bert_client.build_request("POST", "/v1/embeddings", content=body)
    assert "content-type" not in request.headers
    r = bert_client.send(request)
    assert r.status_code == 415, r.text
    assert "no Content-Type" in r.json()["error"]["message"]


def test_up_to_20_top_logprobs(gpt2_client: TestClient):
    r = gpt2_client.post("/v1/completions", json={"model": "base", "prompt": "hello", "max_tokens": 2,
                                                  "temperature": 0, "logprobs": 20})
    assert r.status_code == 200, r.text
    tops = r.json()["choices"][0]["logprobs"]["top_logprobs"]
    assert len(tops) == 2 and all(5 < len(top) <= 20 for top in tops)
    values = list(tops[0].values())
    assert values == sorted(values, reverse=True)  # chat's top_logprobs=20: tests/service/test_routes_chat.py
