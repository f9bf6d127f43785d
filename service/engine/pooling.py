"""Pooling token states into one vector per row, in every mode sentence-transformers' Pooling module has.

Rows may be padded on either side (decoders often pad on the left), so nothing here assumes the real tokens
start at 0 or end at the last column: CLS is the first real token, last-token the last real one. Several modes
are concatenated in the order given, as sentence-transformers does. `prompt_length` leading real tokens (an
instruction prompt) are left out of the pooling when the model asks for that (include_prompt=false).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from service.embedding_spec import EmbeddingSpec

__all__ = ["pool", "embed_vectors"]


def _without_prompt(mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """The mask with each row's first `prompt_length` real tokens (after any left padding) zeroed."""
    first = mask.int().argmax(1, keepdim=True)  # (B, 1) index of the first real token
    positions = torch.arange(mask.size(1), device=mask.device).unsqueeze(0)  # (1, T)
    return mask * (positions >= first + prompt_length)  # (B, T)


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes: tuple[str, ...], prompt_length: int = 0) -> torch.Tensor:
    """(B, T, H) token states and a (B, T) attention mask -> (B, len(modes) * H)."""
    original = mask
    if prompt_length:
        mask = _without_prompt(mask, prompt_length)
    B, T, H = hidden.shape
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    count = m.sum(1).clamp(min=1e-9)  # (B, 1)
    out = []
    for mode in modes:
        if mode == "cls":
            first = mask.int().argmax(1)  # (B,) first pooled token
            out.append(hidden[torch.arange(B), first])  # (B, H)
        elif mode == "max":
            out.append(hidden.masked_fill(m == 0, float("-inf")).max(1).values)  # (B, H)
        elif mode == "mean":
            out.append((hidden * m).sum(1) / count)  # (B, T, H) -> (B, H)
        elif mode == "mean_sqrt_len_tokens":
            out.append((hidden * m).sum(1) / count.sqrt())
        elif mode == "weightedmean":
            # weights 1, 2, ... counted from each row's first real token, so left padding shifts nothing
            pad = original.int().argmax(1).view(-1, 1, 1)  # (B, 1, 1)
            w = m * (torch.arange(1, T + 1, device=hidden.device, dtype=hidden.dtype).view(1, -1, 1) - pad)
            out.append((hidden * w).sum(1) / w.sum(1).clamp(min=1e-9))  # (B, H)
        elif mode == "lasttoken":
            # the last column whose mask is 1, wherever the padding is; (a row with none: the last column)
            seen, from_end = mask.flip(1).max(1)  # (B,), (B,)
            last = torch.where(seen == 0, T - 1, T - 1 - from_end)  # (B,)
            out.append((hidden * m)[torch.arange(B), last])  # (B, H)
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    return torch.cat(out, dim=-1)  # (B, len(modes) * H)


def embed_vectors(hidden: torch.Tensor, mask: torch.Tensor, spec: EmbeddingSpec | None) -> torch.Tensor:
    """The embeddings a checkpoint's spec describes (none: mean-pooled and L2-normalised)."""
    if spec is None:
        return F.normalize(pool(hidden, mask, ("mean",)), p=2, dim=-1)
    vectors = pool(hidden, mask, spec.pooling, spec.prompt_length)  # (B, k * H)
    return F.normalize(vectors, p=2, dim=-1) if spec.normalize else vectors
