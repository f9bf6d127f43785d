"""service/routes/chat.py: OpenAI chat completions, rendered with the base model's chat template."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from http_testkit import GPT2_TARGETS, make_adapter, peft_files

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick brown"}]


@pytest.fixture
def chat_client(gpt2_client: TestClient):
    """The tiny GPT-2 with a chat template (its tokenizer has none; instruct models ship one)."""
    tok = gpt2_client.app.state.base.tokenizer
    tok.chat_template = TEMPLATE
    if gpt2_client.get("/v1/adapters/chat-a").status_code == 404:
        r = gpt2_client.put("/v1/adapters/chat-a", files=peft_files(make_adapter(GPT2_TARGETS, rank=4, seed=5,
                                                                                  fan_in_fan_out=True)))
        assert r.status_code == 201, r.text
    try:
        yield gpt2_client
    finally:
        tok.chat_template = None


def _chat(client: TestClient, **body) -> dict:
    r = client.post("/v1/chat/completions", json={"model": "chat-a", "messages": MESSAGES, "temperature": 0,
                                                  "max_completion_tokens": 6, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_chat_is_the_completion_of_its_rendered_template(chat_client: TestClient):
    out = _chat(chat_client)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-") and out["model"] == "chat-a"
    (choice,) = out["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    prompt = "system: be brief\nuser: the quick brown\nassistant:"  # what TEMPLATE renders
    plain = chat_client.post("/v1/completions", json={"model": "chat-a", "prompt": prompt, "temperature": 0,
                                                      "max_tokens": 6}).json()
    assert choice["message"]["content"] == plain["choices"][0]["text"]
    assert out["usage"] == plain["usage"]
    parts = [{"type": "text", "text": "the quick "}, {"type": "text", "text": "brown"}]  # content as parts
    as_parts = _chat(chat_client, messages=[MESSAGES[0], {"role": "user", "content": parts}])
    assert as_parts["choices"][0]["message"] == choice["message"]


def test_logprobs_in_the_chat_shape(chat_client: TestClient):
    lp = _chat(chat_client, logprobs=True, top_logprobs=2)["choices"][0]["logprobs"]["content"]
    assert lp and all(set(t) == {"token", "logprob", "bytes", "top_logprobs"} for t in lp)
    for t in lp:
        assert t["bytes"] == list(t["token"].encode()) and t["logprob"] <= 0 and len(t["top_logprobs"]) <= 2
        if "\ufffd" not in t["token"]:  # greedy: the chosen token heads its alternatives
            assert t["top_logprobs"][0]["token"] == t["token"]
    assert _chat(chat_client)["choices"][0]["logprobs"] is None


def test_top_logprobs_go_up_to_20_as_openais(chat_client: TestClient):
    lp = _chat(chat_client, logprobs=True, top_logprobs=20)["choices"][0]["logprobs"]["content"]
    assert lp and all(5 < len(t["top_logprobs"]) <= 20 for t in lp)


def test_a_streamed_chat_equals_the_plain_answer(chat_client: TestClient):
    plain = _chat(chat_client, max_completion_tokens=10)
    body = {"model": "chat-a", "messages": MESSAGES, "temperature": 0, "max_tokens": 10, "stream": True,
            "stream_options": {"include_usage": True}}
    with chat_client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert finishes == [plain["choices"][0]["finish_reason"]]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]


def test_without_a_limit_the_answer_may_fill_the_context(chat_client: TestClient):
    out = _chat(chat_client, max_completion_tokens=None)
    usage = out["usage"]
    assert out["choices"][0]["finish_reason"] == "stop" or usage["total_tokens"] == 128  # the model's context


def test_chat_refusals(chat_client: TestClient):
    assert chat_client.post("/v1/chat/completions", json={"model": "never-uploaded", "messages": MESSAGES}
                            ).status_code == 404
    for bad in ({"messages": []}, {"n": 2}, {"presence_penalty": 1}, {"top_logprobs": 21},
                {"messages": [{"role": "tool", "content": "x"}]},
                {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
                {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}):
        r = chat_client.post("/v1/chat/completions", json={"model": "chat-a", "messages": MESSAGES, **bad})
        assert r.status_code == 422 and r.json()["error"]["type"] == "validation_error", (bad, r.text)


def test_a_base_without_a_chat_template_is_a_clear_400(gpt2_client: TestClient):
    r = gpt2_client.post("/v1/chat/completions", json={"model": "base", "messages": MESSAGES})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]


def test_chat_on_an_encoder_is_400(bert_client: TestClient):
    r = bert_client.post("/v1/chat/completions", json={"model": "base", "messages": MESSAGES})
    assert r.status_code == 400 and r.json()["error"]["type"] == "wrong_task_error"


def test_a_conversation_that_fills_the_context_is_a_clear_400(chat_client: TestClient):
    long = [{"role": "user", "content": "fox " * 200}]  # far more than the tiny model's 128 positions
    r = chat_client.post("/v1/chat/completions", json={"model": "chat-a", "messages": long})
    assert r.status_code == 400 and "no room is left to answer" in r.json()["error"]["message"]
    r = chat_client.post("/v1/chat/completions", json={"model": "chat-a", "messages": long, "max_tokens": 4})
    assert r.status_code == 400 and "exceeds the model's context" in r.json()["error"]["message"]


def test_a_message_name_reaches_the_template(chat_client: TestClient):
    tok = chat_client.app.state.base.tokenizer
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}{% if m.get('name') %} ({{ m['name'] }}){% endif %}"
                         ": {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    plain = _chat(chat_client, messages=[{"role": "user", "content": "hi"}])
    named = _chat(chat_client, messages=[{"role": "user", "content": "hi", "name": "bob"}])
    assert named["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]


def test_named_chat_templates_use_the_default_one(chat_client: TestClient):
    """A model folder with chat_template.jinja and additional_chat_templates/ loads them as a dict of named
    templates; a chat without tools renders with "default", as transformers does."""
    tok = chat_client.app.state.base.tokenizer
    plain = _chat(chat_client)
    tok.chat_template = {"default": TEMPLATE, "tool_use": "{{ raise_exception('not this one') }}"}
    assert _chat(chat_client)["usage"] == plain["usage"]
    tok.chat_template = {"tool_use": TEMPLATE}
    r = chat_client.post("/v1/chat/completions", json={"model": "chat-a", "messages": MESSAGES})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]


def test_a_broken_chat_template_is_the_servers_500_not_the_clients_400(chat_client: TestClient):
    chat_client.app.state.base.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }"  # unclosed
    r = chat_client.post("/v1/chat/completions", json={"model": "chat-a", "messages": MESSAGES})
    assert r.status_code == 500 and "chat template does not compile" in r.json()["error"]["message"]
    chat_client.app.state.base.tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message must come first') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    r = chat_client.post("/v1/chat/completions", json={"model": "chat-a", "messages": MESSAGES[1:]})
    assert r.status_code == 400 and "a system message must come first" in r.json()["error"]["message"]


def test_a_chat_names_the_version_that_answered(chat_client: TestClient):
    sha = chat_client.get("/v1/adapters/chat-a").json()["sha256"]
    fingerprint = _chat(chat_client)["system_fingerprint"]
    assert fingerprint.startswith("chat-a@v") and fingerprint.endswith(f":{sha[:12]}")
    body = {"model": "base", "messages": MESSAGES, "max_tokens": 2, "stream": True}
    with chat_client.stream("POST", "/v1/chat/completions", json=body) as r:
        events = [json.loads(line.removeprefix("data: ")) for line in r.iter_lines() if line and "[DONE]" not in line]
    assert events and all(e["system_fingerprint"] == "base" for e in events)
