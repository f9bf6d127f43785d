"""`lora-store gc`: collect garbage in a store, safely while a server (or several) uses it.

    lora-store gc --store ./store/all-MiniLM-L6-v2-1a2b3c4d5e6f            # grace: one hour
    lora-store gc --store /data/store --grace-seconds 0                    # only when nothing else writes

Removes blobs orphaned (by deletes and overwrites) for longer than the grace period, unreferenced
leftovers of crashed uploads older than it, and interrupted writes older than it; prints what it did as
JSON. The server runs the same step, with the default grace, when it starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from service.storage import DEFAULT_GRACE_S, open_store

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-store", description="Maintenance of a lora-service adapter store.")
    commands = parser.add_subparsers(dest="command", required=True)
    gc = commands.add_parser("gc", help="remove orphaned blobs and leftovers older than the grace period")
    gc.add_argument("--store", type=Path, required=True, help="the store directory (as given to lora-serve --store)")
    gc.add_argument("--grace-seconds", type=float, default=DEFAULT_GRACE_S,
                    help=f"leave anything younger than this alone (default {DEFAULT_GRACE_S:.0f}: an upload in "
                         "progress elsewhere is never touched); 0 only when no other process writes to the store")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.grace_seconds < 0:
        print("lora-store: --grace-seconds must be >= 0", file=sys.stderr)
        return 2
    if not (args.store / "index.sqlite3").is_file():
        print(f"lora-store: {args.store} is not a store (no index.sqlite3)", file=sys.stderr)
        return 2
    from service.settings import Settings  # the one place settings are read

    store = open_store(Settings(store=args.store))
    try:
        report = store.collect_garbage(args.grace_seconds)
    finally:
        store.close()
    print(json.dumps(report.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
