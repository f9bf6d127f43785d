"""service/engine/tokenizing.py: handler threads tokenize on copies of their own, in parallel."""

from __future__ import annotations

import threading

from test_engine import make_engine

from service.engine.requests import CompletionRequest
from service.engine.tokenizing import TokenizerPool


def test_the_pool_lends_distinct_copies_that_tokenize_like_the_original(gpt2_dir):
    engine = make_engine(gpt2_dir, n_adapters=0)
    original = engine.base.tokenizer
    with engine.tokenizers.borrow() as first, engine.tokenizers.borrow() as second:
        assert len({id(first), id(second), id(original)}) == 3, "two handlers never share a tokenizer"
        text = "lora adapters are small and many"
        assert first(text)["input_ids"] == second(text)["input_ids"] == original(text)["input_ids"]


def test_a_busy_tokenizer_does_not_hold_up_another_request(bert_dir):
    """One call holds a tokenizer (as a long text would); another request still tokenizes on its own copy,
    where the single lock before made it wait for the first."""
    engine = make_engine(bert_dir, n_adapters=0)
    with engine.tokenizers.borrow():
        done = threading.Event()
        result = {}

        def tokenize():
            result["ids"] = engine._encode("embed", ["the quick brown fox"])
            done.set()

        threading.Thread(target=tokenize, daemon=True).start()
        assert done.wait(timeout=10), "the second request waited for the busy tokenizer"
    assert result["ids"][0][:1] == [engine.base.tokenizer.cls_token_id]


def test_mixed_truncation_settings_in_parallel_threads_keep_their_own(gpt2_dir):
    """A fast tokenizer's truncation is state: on one shared tokenizer a prompt (no truncation) switched off
    the truncation an embedding call had just switched on, and that call came back longer than the context
    (seen: about 1 call in 170). On copies of their own, every call gets exactly its own setting."""
    engine = make_engine(gpt2_dir, n_adapters=0)
    long_text = "the quick brown fox jumps over the lazy dog " * 200
    prompt = "lora adapters are small and many"
    expected_prompt = engine.base.tokenizer(prompt)["input_ids"]
    wrong: list[object] = []

    def hammer(kind: str) -> None:
        try:
            for _ in range(60):
                if kind == "generate":
                    (ids,) = engine._encode("generate", CompletionRequest(model="base", prompt=prompt, max_tokens=1))
                    if ids != expected_prompt:
                        wrong.append(("prompt", len(ids)))
                else:
                    (ids,) = engine._encode("embed", [long_text])
                    if len(ids) != engine.base.max_length:
                        wrong.append(("truncated text", len(ids)))
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            wrong.append(exc)

    threads = [threading.Thread(target=hammer, args=(kind,)) for kind in ("generate", "embed", "generate", "embed")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not wrong, wrong[:3]


def test_borrow_returns_the_copy_even_when_the_call_fails():
    pool = TokenizerPool(tokenizer=[1, 2], size=1)  # any deep-copyable object stands in for a tokenizer
    try:
        with pool.borrow():
            raise ValueError("the template refused")
    except ValueError:
        pass
    assert pool._free.qsize() == 1, "the copy must come back to the pool"
