"""ClusterEngine: what the ingress's routes see as their engine. It resolves, routes and fans out.

    engine.embed("support", texts)
      -> resolve "support" in the store: (name, sha256)  -> key "support@5442…"
      -> replicas.options(multiplexed_model_id=key).embed.remote(key, texts)       (the router picks one)
      -> its result, or its domain error re-raised here (so the service's error mapping answers it)

Every call has a deadline (`cluster_request_timeout_s`); a replica that dies under a request answers
503 in the service's error shape, never a hang. Requests that are idempotent (embed, classify, a
completion that is not streamed) are sent once more when their replica died before answering, so only
streams already under way can fail with their replica. A key whose blob vanished between resolve and
load (an overwrite or delete in between) is resolved once more.

Admin calls reach every replica, one call each (routing.py): state, metrics, and "reconcile" after the
pins record changed. The pins record itself (store_view.ClusterPins, in the store's index) is the durable
truth a restarted replica reads, so a replica the fan-out missed still converges within
`cluster_pin_poll_s`. With several ingresses, each writes the record by compare-and-set, so a merge's
rollback or a delete's unpin never undoes what another ingress pinned meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.context import _set_request_context
from ray.serve.exceptions import DeploymentUnavailableError, RequestCancelledError

from adapters import UnknownAdapterError
from service.base_model import LoadedBase
from service.cluster.affinity import BASE, adapter_key, control_id
from service.cluster.routing import live_replica_ids, routing_stats
from service.cluster.store_view import ClusterPins, resolve
from service.engine import CompletionChunk, CompletionRequest, EngineBusyError
from service.engine.identity import BASE_FINGERPRINT, AdapterRef, system_fingerprint
from service.engine.weights import BaseValidator

__all__ = ["ClusterEngine", "ReplicaUnavailableError", "ReplicaTimeoutError"]

log = logging.getLogger("service.cluster")
_REPLICA_GONE = (RayActorError, DeploymentUnavailableError, RequestCancelledError)
CONTROL_TIMEOUT_S = 10.0


class ReplicaUnavailableError(EngineBusyError):
    """The replica died (or was restarted) under the request: 503, the client may retry."""


class ReplicaTimeoutError(EngineBusyError):
    """No answer within cluster_request_timeout_s: 503."""


def _own_request_id() -> None:
    """Give the next handle call an internal request id of its own. Serve copies the id of the HTTP request
    being handled to every sub-request it makes, and its router hands a chosen replica to the first pending
    request with that id: two concurrent sub-requests (the fan-out, a multi-prompt completion) could swap
    replicas, and a call addressed to one replica could wait forever. The change stays in the calling
    task's context (asyncio copies contexts per task)."""
    _set_request_context(_internal_request_id=uuid.uuid4().hex)


def _unwrap(exc: BaseException) -> BaseException:
    """A replica's own exception, as it raised it (Ray wraps it in a RayTaskError with a traceback)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(exc, RayTaskError) and isinstance(cause, BaseException) else exc


class ClusterEngine:
    def __init__(self, settings: Any, base: LoadedBase, store: Any, replicas: Any, deployment: str) -> None:
        self.settings, self.base, self.store = settings, base, store
        self.replicas, self.deployment = replicas, deployment
        self.validate = BaseValidator(base, settings.max_rank)  # as a single server's Engine.validate
        self.pins = ClusterPins(store)
        self.by_adapter = settings.cluster_router != "spread"  # spread: Ray places requests ignoring the adapter
        self.timeout = settings.cluster_request_timeout_s
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ what the routes call
    @property
    def ready(self) -> bool:
        """/readyz: at least one replica is running (as this process's router sees them)."""
        return bool(live_replica_ids(self.deployment))

    async def warm_up(self) -> None:
        """Create the router now (it is lazy), so replicas are known before the first request needs them."""
        try:
            await self.replica_ids()
        except Exception as exc:  # noqa: BLE001 - the first request will try again
            log.warning("no replica answered yet: %s", exc)

    def prefetch(self, name: str) -> None:
        """Nothing: the replica an adapter's requests go to loads it on first use, off its batching loop."""

    def forget(self, name: str, *, replaced: bool = False) -> None:
        """After an overwrite or delete. Requests need nothing (each is resolved to a sha256 anew); the
        pins follow (a deleted pin is dropped; an overwritten one moves to the new version, as on one
        server) and replicas drop the old version from their caches."""
        async def follow() -> None:
            if not replaced:
                await asyncio.to_thread(self._unpin, name)
            await self.fanout("forget", name)

        task = asyncio.get_running_loop().create_task(follow())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _unpin(self, name: str) -> None:
        current = self.pins.read()
        if current.get("merged") == name:
            self.pins.write(None, only_if=current)

    async def embed(self, model: str, texts: list[str], *, prompt: str | None = None,
                    prompt_name: str | None = None) -> Any:
        return await self._call(model, lambda h, key: h.embed.remote(key, texts, prompt, prompt_name))

    async def classify(self, model: str, texts: list[str]) -> Any:
        return await self._call(model, lambda h, key: h.classify.remote(key, texts))

    async def complete(self, request: CompletionRequest) -> Any:
        return await self._call(request.model,
                                lambda h, key: h.complete.remote(dataclasses.replace(request, model=key)))

    async def stream(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]:
        key, fingerprint = await self._resolve(request.model)
        _own_request_id()
        handle = self.replicas.options(stream=True, **self._mux(key))
        chunks = handle.stream.remote(dataclasses.replace(request, model=key))
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(chunks.__anext__(), self.timeout)
                except StopAsyncIteration:
                    return
                except TimeoutError as exc:
                    raise ReplicaTimeoutError(f"no token within {self.timeout:g} s") from exc
                except _REPLICA_GONE as exc:
                    raise ReplicaUnavailableError(f"the replica serving this stream failed: {exc}") from None
                except RayTaskError as exc:
                    raise _unwrap(exc) from None
                chunk.system_fingerprint = fingerprint  # the replica knows the sha256, not the version
                yield chunk
        finally:
            chunks.cancel()

    async def merge(self, name: str) -> dict:
        await self._key(name)  # 404 before anything changes
        previous, mine = await asyncio.to_thread(self.pins.swap, name)
        failures = [r for _, r in await self.fanout("reconcile") if isinstance(r, BaseException)]
        if failures:  # e.g. a merge that would overflow (422): put the pins back as they were, everywhere
            await asyncio.to_thread(self.pins.write, previous.get("merged"), only_if=mine)  # unless re-pinned since
            await self.fanout("reconcile")
            raise failures[0]
        return await self.state(fingerprints=False)

    async def unmerge(self) -> dict:
        await asyncio.to_thread(self.pins.write, None)
        await self.fanout("reconcile")
        return await self.state(fingerprints=False)

    async def state(self, fingerprints: bool = True) -> dict:
        """The cluster's state, then each replica's under "replicas" (merged adapter, resident adapters,
        cold loads so far, requests served). The top level shows a merge only if every replica has it."""
        answers = await self.fanout("state", fingerprints)
        pinned = (await asyncio.to_thread(self.pins.read)).get("merged") is not None
        replicas = [r if not isinstance(r, BaseException) else {"replica": rid, "error": str(_unwrap(r))}
                    for rid, r in answers]
        ok = [r for r in replicas if "error" not in r]
        merged = {r["merged_adapter"] for r in ok}
        common = merged.pop() if len(merged) == 1 and ok else None

        def same(field: str) -> Any:
            values = {r.get(field) for r in ok}
            return values.pop() if len(values) == 1 else None

        return {"merged_adapter": common, "pinned": pinned,
                "mode": "merged" if common is not None else "unmerged",
                "merge_policy": {"policy": self.settings.merge_policy, "applied": "per replica"},
                "resident_adapters": sorted({a for r in ok for a in r["resident_adapters"]}),
                "merge_kernel": same("merge_kernel") or "addmm",
                "fingerprint": same("fingerprint"), "pristine_fingerprint": same("pristine_fingerprint"),
                "router": self.settings.cluster_router, "routing": routing_stats(self.deployment),
                "replicas": replicas}

    # ------------------------------------------------------------------ internals
    async def _key(self, model: str) -> str:
        return (await self._resolve(model))[0]

    async def _resolve(self, model: str) -> tuple[str, str]:
        """(replica key `name@sha256`, the system_fingerprint of that version); the base is ("base", "base")."""
        if model == BASE:
            return BASE, BASE_FINGERPRINT
        name, sha, version = await asyncio.to_thread(resolve, self.store, model)  # UnknownAdapterError -> 404
        return adapter_key(name, sha), system_fingerprint(AdapterRef(name, version, sha))

    def _mux(self, key: str) -> dict[str, str]:
        return {"multiplexed_model_id": key} if self.by_adapter and key != BASE else {}

    async def _call(self, model: str, send: Callable[[Any, str], Any]) -> Any:
        for attempt in (1, 2):
            key, fingerprint = await self._resolve(model)
            handle = self.replicas.options(**self._mux(key)) if self._mux(key) else self.replicas
            _own_request_id()
            response = send(handle, key)
            try:
                result = await asyncio.wait_for(response, self.timeout)
                if hasattr(result, "system_fingerprint"):
                    result.system_fingerprint = fingerprint  # the replica knows the sha256, not the version
                return result
            except TimeoutError as exc:
                response.cancel()
                raise ReplicaTimeoutError(f"no replica answered within {self.timeout:g} s") from exc
            except _REPLICA_GONE as exc:
                if attempt == 2:
                    raise ReplicaUnavailableError(f"the replica serving this request failed: {exc}") from None
                log.warning("replica failed under a request; sending it once more: %s", exc)
            except RayTaskError as exc:
                cause = _unwrap(exc)
                if not (attempt == 1 and key != BASE and isinstance(cause, UnknownAdapterError)):
                    raise cause from None
                # the version vanished between resolve and load (overwritten or deleted): resolve again

    async def replica_ids(self) -> list[str]:
        ids = live_replica_ids(self.deployment)
        if not ids:  # this process has not routed anything yet: one call creates the router
            _own_request_id()
            try:
                await asyncio.wait_for(self.replicas.control.remote("ping"), self.timeout)
            except TimeoutError as exc:
                raise ReplicaTimeoutError(f"no replica answered within {self.timeout:g} s") from exc
            for _ in range(100):
                if ids := live_replica_ids(self.deployment):
                    break
                await asyncio.sleep(0.05)
        return ids

    async def fanout(self, op: str, arg: Any = None) -> list[tuple[str, Any]]:
        """(replica id, answer or exception) for every running replica."""
        async def one(rid: str) -> tuple[str, Any]:
            _own_request_id()
            handle = self.replicas.options(multiplexed_model_id=control_id(rid))
            try:
                return rid, await asyncio.wait_for(handle.control.remote(op, arg), CONTROL_TIMEOUT_S)
            except RayTaskError as exc:
                return rid, _unwrap(exc)
            except Exception as exc:  # noqa: BLE001 - a dead or slow replica is reported, not raised
                return rid, exc

        return list(await asyncio.gather(*(one(r) for r in await self.replica_ids())))
