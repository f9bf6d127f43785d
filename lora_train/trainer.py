"""One training run: data -> model -> trainable setup -> AdamW epochs with per-epoch evaluation -> files.

Reproducible: the seed fixes the head's initialisation, LoRA's A, dropout and the shuffling order, so
the same seed on the same machine (and thread count) writes the same adapter bytes. No code path
downloads anything: the base model must be a local directory.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from adapters import LoraWeights, model_footprint, save_peft_dir
from adapters.serialization import CONFIG_NAME, WEIGHTS_NAME
from lora_common.base_loading import default_base_model
from lora_train import data as data_mod
from lora_train import modes
from lora_train.tasks import Example, batch_loss, batch_spans, collate, encode, evaluate

__all__ = ["TrainArgs", "TrainResult", "train"]


@dataclass
class TrainArgs:
    data: str
    out: str
    task: str = "classify"
    base_model: str | None = None  # None: the packaged all-MiniLM-L6-v2
    eval: str | None = None
    eval_fraction: float = 0.0  # without --eval: hold out this share of the training rows
    mode: str = "lora"
    rank: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: list[str] | str | None = None  # None: the architecture's default (query/value for BERT)
    epochs: int = 3
    lr: float = 5e-4
    batch_size: int = 16
    max_length: int = 128
    weight_decay: float = 0.0
    warmup: float = 0.06  # share of the steps with a linear warm-up; then linear decay to 0
    seed: int = 0
    progress: bool = True


@dataclass
class TrainResult:
    mode: str
    task: str
    out: str
    labels: list[str] | None
    epochs: list[dict[str, float]]
    trainable_parameters: int
    total_parameters: int  # base + LoRA A/B for lora; the model's own for the dense modes
    base_parameters: int
    base_bytes: int
    checkpoint_bytes: int  # the files written (adapter, or full weights + config), tokenizer excluded
    checkpoint_files: list[str]
    adapter_bytes: int | None  # LoRA tensors only, as adapters.footprint counts them
    targets: list[str]
    base_unchanged: bool | None  # lora: the frozen base's fingerprint after training equals before
    train_seconds: float
    total_seconds: float
    model: nn.Module | None = field(default=None, repr=False)
    lora: Any = field(default=None, repr=False)  # LoraModel, adapter still resident (tests compare it)
    weights: LoraWeights | None = field(default=None, repr=False)

    @property
    def final(self) -> dict[str, float]:
        return self.epochs[-1] if self.epochs else {}

    def as_dict(self) -> dict[str, Any]:
        """The JSON-able facts (the live model and LoraModel stay out)."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__ if f not in ("model", "lora", "weights")}


def _seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _split(data: data_mod.Dataset, fraction: float, g: torch.Generator) -> tuple[data_mod.Dataset, data_mod.Dataset]:
    order = torch.randperm(len(data), generator=g).tolist()
    n_eval = max(1, int(round(fraction * len(data))))
    if n_eval >= len(data):
        raise ValueError(f"--eval-fraction {fraction} leaves no training rows out of {len(data)}")
    pick = lambda idx: data_mod.Dataset(data.path, data.task, [data.rows[i] for i in sorted(idx)],  # noqa: E731
                                         [data.lines[i] for i in sorted(idx)])
    return pick(order[n_eval:]), pick(order[:n_eval])


def _schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    warm = int(warmup * steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (steps - step) / max(1, steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(args: TrainArgs, log=print) -> TrainResult:
    started = time.perf_counter()
    if args.task not in modes.TASK_TYPES:
        raise ValueError(f"unknown task {args.task!r}; expected one of {', '.join(modes.TASK_TYPES)}")
    base = Path(args.base_model or default_base_model())
    if not base.is_dir():
        raise FileNotFoundError(f"--base-model must be a local model directory (nothing is downloaded): {base}")
    g = _seed_everything(args.seed)

    train_data = data_mod.load_rows(args.data, args.task)
    labels = data_mod.label_names(train_data) if args.task == "classify" else None
    if args.eval:
        eval_data: data_mod.Dataset | None = data_mod.load_rows(args.eval, args.task, known_labels=labels)
    elif args.eval_fraction > 0:
        train_data, eval_data = _split(train_data, args.eval_fraction, g)
    else:
        eval_data = None
    if args.task == "embed" and len(train_data) < 2:
        raise data_mod.DataError(args.data, [(0, "embed learns from the other rows of a batch: give at least two")],
                                 header=f"{args.data}: one row")
    if labels is not None and len(labels) < 2:
        raise data_mod.DataError(args.data, [(0, f"only one label ({labels[0]!r}); a classifier needs two")],
                                 header=f"{args.data}: one label")

    tokenizer = modes.load_tokenizer(base)
    torch.manual_seed(args.seed)  # the fresh head's initialisation is drawn while loading
    model = modes.load_model(base, args.task, labels)
    if getattr(model.config, "pad_token_id", None) is None:  # GPT-style classifiers find the last token by it
        model.config.pad_token_id = tokenizer.pad_token_id
    base_params, base_bytes = model_footprint(model)
    frozen_before = dict(model.named_parameters())  # the very tensors; LoRA wraps them without copying
    before = modes.fingerprint(frozen_before) if args.mode == "lora" else None

    setup = modes.setup_mode(model, args.task, args.mode, rank=args.rank, alpha=args.alpha, targets=args.targets,
                             dropout=args.dropout, base_name=str(base))
    total_params = base_params + setup.added_parameters
    log(f"[{args.mode}] trainable parameters: {setup.trainable_parameters:,} of {total_params:,} "
        f"({100 * setup.trainable_parameters / total_params:.2f}%)")

    label2id = {label: i for i, label in enumerate(labels)} if labels else None
    train_ex = encode(train_data, tokenizer, args.max_length, label2id)
    eval_ex = encode(eval_data, tokenizer, args.max_length, label2id) if eval_data is not None else []
    epochs = _fit(model, setup, train_ex, eval_ex, args, tokenizer.pad_token_id, g, log)
    train_seconds = sum(e["seconds"] for e in epochs)

    base_unchanged = None
    if setup.lora is not None:
        base_unchanged = modes.fingerprint(frozen_before) == before
        if not base_unchanged:  # a bug, never a user error: say so loudly rather than write a wrong adapter
            raise RuntimeError("the frozen base changed during LoRA training")
    out = Path(args.out)
    weights, files = _save(setup, model, tokenizer, out, labels)
    checkpoint_bytes = sum((out / f).stat().st_size for f in files)
    return TrainResult(
        mode=args.mode, task=args.task, out=str(out), labels=labels, epochs=epochs,
        trainable_parameters=setup.trainable_parameters, total_parameters=total_params,
        base_parameters=base_params, base_bytes=base_bytes, checkpoint_bytes=checkpoint_bytes,
        checkpoint_files=files, adapter_bytes=weights.nbytes() if weights is not None else None,
        targets=setup.targets, base_unchanged=base_unchanged, train_seconds=train_seconds,
        total_seconds=time.perf_counter() - started, model=model, lora=setup.lora, weights=weights)


def _save(setup: modes.Setup, model: nn.Module, tokenizer, out: Path, labels: list[str] | None = None
          ) -> tuple[LoraWeights | None, list[str]]:
    """(adapter weights or None, the checkpoint's files). The tokenizer is saved beside a full
    checkpoint, so it runs on its own, but not counted in its bytes. A classifier adapter carries its
    label names in the safetensors metadata, so a service answers with them instead of LABEL_<i>."""
    out.mkdir(parents=True, exist_ok=True)
    if setup.lora is not None:
        weights = setup.lora.get_weights(modes.ADAPTER_NAME)
        weights.labels = [str(label) for label in labels] if labels else None  # JSON data may hold ints
        save_peft_dir(weights, out)
        return weights, [CONFIG_NAME, WEIGHTS_NAME]
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    files = sorted(p.name for p in out.iterdir()
                   if p.name in ("config.json", "generation_config.json") or p.name.startswith("model.safetensors")
                   or (p.name.startswith("model-") and p.suffix == ".safetensors"))  # sharded checkpoints
    return None, files


def _fit(model: nn.Module, setup: modes.Setup, train_ex: list[Example], eval_ex: list[Example], args: TrainArgs,
         pad_id: int, g: torch.Generator, log) -> list[dict[str, float]]:
    steps_per_epoch = -(-len(train_ex) // args.batch_size)
    optimizer = torch.optim.AdamW(setup.params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = _schedule(optimizer, steps_per_epoch * args.epochs, args.warmup)
    history: list[dict[str, float]] = []
    model.train()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(train_ex), generator=g).tolist()
        bar = tqdm(total=len(train_ex), desc=f"[{args.mode}] epoch {epoch}/{args.epochs}", unit="samples",
                   disable=not args.progress, dynamic_ncols=True, mininterval=0.5)
        t0 = time.perf_counter()
        loss_sum, seen = 0.0, 0
        for start, end in batch_spans(len(order), args.batch_size, args.task):
            batch = collate([train_ex[i] for i in order[start:end]], args.task, pad_id)
            loss, sums = batch_loss(model, batch, args.task)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(setup.params, 1.0)
            optimizer.step()
            scheduler.step()
            n = len(batch["input_ids"])
            loss_sum, seen = loss_sum + sums["loss_sum"] / max(sums["count"], 1) * n, seen + n
            bar.update(n)  # tqdm's own rate is the throughput, in samples/s
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        bar.close()
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "seconds": seconds,
               "samples_per_s": seen / seconds if seconds else 0.0}
        if eval_ex:
            row.update(evaluate(model, eval_ex, args.task, pad_id, args.batch_size))  # embed: same negatives
        history.append(row)
        log(f"[{args.mode}] epoch {epoch}: " + "  ".join(
            f"{k}={v:.4f}" for k, v in row.items() if k not in ("epoch", "seconds", "samples_per_s"))
            + f"  ({row['samples_per_s']:.1f} samples/s)")
    model.eval()
    return history
