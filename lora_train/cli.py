"""`lora-train`: fine-tune a LoRA adapter (or, to compare, the last layers or everything) and publish it.

    lora-train --data train.jsonl --eval eval.jsonl --task classify --out runs/sentiment
    lora-train --data train.jsonl --out runs/sentiment --upload http://127.0.0.1:8000 --name sentiment
    lora-train --data train.jsonl --eval eval.jsonl --out runs/compare --compare

Exit status: 0 done; 2 bad arguments or bad data (every bad row listed with its line number);
3 the upload failed; 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from lora_common.names import name_problem

__all__ = ["main", "build_parser", "args_from_namespace"]

EXIT_USAGE, EXIT_UPLOAD = 2, 3


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows real defaults only: "(default: None)" on every optional flag is noise."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-train", description=__doc__.split("\n\n")[0], formatter_class=_Help)
    p.add_argument("--base-model", metavar="DIR", help="local transformers checkpoint directory "
                   "(default: the packaged all-MiniLM-L6-v2; nothing is ever downloaded)")
    p.add_argument("--data", required=True, metavar="FILE", help="training rows, JSONL or CSV")
    p.add_argument("--eval", metavar="FILE", help="evaluation rows, same format")
    p.add_argument("--eval-fraction", type=float, default=0.0,
                   help="without --eval: hold out this share of --data for evaluation")
    p.add_argument("--task", choices=("classify", "generate", "embed"), default="classify",
                   help="classify: text,label; generate: prompt,completion; embed: text,positive")
    p.add_argument("--mode", choices=("lora", "last-layers", "full"), default="lora",
                   help="what trains; only lora writes an adapter, the others a full checkpoint")
    p.add_argument("--compare", action="store_true", help="run all three modes on the same data; print one table")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=16, help="LoRA alpha (scaling alpha/r)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    p.add_argument("--targets", nargs="+", metavar="MODULE",
                   help="modules to adapt (names or suffixes, 'all-linear', or one regex); "
                        "default: the architecture's attention query/value")
    p.add_argument("--epochs", type=int, default=3, help="passes over --data")
    p.add_argument("--lr", type=float, default=5e-4, help="learning rate (LoRA)")
    p.add_argument("--dense-lr", type=float, metavar="LR",
                   help="learning rate for --mode last-layers/full (default: --lr); dense fine-tuning "
                        "usually wants ~10x less than LoRA")
    p.add_argument("--batch-size", type=int, default=16, help="rows per optimiser step")
    p.add_argument("--max-length", type=int, default=128, help="tokens per row; longer rows are truncated")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--warmup", type=float, default=0.06, help="share of steps with linear warm-up")
    p.add_argument("--seed", type=int, default=0, help="same seed, same data, same machine: same adapter bytes")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--upload", metavar="URL", help="after training, PUT the adapter to this lora-service")
    p.add_argument("--name", help="adapter name on the service (required with --upload)")
    # Read from the environment at upload time, not as the default: --help must never print a key.
    p.add_argument("--api-key", help="bearer key for --upload (an admin key); default: $LORA_API_KEY")
    p.add_argument("--overwrite", action="store_true", help="with --upload: store a new version of an existing name")
    p.add_argument("--threads", type=int, metavar="N", help="torch intra-op threads (default: torch's choice; "
                   "on a busy machine fewer threads can be much faster)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _targets(values: list[str] | None) -> list[str] | str | None:
    if not values:
        return None
    items = [t for v in values for t in v.split(",") if t]
    if len(items) == 1 and (items[0] == "all-linear" or any(c in items[0] for c in "*+?[]()|\\^$")):
        return items[0]  # "all-linear" or one regex, matched against the whole module name
    return items


def args_from_namespace(ns: argparse.Namespace):
    from lora_train.trainer import TrainArgs

    alpha = int(ns.alpha) if float(ns.alpha).is_integer() else ns.alpha  # 16, not 16.0, in adapter_config.json
    return TrainArgs(data=ns.data, out=ns.out, task=ns.task, base_model=ns.base_model, eval=ns.eval,
                     eval_fraction=ns.eval_fraction, mode=ns.mode, rank=ns.rank, alpha=alpha, dropout=ns.dropout,
                     targets=_targets(ns.targets), epochs=ns.epochs, lr=ns.lr, batch_size=ns.batch_size,
                     max_length=ns.max_length, weight_decay=ns.weight_decay, warmup=ns.warmup, seed=ns.seed,
                     progress=not ns.no_progress)


def _check(p: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    if ns.upload and not ns.name:
        p.error("--upload needs --name")
    if ns.upload and ns.mode != "lora" and not ns.compare:
        p.error("--upload sends a LoRA adapter; --mode last-layers/full write full checkpoints instead")
    for flag in ("rank", "epochs", "batch_size", "max_length", "threads"):
        if getattr(ns, flag) is not None and getattr(ns, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if not 0.0 <= ns.eval_fraction < 1.0:
        p.error("--eval-fraction must be in [0, 1)")
    for flag in ("lr", "dense_lr", "alpha"):
        value = getattr(ns, flag)
        if value is not None and not (math.isfinite(value) and value > 0):
            p.error(f"--{flag.replace('_', '-')} must be a positive number")
    if not 0.0 <= ns.warmup <= 1.0:
        p.error("--warmup is a fraction of the training steps, in [0, 1]")
    if ns.task == "embed" and ns.batch_size is not None and ns.batch_size < 2:
        p.error("--task embed learns from the other rows of its batch (in-batch negatives): --batch-size >= 2")
    blocker = next((q for q in (Path(ns.out), *Path(ns.out).parents) if q.exists() and not q.is_dir()), None)
    if blocker is not None:
        p.error(f"--out {ns.out}: {blocker} exists and is not a directory")
    if ns.upload:
        if urlsplit(ns.upload).scheme not in ("http", "https") or not urlsplit(ns.upload).netloc:
            p.error(f"--upload {ns.upload!r}: give the service's http:// or https:// URL")
        problem = name_problem(ns.name)  # the service's own rule: refused now, not after hours of training
        if problem is not None:
            p.error(f"--name {ns.name!r}: {problem}")


def _quiet_transformers() -> None:
    # Loading reports and progress bars from transformers would drown our own bar; errors still show.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _api_key(ns: argparse.Namespace) -> str | None:
    from lora_train.upload import UploadEnvironment

    from_env = UploadEnvironment().api_key
    return ns.api_key or (from_env.get_secret_value() if from_env else None)


def _upload(ns: argparse.Namespace, adapter_dir: str) -> None:
    from lora_train.upload import upload_adapter

    answer = upload_adapter(ns.upload, ns.name, adapter_dir, api_key=_api_key(ns), overwrite=ns.overwrite)
    print(f"uploaded {ns.name!r} to {ns.upload}; the service answered:")
    print(json.dumps(answer, indent=2) if not isinstance(answer, str) else answer)


def _run(ns: argparse.Namespace) -> None:
    from lora_train import report
    from lora_train.modes import MODES
    from lora_train.trainer import train

    args = args_from_namespace(ns)
    if ns.upload:  # the service, the key and the name are checked before a run that could take hours
        from lora_train.upload import check_upload_target

        check_upload_target(ns.upload, ns.name, api_key=_api_key(ns), overwrite=ns.overwrite)
    if not ns.compare:
        if ns.dense_lr is not None and args.mode != "lora":
            args = replace(args, lr=ns.dense_lr)
        result = train(args)
        report.write_report(args, result)
        print("\n".join(report.summary_lines(result)))
        if ns.upload:
            _upload(ns, result.out)
        return
    if not args.eval and args.eval_fraction == 0:
        args = replace(args, eval_fraction=0.1)
        print("--compare without --eval: holding out 10% of the training rows for evaluation")
    results = []
    for mode in MODES:
        lr = ns.dense_lr if (ns.dense_lr is not None and mode != "lora") else args.lr
        run_args = replace(args, mode=mode, lr=lr, out=str(Path(args.out) / mode))
        result = train(run_args)
        report.write_report(run_args, result)
        print("\n".join(report.summary_lines(result)))
        results.append(result)
        result.model = result.lora = None  # three models at once would triple the memory for nothing
    path = report.write_compare(Path(args.out) / report.COMPARE_NAME, args, results)
    print()
    print(report.compare_table(report.compare_rows(results), args.task))
    print(f"\nwrote {path}")
    if ns.upload:
        _upload(ns, str(Path(args.out) / "lora"))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    _check(parser, ns)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: every path is local anyway
    if ns.threads:
        import torch

        torch.set_num_threads(ns.threads)
    _quiet_transformers()
    from adapters.errors import AdapterError
    from lora_train.data import DataError
    from lora_train.upload import UploadError

    try:
        _run(ns)
    except DataError as exc:
        print(f"lora-train: bad data: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (AdapterError, OSError, ValueError) as exc:  # OSError: e.g. --out not writable
        print(f"lora-train: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UploadError as exc:
        print(f"lora-train: {exc}", file=sys.stderr)
        return EXIT_UPLOAD
    return 0


if __name__ == "__main__":
    sys.exit(main())
