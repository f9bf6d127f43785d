"""The only code in cluster mode that knows the store's API: open it, resolve a name, read one exact version.

It is `service.storage.open_store(settings)`: the embedded SQLite index and blob directory on a path every
replica can read, or the shared PostgreSQL index and S3 blobs (`--index-url`, `--blob-url`). Opening a store
deletes nothing (garbage collection has a grace period), so the ingress and every replica may open it.

Replicas never ask "what does this name point at now": the ingress resolves the name once per request
and sends `name@sha256`; `PinnedStore` (what a replica's Engine sees as its store) reads exactly that
blob and checks its digest, so a replica cannot serve a version other than the one the request named.

The pins record (`ClusterPins`) is the cluster's desired merge state: which adapter an explicit merge
pinned on every replica. It lives in the store's index (a compare-and-set meta record: SQLite, or the
shared PostgreSQL, so replicas on every machine read the same one), written by an ingress and read by each
replica on start and every `pin_poll_s`, so a replica restarted after a crash, or added by the
autoscaler, merges the pin too; nothing about it lives only in a process that can die.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from adapters import LoraWeights, UnknownAdapterError, weights_from_bytes
from adapters.serialization import CONFIG_NAME, WEIGHTS_NAME
from service import storage
from service.cluster.affinity import adapter_key, parse_key
from service.storage import AdapterStore, adapter_digest

__all__ = ["open_store", "resolve", "read_version", "PinnedStore", "ClusterPins"]


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


class ClusterPins:
    """{"merged": name or null, "seq": n}: what an explicit merge pinned cluster-wide, in the store's index
    (meta key `cluster_pins`). Synchronous, like the index: call it from a worker thread."""

    KEY = "cluster_pins"

    def __init__(self, store: Any) -> None:
        self.index = store.index

    def read(self) -> dict[str, Any]:
        return _decode(self.index.get_meta(self.KEY))

    def write(self, merged: str | None, *, only_if: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Pin `merged` (None: nothing) under the next seq; the record written. With `only_if` (a record read or
        written before), only while the record is still that one: None if another ingress changed it since."""
        return self.swap(merged, only_if=only_if)[1]

    def swap(self, merged: str | None, *, only_if: dict[str, Any] | None = None
             ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """As `write`, returning (the record it replaced, the record written or None)."""
        while True:  # compare-and-set: another ingress writing at the same moment makes one of us read again
            raw = self.index.get_meta(self.KEY)
            current = _decode(raw)
            if only_if is not None and current != only_if:
                return current, None
            record = {"merged": merged, "seq": int(current.get("seq", 0)) + 1}
            if self.index.compare_and_set_meta(self.KEY, raw, json.dumps(record)):
                return current, record


def _decode(raw: str | None) -> dict[str, Any]:
    return {"merged": None, "seq": 0} if raw is None else json.loads(raw)
