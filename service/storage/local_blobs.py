"""`LocalBlobStore`: the BlobStore of the embedded store, a directory on local disk.

    <root>/blobs/<sha[:2]>/<sha256>/   the files of one adapter (adapter_config.json, adapter_model.safetensors)
    <root>/tmp/                        writes in progress, and deletes on their way out

A put writes every file into a fresh tmp/ directory, fsyncs them and the directory, and renames it into
blobs/ (atomic): a reader sees the whole blob or none of it, and a crash (kill -9 included) leaves at
worst a tmp/ entry, which `collect_temporary` removes once it is older than the grace period, never
earlier, since it may be another process's upload in progress. A delete renames the blob into tmp/
first, for the same reason. Digests are checked to be 64 hex digits: names are never used as paths.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

__all__ = ["LocalBlobStore"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FILENAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


class LocalBlobStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.blobs, self.tmp = self.root / "blobs", self.root / "tmp"
        for d in (self.root, self.blobs, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise ValueError(f"not a sha256 digest: {sha256!r}")
        return self.blobs / sha256[:2] / sha256

    def put(self, sha256: str, files: Mapping[str, bytes]) -> bool:
        blob = self.path(sha256)
        if blob.is_dir():
            return False
        staging = self._stage(files)
        try:
            for attempt in range(3):
                created = not blob.parent.exists()
                blob.parent.mkdir(exist_ok=True)
                try:
                    os.rename(staging, blob)  # the commit point of the files
                    break
                except FileNotFoundError:  # a delete removed the (empty) shard directory just now: make it again
                    if attempt == 2:
                        raise
                except OSError:
                    if blob.is_dir():  # another writer (thread or process) put the same bytes meanwhile
                        return False
                    raise
            staging = None
            _fsync_dir(blob.parent)
            _fsync_dir(self.tmp)
            if created:
                _fsync_dir(self.blobs)
            return True
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)

    def get(self, sha256: str, filename: str) -> bytes:
        if not _FILENAME.fullmatch(filename):
            raise FileNotFoundError(filename)
        return (self.path(sha256) / filename).read_bytes()

    def exists(self, sha256: str) -> bool:
        blob = self.path(sha256)
        return blob.is_dir() and any(blob.iterdir())

    def delete(self, sha256: str) -> None:
        blob = self.path(sha256)
        doomed = self.tmp / f"deleting-{uuid.uuid4().hex}"
        try:
            os.rename(blob, doomed)  # gone at once for readers; the slow rmtree happens out of sight
        except FileNotFoundError:
            return
        shutil.rmtree(doomed, ignore_errors=True)
        try:  # the shard directory, once empty (another put may have refilled it: then it stays)
            blob.parent.rmdir()
        except OSError:
            pass

    def list(self) -> Iterator[tuple[str, float]]:
        for shard in self.blobs.iterdir():
            if not shard.is_dir():
                continue
            for blob in shard.iterdir():
                if _SHA256.fullmatch(blob.name):
                    try:
                        yield blob.name, blob.stat().st_mtime
                    except FileNotFoundError:  # deleted while we listed
                        continue

    def collect_temporary(self, older_than_s: float) -> int:
        cutoff, removed = time.time() - older_than_s, 0
        for entry in self.tmp.iterdir():
            try:
                if entry.lstat().st_mtime > cutoff:
                    continue  # perhaps another process's upload in progress
            except FileNotFoundError:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
        return removed

    def close(self) -> None:
        pass

    def _stage(self, files: Mapping[str, bytes]) -> Path:
        """Every file in a fresh tmp/ directory, fsync'd; the caller renames it into place."""
        staging = self.tmp / uuid.uuid4().hex
        staging.mkdir()
        try:
            for filename, data in files.items():
                if not _FILENAME.fullmatch(filename):
                    raise ValueError(f"not a plain file name: {filename!r}")
                with open(staging / filename, "xb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            _fsync_dir(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
