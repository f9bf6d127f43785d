"""One generated row's life: sampling, stop strings, logprobs, and the text it streams.

The batch these rows decode in (prefill, KV cache, joins between steps) is service/engine/decoding.py.
Each row keeps its own adapter, sampling settings and seeded generator, so its tokens do not depend on
what else shares its batch.

Streaming sends text, not tokens: a byte-level BPE token can end in the middle of a UTF-8 character,
which decodes to U+FFFD until the next token completes it, so a trailing U+FFFD is held back until then;
so is text that could be the start of a stop string, since a non-streamed answer would cut it. Each
chunk carries every token generated since the previous one, so streamed logprobs miss none. A row is
answered as soon as it finishes, even while longer rows of its batch go on decoding.
"""

from __future__ import annotations

import inspect

import torch

from service.base_model import LoadedBase
from service.engine.errors import BadRequestError
from service.engine.requests import CompletionChoice, CompletionChunk, CompletionRequest, CompletionResult, WorkItem

__all__ = ["Row", "advance", "cache_argument", "cache_of", "check_prompt", "complete", "sample", "top_logprobs"]

_GREEDY_BELOW = 1e-5
_PARTIAL = "\ufffd"  # what decoding gives for an incomplete UTF-8 sequence


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """One token id from (V,) logits: greedy at temperature 0, else nucleus sampling."""
    if temperature < _GREEDY_BELOW:  # logits / 1e-39 overflow to inf and softmax gives NaN: that is greedy
        return int(torch.argmax(logits))
    # Shifted so the largest is 0 before dividing: large logits over a small temperature would overflow to
    # inf (and softmax to NaN); shifted, the worst is -inf, which softmax takes as probability 0.
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
        keep[0] = True  # the top token, always: a top_p below float32's smallest value compares as 0
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


class Row:
    def __init__(self, item: WorkItem, prompt_len: int) -> None:
        req = item.payload
        self.item, self.req, self.prompt_len = item, req, prompt_len
        self.gen = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
        self.ids: list[int] = []
        self.text = ""  # the decoded completion so far (cut at a stop string)
        self.sent = 0  # how much of `text` has been streamed
        self.unsent = 0  # the first token not yet streamed (its text may be held back)
        self.logprobs: list[float] = []
        self.top: list[dict[str, float]] = []  # per token, with logprobs=n: the n most likely tokens
        self.tokens: list[str] = []  # each token's own text
        self.offsets: list[int] = []  # where each streamed token's text starts in `text`
        # Per token, the text before it as (length of its settled part, length of its trailing U+FFFD run):
        # whether those U+FFFD are incomplete characters or final replacements only shows later.
        self.starts: list[tuple[int, int]] = []
        self.finish: str | None = None if req.max_tokens > 0 else "length"
        self.answered = False


def check_prompt(base: LoadedBase, req: CompletionRequest, prompt_len: int) -> None:
    """Refuse, before queueing, a request that cannot fit the model's context, so it fails alone. A request
    without a limit (chat's default) gets what the context leaves, and is refused if that is nothing."""
    if prompt_len == 0:
        raise BadRequestError("the prompt is empty after tokenization")
    if req.max_tokens is None:
        if prompt_len >= base.max_length:
            raise BadRequestError(f"the conversation ({prompt_len} tokens) fills the model's context of "
                                  f"{base.max_length} tokens: no room is left to answer")
        req.max_tokens = base.max_length - prompt_len
    if prompt_len + req.max_tokens > base.max_length:
        raise BadRequestError(f"prompt ({prompt_len} tokens) + max_tokens ({req.max_tokens}) exceeds the model's "
                              f"context of {base.max_length} tokens")


def top_logprobs(logprobs: torch.Tensor, n: int | None, tok) -> dict[str, float]:
    """The n most likely next tokens, text -> logprob (OpenAI's top_logprobs). Two ids that decode to the same
    text (an incomplete UTF-8 byte, for one) keep the likelier one, so a dict may hold fewer than n."""
    if not n:
        return {}
    values, ids = torch.topk(logprobs, min(n, logprobs.numel()))  # descending
    top: dict[str, float] = {}
    for value, token in zip(values.tolist(), ids.tolist(), strict=True):
        top.setdefault(_token_text(tok, token), value)
    return top


def _token_text(tok, token: int) -> str:
    """One token's own text, special tokens named (<|im_end|>): the same in `tokens` and in top_logprobs."""
    return tok.decode([token], skip_special_tokens=False)


def cache_argument(model: torch.nn.Module) -> str:
    """The KV cache's keyword: `cache` in recent transformers (which deprecates `past_key_values` and will
    drop it), `past_key_values` before; the project's transformers range spans both."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(out) -> object:
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


def complete(row: Row) -> None:
    """The final chunk (any held-back text and tokens, and the finish reason), then the whole result."""
    if row.answered or row.finish in ("error", "abandoned"):
        return  # answered already, failed, or nobody is waiting
    row.answered = True
    final = _chunk(row, len(row.text), row.finish)
    final.usage = (row.prompt_len, len(row.ids))
    row.item.push(final)
    row.item.push(None)
    wanted = row.req.logprobs is not None
    choice = CompletionChoice(row.text, row.finish, row.tokens, row.logprobs if wanted else None, row.offsets,
                              row.top if wanted else None)
    row.item.resolve(CompletionResult(choice, row.prompt_len, len(row.ids)))


def _chunk(row: Row, upto: int, finish: str | None = None) -> CompletionChunk:
    """text[sent:upto], with the tokens generated since the last chunk whose start in the text is known by
    now (all of them in the final chunk), with their logprobs and offsets."""
    first, last, wanted = row.unsent, row.unsent, row.req.logprobs is not None
    while last < len(row.tokens):
        offset = _offset(row.starts[last], row.text, upto)
        if finish is None and offset >= upto:  # it starts in text not sent yet: its start may still move
            break
        row.offsets.append(max(offset, row.offsets[-1] if row.offsets else 0))
        last += 1
    chunk = CompletionChunk(row.text[row.sent:upto], finish, row.tokens[first:last],
                            row.logprobs[first:last] if wanted else None, row.offsets[first:last],
                            top_logprobs=row.top[first:last] if wanted else None)
    row.sent, row.unsent = upto, last
    return chunk


def _offset(start: tuple[int, int], text: str, upto: int) -> int:
    """Where a token starts in text[:upto]: after the settled text before it, and after those of the U+FFFD
    that followed it which turned out final (still U+FFFD in the text); a U+FFFD that a later token completed
    into a character is where this token starts, since its bytes begin that character."""
    settled, run = start
    offset = min(settled, upto)
    while offset < min(settled + run, upto) and text[offset] == _PARTIAL:
        offset += 1
    return offset


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters to keep unsent: an incomplete UTF-8 character (U+FFFD), or the start
    of a stop string that the next tokens may complete (and that must then never have been sent)."""
    visible = text.rstrip(_PARTIAL)
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(visible)), hold, -1):
            if visible.endswith(stop[:k]):
                hold = k
                break
    return len(text) - len(visible) + hold


def advance(row: Row, token: int, logprob: float, top: dict[str, float], tok, stops: frozenset[int]) -> None:
    """Append one token; emit the new text; stop on EOS, a stop string, or max_tokens."""
    if token in stops:  # EOS, or the model's end-of-turn token
        row.finish = "stop"
        return
    previous = row.text
    row.ids.append(token)
    text = tok.decode(row.ids, skip_special_tokens=True)
    # The earliest stop string in the text wins, whichever comes first in the list.
    cuts = [c for stop in row.req.stop if (c := text.find(stop, max(0, len(previous) - len(stop)))) != -1]
    if cuts:
        text, row.finish = text[:min(cuts)], "stop"
    row.text = text
    settled = len(previous.rstrip(_PARTIAL))
    row.starts.append((settled, len(previous) - settled))
    row.tokens.append(_token_text(tok, token))
    row.logprobs.append(logprob)
    row.top.append(top)
    if row.finish is None and len(row.ids) >= row.req.max_tokens:
        row.finish = "length"
    if row.finish is None:  # the final chunk (complete) sends whatever is left
        visible = len(text) - _held_back(text, row.req.stop)
        if visible > row.sent:
            row.item.push(_chunk(row, visible))
