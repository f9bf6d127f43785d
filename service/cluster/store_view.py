"""The only code in cluster mode that knows the store's API: open it, resolve a name, read one exact version.

It is `service.storage.open_store(settings)`: the embedded SQLite index and blob directory on a path every
replica can read, or the shared PostgreSQL index and S3 blobs (`--index-url`, `--blob-url`). Opening a store
deletes nothing (garbage collection has a grace period), so the ingress and every replica may open it.

Replicas never ask "what does this name point at now": the ingress resolves the name once per request
and sends `name@sha256`; `PinnedStore` (what a replica's Engine sees as its store) reads exactly that
blob and checks its digest, so a replica cannot serve a version other than the one the request named.

The pins record (`PinsFile`) is the cluster's desired merge state: which adapter an explicit merge
pinned on every replica. It lives beside the store, written atomically by the ingress and read by each
replica on start and every `pin_poll_s`, so a replica restarted after a crash, or added by the
autoscaler, merges the pin too; nothing about it lives only in a process that can die.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters import LoraWeights, UnknownAdapterError, weights_from_bytes
from adapters.serialization import CONFIG_NAME, WEIGHTS_NAME
from service import storage
from service.cluster.affinity import adapter_key, parse_key
from service.storage import AdapterStore, adapter_digest

__all__ = ["open_store", "resolve", "read_version", "PinnedStore", "PinsFile"]


def open_store(settings: Any) -> AdapterStore:
    return storage.open_store(settings)


def resolve(store: Any, name: str) -> tuple[str, str, int]:
    """(name, sha256, version) the name points at now; UnknownAdapterError (404) if none."""
    record = store.resolve(name)
    return record.name, record.sha256, record.version


def _read_blob(store: Any, sha256: str, filename: str) -> bytes:
    return store.blobs.get(sha256, filename)  # FileNotFoundError once the blob is gone


def read_version(store: Any, name: str, sha256: str) -> LoraWeights:
    """Exactly the version `sha256` of `name`, checked against its digest; 404 once the blob is gone."""
    try:
        config_bytes, model_bytes = _read_blob(store, sha256, CONFIG_NAME), _read_blob(store, sha256, WEIGHTS_NAME)
    except FileNotFoundError as exc:  # deleted, or overwritten and collected, after the request was resolved
        raise UnknownAdapterError(f"adapter {name!r} (version {sha256[:12]}) not found", key=name) from exc
    if adapter_digest(config_bytes, model_bytes) != sha256:
        raise UnknownAdapterError(f"adapter {name!r}: stored files do not match {sha256[:12]}", key=name)
    return weights_from_bytes(config_bytes, model_bytes)


@dataclass(frozen=True)
class _Version:
    name: str
    sha256: str
    version: int = 0  # unknown on a replica: the ingress, which resolved the name, reports the version


class PinnedStore:
    """A replica Engine's store: adapter "names" are keys `name@sha256`, each an immutable version."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def resolve(self, key: str) -> _Version:
        name, sha = parse_key(key)
        if sha is None:
            raise UnknownAdapterError(f"adapter {key!r} not found: a replica serves `name@sha256` keys", key=key)
        return _Version(key, sha)

    get = resolve

    def load_weights(self, ref: Any) -> LoraWeights:
        key = ref if isinstance(ref, str) else ref.name
        name, sha = parse_key(key)
        if sha is None:
            raise UnknownAdapterError(f"adapter {key!r} not found", key=key)
        return read_version(self.store, name, sha)

    def key_of(self, name: str) -> str:
        name, sha, _ = resolve(self.store, name)
        return adapter_key(name, sha)

    def close(self) -> None:
        self.store.close()


class PinsFile:
    """{"merged": name or null, "seq": n}: what an explicit merge pinned cluster-wide."""

    def __init__(self, store_root: str | os.PathLike) -> None:
        self.path = Path(store_root) / "cluster" / "pins.json"

    def read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"merged": None, "seq": 0}

    def write(self, merged: str | None) -> dict[str, Any]:
        record = {"merged": merged, "seq": self.read().get("seq", 0) + 1}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".pins-{uuid.uuid4().hex}")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.path)  # readers see the old record or the new one, never half of one
        return record
