"""What each task feeds the model and what it minimises.

    classify   [CLS] text [SEP]        -> logits (B, n_labels)   cross-entropy on the label
    generate   prompt ‖ completion eos -> logits (B, T, vocab)   cross-entropy on completion tokens only
    embed      text, positive          -> mean-pooled (B, H) x2  in-batch contrastive (InfoNCE)

Embedding objective (kept deliberately simple, as in sentence-transformers'
MultipleNegativesRankingLoss): each text's positive must be the most similar of all positives in the
batch, cosine similarity / 0.05 into a cross-entropy. Batch size therefore matters: it is the number
of negatives. Its evaluation metric is top-1 retrieval accuracy over the whole evaluation file.

Examples are tokenised once, without padding; each batch is padded to its own longest row (right
padding), which on short texts is several times faster than padding everything to max_length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lora_train.data import Dataset

__all__ = ["Example", "encode", "collate", "batch_loss", "evaluate", "mean_pool", "EMBED_TEMPERATURE"]

EMBED_TEMPERATURE = 0.05  # sentence-transformers' default scale of 20


@dataclass
class Example:
    input_ids: list[int]
    label: int = -1  # classify: the label's index
    prompt_len: int = 0  # generate: tokens before the completion, excluded from the loss
    pair_ids: list[int] | None = None  # embed: the positive's tokens


def encode(data: Dataset, tokenizer, max_length: int, label2id: dict[str, int] | None = None) -> list[Example]:
    if data.task == "classify":
        assert label2id is not None
        ids = tokenizer(data.column("text"), truncation=True, max_length=max_length)["input_ids"]
        return [Example(i, label=label2id[r["label"]]) for i, r in zip(ids, data.rows, strict=True)]
    if data.task == "embed":
        a = tokenizer(data.column("text"), truncation=True, max_length=max_length)["input_ids"]
        b = tokenizer(data.column("positive"), truncation=True, max_length=max_length)["input_ids"]
        return [Example(x, pair_ids=y) for x, y in zip(a, b, strict=True)]
    prompts = tokenizer(data.column("prompt"))["input_ids"]
    completions = tokenizer(data.column("completion"), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for p, c in zip(prompts, completions, strict=True):
        c = (c + eos)[:max_length]
        room = max_length - len(c)
        p = p[max(0, len(p) - room):] if room > 0 else []  # a long prompt loses its beginning, not the target
        out.append(Example(p + c, prompt_len=len(p)))
    return out


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def collate(examples: list[Example], task: str, pad_id: int) -> dict[str, torch.Tensor]:
    ids, mask = _pad([e.input_ids for e in examples], pad_id)
    batch = {"input_ids": ids, "attention_mask": mask}
    if task == "classify":
        batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)  # (B,)
    elif task == "generate":
        labels = ids.clone()
        labels[mask == 0] = -100
        for i, e in enumerate(examples):
            labels[i, : e.prompt_len] = -100  # the prompt is given, not learned
        batch["labels"] = labels  # (B, T)
    else:
        batch["pair_ids"], batch["pair_mask"] = _pad([e.pair_ids or [] for e in examples], pad_id)
    return batch


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H), (B, T) -> (B, H): the average over real tokens, as all-MiniLM-L6-v2 pools."""
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def _embed(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
    return F.normalize(mean_pool(hidden, mask), dim=-1)


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> tuple[torch.Tensor, dict[str, float]]:
    """(mean loss, sums for metrics: {"loss_sum", "count", "correct"}) for one batch."""
    if task == "embed":
        a = _embed(model, batch["input_ids"], batch["attention_mask"])  # (B, H)
        b = _embed(model, batch["pair_ids"], batch["pair_mask"])  # (B, H)
        logits = a @ b.T / EMBED_TEMPERATURE  # (B, B): row i's target is column i
        target = torch.arange(len(a))
        loss = F.cross_entropy(logits, target)
        return loss, {"loss_sum": loss.item() * len(a), "count": len(a)}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if task == "classify":
        loss = F.cross_entropy(logits.float(), batch["labels"])  # logits (B, n_labels)
        correct = int((logits.argmax(-1) == batch["labels"]).sum())
        return loss, {"loss_sum": loss.item() * len(logits), "count": len(logits), "correct": correct}
    shift_logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
    shift_labels = batch["labels"][:, 1:]  # (B, T-1)
    tokens = int((shift_labels != -100).sum())
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=-100, reduction="sum") / max(tokens, 1)
    return loss, {"loss_sum": loss.item() * tokens, "count": tokens}


def batch_spans(n: int, batch_size: int, task: str) -> list[tuple[int, int]]:
    """[start, end) of each batch. For embed a lone last row would be its own only negative (loss 0,
    nothing learnt), so it joins the batch before it."""
    spans = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if task == "embed" and len(spans) > 1 and spans[-1][1] - spans[-1][0] == 1:
        spans[-2:] = [(spans[-2][0], n)]
    return spans


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[Example], task: str, pad_id: int, batch_size: int) -> dict[str, float]:
    """Loss, plus accuracy (classify), perplexity (generate) or top-1 retrieval accuracy (embed)."""
    was_training = model.training
    model.eval()
    sums = {"loss_sum": 0.0, "count": 0, "correct": 0}
    for start, end in batch_spans(len(examples), batch_size, task):
        _, s = batch_loss(model, collate(examples[start:end], task, pad_id), task)
        for k, v in s.items():
            sums[k] += v
    metrics = {"eval_loss": sums["loss_sum"] / max(sums["count"], 1)}
    if task == "classify":
        metrics["eval_accuracy"] = sums["correct"] / max(sums["count"], 1)
    elif task == "generate":
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    else:
        metrics["eval_retrieval_accuracy"] = _retrieval_accuracy(model, examples, pad_id, batch_size)
    model.train(was_training)
    return metrics


def _retrieval_accuracy(model: nn.Module, examples: list[Example], pad_id: int, batch_size: int) -> float:
    """Share of texts whose own positive is the nearest of all the file's positives."""
    a, b = [], []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], "embed", pad_id)
        a.append(_embed(model, batch["input_ids"], batch["attention_mask"]))
        b.append(_embed(model, batch["pair_ids"], batch["pair_mask"]))
    texts, positives = torch.cat(a), torch.cat(b)  # (N, H) each
    correct = 0
    for start in range(0, len(texts), 1024):  # 1024 rows of (N,) similarities at a time bound the memory
        sims = texts[start:start + 1024] @ positives.T  # (n, N)
        correct += int((sims.argmax(-1) == torch.arange(start, start + len(sims))).sum())
    return correct / len(texts)
