"""Batched decoding with a KV cache, across requests and adapters.

Prompts are left-padded into one batch; each row keeps its own adapter (routed per row), its own
sampling settings and its own seeded generator, so a request's tokens do not depend on what else
shares its batch. Position ids are computed from the attention mask, so left padding does not shift
positions. Every decoding step is one forward for all unfinished rows.
"""

from __future__ import annotations

import torch

from adapters import LoraModel
from service.base_model import LoadedBase
from service.engine.errors import BadRequestError
from service.engine.requests import CompletionChoice, CompletionChunk, CompletionResult, WorkItem
from service.engine.runner import routing

__all__ = ["check_generation", "generate_batch"]


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """One token id from (V,) logits: greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


class _Row:
    def __init__(self, item: WorkItem, prompt_len: int) -> None:
        req = item.payload
        self.item, self.req, self.prompt_len = item, req, prompt_len
        self.gen = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
        self.ids: list[int] = []
        self.text = ""
        self.logprobs: list[float] = []
        self.tokens: list[str] = []
        self.finish: str | None = None if req.max_tokens > 0 else "length"


def check_generation(base: LoadedBase, item: WorkItem) -> None:
    """Refuse, before batching, a request that cannot fit the model's context, so it fails alone."""
    req = item.payload
    prompt_len = len(base.tokenizer(req.prompt)["input_ids"])
    if prompt_len == 0:
        raise BadRequestError("the prompt is empty after tokenization")
    if prompt_len + req.max_tokens > base.max_length:
        raise BadRequestError(f"prompt ({prompt_len} tokens) + max_tokens ({req.max_tokens}) exceeds the model's "
                              f"context of {base.max_length} tokens")


@torch.inference_mode()
def generate_batch(lm: LoraModel, base: LoadedBase, items: list[WorkItem]) -> None:
    tok = base.tokenizer
    prompts = [it.payload.prompt for it in items]
    enc = tok(prompts, padding=True, return_tensors="pt", padding_side="left")
    ids, mask = enc["input_ids"].to(base.device), enc["attention_mask"].to(base.device)  # (B, T)
    rows = [_Row(it, int(m.sum())) for it, m in zip(items, enc["attention_mask"], strict=True)]
    names = [it.adapter for it in items]
    eos = tok.eos_token_id
    with routing(lm, names):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding keeps real positions at 0..n-1
        out = base.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        past = out.past_key_values
        logits = out.logits[:, -1].float()  # (B, V)
        for _ in range(max(r.req.max_tokens for r in rows)):
            next_ids = []
            for i, row in enumerate(rows):
                if row.finish is None and row.item.abandoned:
                    row.finish = "abandoned"  # its client disconnected: stop spending steps on it
                if row.finish is not None:
                    next_ids.append(eos if eos is not None else 0)
                    continue
                token = _sample(logits[i], row.req.temperature, row.req.top_p, row.gen)
                _advance(row, token, torch.log_softmax(logits[i], -1)[token].item(), tok, eos)
                next_ids.append(token)
            if all(r.finish is not None for r in rows):
                break
            step = torch.tensor(next_ids, device=base.device).unsqueeze(1)  # (B, 1)
            mask = torch.cat([mask, torch.ones_like(step)], dim=1)  # (B, T+1)
            pos = pos[:, -1:] + 1  # (B, 1)
            out = base.model(input_ids=step, attention_mask=mask, position_ids=pos, past_key_values=past,
                             use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1].float()
    for row in rows:
        if row.finish is None:
            row.finish = "length"
        row.item.push(CompletionChunk("", row.finish))
        row.item.push(None)
        choice = CompletionChoice(row.text, row.finish, row.tokens, row.logprobs if row.req.logprobs else None)
        row.item.resolve(CompletionResult(choice, row.prompt_len, len(row.ids)))


def _advance(row: _Row, token: int, logprob: float, tok, eos: int | None) -> None:
    """Append one token; emit the new text; stop on EOS, a stop string, or max_tokens."""
    if eos is not None and token == eos:
        row.finish = "stop"
        return
    row.ids.append(token)
    text = tok.decode(row.ids, skip_special_tokens=True)
    for stop in row.req.stop:
        cut = text.find(stop, max(0, len(row.text) - len(stop)))
        if cut != -1:
            text, row.finish = text[:cut], "stop"
            break
    delta = text[len(row.text):]
    row.text = text
    row.logprobs.append(logprob)
    row.tokens.append(tok.convert_ids_to_tokens(token))
    if row.finish is None and len(row.ids) >= row.req.max_tokens:
        row.finish = "length"
    if delta:
        row.item.push(CompletionChunk(delta, None, logprob if row.req.logprobs else None))
