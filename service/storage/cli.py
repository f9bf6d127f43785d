"""`lora-store gc`: collect garbage in a store, safely while a server (or several) uses it.

    lora-store gc --store ./store/all-MiniLM-L6-v2-1a2b3c4d5e6f            # grace: one hour
    lora-store gc --store /data/store --grace-seconds 0                    # only when nothing else writes
    lora-store gc --index-url postgresql://lora:PW@db/lora --blob-url s3://adapters/prod   # a shared store

Removes blobs orphaned (by deletes and overwrites) for longer than the grace period, unreferenced
leftovers of crashed uploads older than it, interrupted writes older than it, and the index's change-log
records older than it (all but the newest); prints what it did as JSON (`changes_pruned`: how many
records). The store is named as lora-serve names it (--store, --index-url, --blob-url, or their LORA_*
variables; S3 endpoint and keys from AWS_*). A server runs the same step, with the default grace, when it
starts on local blobs; blobs in a bucket are collected only by this command (run it from cron, say).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from service.storage import DEFAULT_GRACE_S, StorageUnavailableError, open_store
from service.storage.backends import unreachable_message

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-store", description="Maintenance of a lora-service adapter store.")
    commands = parser.add_subparsers(dest="command", required=True)
    gc = commands.add_parser("gc", help="remove orphaned blobs, leftovers and change-log records older than "
                                       "the grace period")
    gc.add_argument("--store", type=Path, help="the store directory (as given to lora-serve --store); needed for "
                                               "whatever --index-url / --blob-url leave local")
    gc.add_argument("--index-url", help="postgresql://... (as given to lora-serve; default LORA_INDEX_URL)")
    gc.add_argument("--blob-url", help="s3://bucket/prefix or file:///path (as given to lora-serve; default "
                                       "LORA_BLOB_URL)")
    gc.add_argument("--grace-seconds", type=float, default=DEFAULT_GRACE_S,
                    help=f"leave anything younger than this alone (default {DEFAULT_GRACE_S:.0f}: an upload in "
                         "progress elsewhere is never touched); 0 only when no other process writes to the store")
    return parser


def _settings(args: argparse.Namespace):
    from service.settings import Settings  # the one place settings are read (LORA_* included)

    given = {k: v for k, v in (("store", args.store), ("index_url", args.index_url), ("blob_url", args.blob_url))
             if v is not None}
    return Settings(**given, name_cache_ttl_s=0)  # no name cache: one pass, no listener


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.grace_seconds < 0:
        print("lora-store: --grace-seconds must be >= 0", file=sys.stderr)
        return 2
    try:
        settings = _settings(args)
    except ValueError as exc:  # pydantic's ValidationError is one
        print(f"lora-store: {exc}", file=sys.stderr)
        return 2
    if settings.store is None and not (settings.index_url and settings.blob_url):
        print("lora-store: name the store: --store, or --index-url and --blob-url", file=sys.stderr)
        return 2
    if settings.index_url is None and not (settings.store / "index.sqlite3").is_file():
        print(f"lora-store: {settings.store} is not a store (no index.sqlite3)", file=sys.stderr)
        return 2
    try:
        store = open_store(settings)
        try:
            report = store.collect_garbage(args.grace_seconds)
        finally:
            store.close()
    except StorageUnavailableError as exc:
        print(f"lora-store: {unreachable_message(settings, exc)}", file=sys.stderr)
        return 1
    print(json.dumps(report.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
