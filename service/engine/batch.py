"""Running one gathered group of text requests (embed, classify): admission checks, the forward, and
per-request results. Generation runs in service/engine/decoding.py (rows join a running decode).

Called by the Scheduler's loop thread, under the WeightOwner's lock, once the group's adapters are resident and
the merge policy has run. Every request gets exactly one outcome (a result or an error), and a request
that cannot run, or whose output is unusable, fails alone rather than taking its batch-mates with it.
"""

from __future__ import annotations

import logging
import math

from adapters import LoraModel
from service.base_model import LoadedBase
from service.engine.errors import NonFiniteOutputError, request_error
from service.engine.requests import ClassifyResult, EmbedResult, WorkItem
from service.engine.runner import check_classify, classify_rows, embed_rows

__all__ = ["admissible", "run_batch"]

log = logging.getLogger(__name__)


def admissible(lm: LoraModel, base: LoadedBase, items: list[WorkItem]) -> list[WorkItem]:
    """Per-request checks that depend on the model (context length, classifier head): a request that
    fails them fails alone, before it can take its batch down with it. Abandoned requests are dropped."""
    admitted = []
    for item in items:
        if item.abandoned:
            continue
        try:
            if item.kind == "classify":
                check_classify(lm, base, item.key, item.adapter)
        except Exception as exc:  # noqa: BLE001 - handed back to the awaiting handler
            item.fail(exc)
            continue
        admitted.append(item)
    return admitted


def run_batch(lm: LoraModel, base: LoadedBase, items: list[WorkItem]) -> None:
    """One forward for the whole group. An unexpected failure reruns its requests one by one, so only the
    request that causes it gets the error: a 500 unless the error is the request's own (request_error)."""
    try:
        _run_texts(lm, base, items)
    except Exception as exc:  # noqa: BLE001 - handed back to the awaiting handlers
        if len(items) == 1:
            items[0].fail(request_error(exc))
            return
        # Seen, not hidden: a batch whose requests all succeed alone is a fault that costs one forward each.
        log.warning("a batch of %d requests failed; running them one by one", len(items), exc_info=exc)
        for item in items:
            try:
                _run_texts(lm, base, [item])
            except Exception as own:  # noqa: BLE001
                item.fail(request_error(own))


def _run_texts(lm: LoraModel, base: LoadedBase, items: list[WorkItem]) -> None:
    ids, names, spans = [], [], []
    for item in items:
        spans.append((len(ids), len(ids) + len(item.encoded)))
        ids += item.encoded  # tokenized by the handler's worker thread
        names += [item.key] * len(item.encoded)  # routed by content: exactly the version it resolved
    fn = embed_rows if items[0].kind == "embed" else classify_rows
    rows, tokens = fn(lm, base, ids, names)  # one forward, row i through adapter names[i]
    for item, (a, b) in zip(items, spans, strict=True):
        n = sum(tokens[a:b])
        values = rows[a:b] if item.kind == "embed" else [[s["score"] for s in r] for r in rows[a:b]]
        # A sum is NaN or infinite if any term is (these are bounded: unit vectors, probabilities), and it is
        # one C loop per row rather than a Python one per value. JSON would carry nulls for them.
        if not all(math.isfinite(sum(row)) for row in values):
            item.fail(NonFiniteOutputError(item.adapter))
            continue
        item.resolve(EmbedResult(rows[a:b], n) if item.kind == "embed" else ClassifyResult(rows[a:b], n))
