"""One batched forward for embed and classify requests, whatever mix of adapters they name.

Rows are routed per adapter key (the sha256 the request resolved, identity.py) through `LoraModel.route`
(one gather + two bmm per LoRA layer); when every
row names the same adapter the plain single-adapter path is used, and if that adapter is merged it
costs nothing at all. Called only from the Scheduler's loop thread, under the
WeightOwner's lock.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from adapters import LoraModel
from service.base_model import LoadedBase
from service.engine.errors import BadRequestError
from service.engine.pooling import embed_vectors

__all__ = ["routing", "collate", "embed_rows", "classify_rows", "check_classify"]


def routing(lm: LoraModel, names: list[str | None]):
    """A context that makes row i use names[i] (adapter keys in `lm`: sha256s in the engine)."""
    unique = set(names)
    if len(unique) == 1:
        lm.set_adapter(next(iter(unique)))
        return nullcontext()
    return lm.route(names)


def collate(base: LoadedBase, ids: list[list[int]], side: str | None = None) -> dict[str, torch.Tensor]:
    """One padded (B, T) batch of input_ids and attention_mask on the model's device, padded on `side` (the
    tokenizer's own by default) with its pad token, as the tokenizer itself pads."""
    side = side or base.tokenizer.padding_side
    width, pad = max(len(row) for row in ids), base.tokenizer.pad_token_id
    rows, masks = [], []
    for row in ids:
        fill = width - len(row)
        rows.append([pad] * fill + row if side == "left" else row + [pad] * fill)
        masks.append([0] * fill + [1] * len(row) if side == "left" else [1] * len(row) + [0] * fill)
    return {"input_ids": torch.tensor(rows, dtype=torch.long, device=base.device),  # (B, T)
            "attention_mask": torch.tensor(masks, dtype=torch.long, device=base.device)}  # (B, T)


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, T, H) -> (B, H)


@torch.inference_mode()
def embed_rows(lm: LoraModel, base: LoadedBase, ids: list[list[int]], names: list[str | None]
               ) -> tuple[list, list[int]]:
    """Embeddings as sentence-transformers computes them for this checkpoint: its pooling mode(s) and
    normalisation (base.embedding), over the tokens the tokenizer's padding side leaves real."""
    enc = collate(base, ids)
    with routing(lm, names):
        out = base.model(**enc)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.hidden_states[-1]
    emb = embed_vectors(hidden.float(), enc["attention_mask"], base.embedding)  # (B, k * H)
    return emb.cpu().tolist(), enc["attention_mask"].sum(1).tolist()


def check_classify(lm: LoraModel, base: LoadedBase, key: str | None, adapter: str | None = None) -> None:
    """On a bare encoder only adapters that carry a classifier head can classify; refuse the others
    before batching, so such a request fails alone. `key`: the adapter's key in `lm`; `adapter`: its name."""
    if base.task == "classify":
        return
    head = lm.detached.get(key or "", {})
    adapter = adapter or key
    others = sorted(k for k in head if k not in ("classifier.weight", "classifier.bias"))
    if adapter is None:
        raise BadRequestError("the base model is not a classifier: name an adapter that carries a classifier head "
                              "(modules_to_save)")
    if not others and "classifier.weight" not in head:
        raise BadRequestError(f"adapter {adapter!r} carries no classifier head (modules_to_save) and the base "
                              "model is not a classifier")
    if others:  # e.g. DistilBERT's pre_classifier: applying only `classifier` would give wrong scores
        raise BadRequestError(f"adapter {adapter!r} carries a classifier head with more than one layer ({others[0]}"
                              "...); on a bare encoder only a single `classifier` layer can be applied. Serve it on "
                              "the matching *ForSequenceClassification base model")


@torch.inference_mode()
def classify_rows(lm: LoraModel, base: LoadedBase, ids: list[list[int]], names: list[str | None]
                  ) -> tuple[list[list[dict]], list[int]]:
    """Softmax over a classifier: the base's own head (with modules_to_save replacements routed per
    row), or, on a bare encoder, the adapter's detached `classifier` tensors applied to the pooled
    output exactly as *ForSequenceClassification does. An adapter's own label names (carried in its
    files) name the outputs when their count fits; else the base's id2label, else LABEL_<j>."""
    enc = collate(base, ids)
    with routing(lm, names):
        out = base.model(**enc)
    tokens = enc["attention_mask"].sum(1).tolist()  # per row
    if base.task == "classify":
        probs = out.logits.float().softmax(-1)  # (B, num_labels)
        return [_ranked(p, _labels(lm, name, len(p)) or base.labels) for p, name in zip(probs, names, strict=True)
                ], tokens
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        pooled = _mean_pool(out.last_hidden_state, enc["attention_mask"])
    results: list[list[dict]] = []
    for i, name in enumerate(names):
        head = lm.detached.get(name or "", {})
        w, b = head.get("classifier.weight"), head.get("classifier.bias")
        if w is None:
            check_classify(lm, base, name)  # raises: the engine checks before batching, this is a backstop
        logits = pooled[i].to(w.dtype) @ w.T + (b if b is not None else 0)  # (H,) @ (H, labels) -> (labels,)
        results.append(_ranked(logits.float().softmax(-1), _labels(lm, name, len(logits))))
    return results, tokens


def _labels(lm: LoraModel, adapter: str | None, outputs: int) -> list[str] | None:
    """The adapter's own label names, if it carries them and they name exactly `outputs` classes."""
    own = lm.labels.get(adapter or "")
    return own if own is not None and len(own) == outputs else None


def _ranked(probs: torch.Tensor, labels: list[str] | None) -> list[dict]:
    order = torch.argsort(probs, descending=True).tolist()
    return [{"label": labels[j] if labels and j < len(labels) else f"LABEL_{j}", "score": float(probs[j])}
            for j in order]
