"""The only code in cluster mode that knows the store's API: open it, resolve a name, read one exact version.

Today that is `service.store.AdapterStore` (SQLite index + blob directory on a path every replica can
read). When the storage seam lands (`service.storage.open_store(settings)` with `resolve(name)` and a
BlobStore), the three functions marked SEAM are the one-line changes; nothing else in service/cluster
touches the store.

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
from service.cluster.affinity import adapter_key, parse_key
from service.store import AdapterStore, adapter_digest

__all__ = ["open_store", "resolve", "read_version", "PinnedStore", "PinsFile"]


class _ReaderStore(AdapterStore):
    """Today's store without its start-up recovery: that removes tmp/ entries and blobs no row points at
    yet, which are exactly an upload in progress in the ingress. Replicas only read."""

    def _recover(self) -> None:
        pass


def open_store(settings: Any, *, writer: bool = True) -> AdapterStore:
    """The ingress opens the writer (one process: it recovers after a crash); replicas open readers.
    SEAM: becomes `service.storage.open_store(settings)` (its GC has a grace period, so any process may)."""
    return AdapterStore(settings.store) if writer else _ReaderStore(settings.store)


def resolve(store: Any, name: str) -> tuple[str, str]:
    """(name, sha256) the name points at now; UnknownAdapterError (404) if none. SEAM: `store.resolve(name)`."""
    record = store.get(name)
    return record.name, record.sha256


def _read_blob(store: Any, sha256: str, filename: str) -> bytes:
    """SEAM: becomes `store.blobs.get(sha256, filename)` (raises FileNotFoundError alike)."""
    return (store.blobs / sha256[:2] / sha256 / filename).read_bytes()


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


class PinnedStore:
    """A replica Engine's store: adapter "names" are keys `name@sha256`, each an immutable version."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def get(self, key: str) -> _Version:
        name, sha = parse_key(key)
        if sha is None:
            raise UnknownAdapterError(f"adapter {key!r} not found: a replica serves `name@sha256` keys", key=key)
        return _Version(key, sha)

    def load_weights(self, key: str) -> LoraWeights:
        name, sha = parse_key(key)
        if sha is None:
            raise UnknownAdapterError(f"adapter {key!r} not found", key=key)
        return read_version(self.store, name, sha)

    def key_of(self, name: str) -> str:
        return adapter_key(*resolve(self.store, name))

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
