"""Copy a store into another, keeping names, versions and dates: local to shared, shared to local, or any mix.

    python -m service.storage.migrate --from-store ./store \\
        --to-index-url postgresql://lora@db/lora --to-blob-url s3://adapters/prod
    python -m service.storage.migrate --from-index-url postgresql://... --from-blob-url s3://... --to-store ./copy

Idempotent: a name already in the destination with the same sha256 is skipped, so an interrupted copy
is resumed by running it again. A name there with other bytes is a conflict: reported, left alone.
Each blob is written before its row (the store's rule), so a crash mid-copy leaves at worst a blob
without a row, which garbage collection removes. Stop the writers first, or run it again after them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters import UnknownAdapterError
from adapters.serialization import CONFIG_NAME, WEIGHTS_NAME
from service.storage.interfaces import AdapterIndex, AdapterRecord, BlobStore, NewAdapter

__all__ = ["copy_store", "CopyReport", "main"]

FILENAMES = (CONFIG_NAME, WEIGHTS_NAME)


@dataclass
class CopyReport:
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already there, same bytes
    conflicts: list[str] = field(default_factory=list)  # already there, other bytes: left alone

    def as_dict(self) -> dict[str, Any]:
        return {"copied": len(self.copied), "skipped": len(self.skipped), "conflicts": self.conflicts}


def _records(index: AdapterIndex) -> Iterator[AdapterRecord]:
    after = None
    while True:
        page, more = index.list(limit=200, after=after)
        yield from page
        if not more or not page:
            return
        after = page[-1].name


def copy_store(src_index: AdapterIndex, src_blobs: BlobStore, dst_index: AdapterIndex, dst_blobs: BlobStore,
               *, meta_keys: Iterable[str] = ()) -> CopyReport:
    """Copy every adapter (and the store-wide facts `meta_keys`) from src to dst; see the module docstring."""
    for key in meta_keys:  # e.g. the base model's identity: adapters must not land in another base's store
        value = src_index.get_meta(key)
        if value is not None and dst_index.set_meta_if_absent(key, value) != value:
            raise ValueError(f"the destination's {key!r} differs from the source's; refusing to mix the stores")
    report = CopyReport()
    for record in _records(src_index):
        try:
            there = dst_index.get(record.name)
        except UnknownAdapterError:
            there = None
        if there is not None:
            (report.skipped if there.sha256 == record.sha256 else report.conflicts).append(record.name)
            continue
        if not dst_blobs.exists(record.sha256):
            dst_blobs.put(record.sha256, {f: src_blobs.get(record.sha256, f) for f in FILENAMES})
        dst_index.put(NewAdapter(name=record.name, sha256=record.sha256, bytes=record.bytes, rank=record.rank,
                                 targets=list(record.targets), num_parameters=record.num_parameters,
                                 task_type=record.task_type, meta=dict(record.meta), version=record.version,
                                 created_at=record.created_at), overwrite=False)
        report.copied.append(record.name)
    return report


def _open(store: Path | None, index_url: str | None, blob_url: str | None) -> tuple[AdapterIndex, BlobStore, list]:
    """(index, blobs, things to close): the store lora-serve would open with these settings (open_store), the
    local store directory for what no URL names. Explicit here, so LORA_INDEX_URL & co. never pick a side."""
    if store is None and not (index_url and blob_url):
        raise SystemExit("each side needs --*-store DIR or both --*-index-url and --*-blob-url")
    from service.settings import Settings
    from service.storage import open_store

    opened = open_store(Settings(store=store, index_url=index_url, blob_url=blob_url, name_cache_ttl_s=0))
    return opened.index, opened.blobs, [opened]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.storage.migrate", description=__doc__.split("\n")[0])
    for side in ("from", "to"):
        parser.add_argument(f"--{side}-store", type=Path, help="a local store directory (--store of lora-serve)")
        parser.add_argument(f"--{side}-index-url", help="postgresql://... (instead of the store's SQLite index)")
        parser.add_argument(f"--{side}-blob-url", help="s3://bucket/prefix or file:///path (instead of its blobs)")
    parser.add_argument("--meta-key", action="append", default=[], help="a store-wide fact to carry over (repeat)")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        src_index, src_blobs, closers = _open(args.from_store, args.from_index_url, args.from_blob_url)
        stack.callback(lambda: [c.close() for c in closers])
        dst_index, dst_blobs, closers2 = _open(args.to_store, args.to_index_url, args.to_blob_url)
        stack.callback(lambda: [c.close() for c in closers2])
        report = copy_store(src_index, src_blobs, dst_index, dst_blobs, meta_keys=args.meta_key)
    print(json.dumps(report.as_dict()))
    return 1 if report.conflicts else 0


if __name__ == "__main__":
    sys.exit(main())
