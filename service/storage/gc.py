"""Garbage collection: an explicit, idempotent step that removes what no index row needs any more.

    1. orphans   blobs that lost their last row more than `grace_s` ago (index.orphans, then forget_orphan
                 and blobs.delete: the index re-checks, in one transaction, that no row took the digest back);
    2. temporary leftovers of interrupted blob writes older than `grace_s` (blobs.collect_temporary);
    3. leftovers blobs that no row references and no orphan note covers (a crash between the blob and the
                 row), older than `grace_s`;
    4. changes   records of the index's change log older than `grace_s`, except the newest (index.prune_changes):
                 a follower further behind than that (a name cache's listener down for longer) learns from
                 `changes_since` that it missed some and starts over.

It never runs on open: opening a store deletes nothing. The grace period is what makes it safe while
another process uploads: an upload writes its blob (fresh, so younger than the grace) before its row, and
checks after its row commits that the blob is still there, writing it again if a collection removed it.
The one interleaving left is an upload of bytes identical to a blob orphaned for longer than the grace,
whose row commits and whose check runs between this step's last look at the index and its delete of that
blob; the index row then dangles (answered 500, see MissingBlobError) until the adapter is uploaded again.
Rows whose blob is missing are logged, never deleted.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from service.storage.interfaces import AdapterIndex, BlobStore

__all__ = ["GcReport", "collect_garbage", "DEFAULT_GRACE_S"]

DEFAULT_GRACE_S = 3600.0  # far longer than any upload takes, between its blob and its row
log = logging.getLogger(__name__)


@dataclass
class GcReport:
    orphans: list[str] = field(default_factory=list)  # sha256s removed, orphaned for longer than the grace
    leftovers: list[str] = field(default_factory=list)  # sha256s removed that no row or orphan note knew
    temporary: int = 0  # interrupted writes removed
    dangling: list[str] = field(default_factory=list)  # sha256s that rows point at, missing from the blob store
    kept_young: int = 0  # unreferenced blobs left alone because they are younger than the grace
    changes_pruned: int = 0  # change-log records removed, older than the grace

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def collect_garbage(index: AdapterIndex, blobs: BlobStore, grace_s: float = DEFAULT_GRACE_S) -> GcReport:
    if grace_s < 0:
        raise ValueError(f"grace_s must be >= 0, got {grace_s}")
    report = GcReport()
    for sha in index.orphans(grace_s):
        if index.forget_orphan(sha):  # still unreferenced, and this collector (not a concurrent one) owns it
            blobs.delete(sha)
            report.orphans.append(sha)
    report.temporary = blobs.collect_temporary(grace_s)

    present = dict(blobs.list())  # listed before the index is read: a row committed meanwhile is seen below
    referenced = index.referenced()
    noted = set(index.orphans(0))  # orphaned within the grace: their turn comes in step 1 of a later run
    cutoff = time.time() - grace_s
    for sha, modified in present.items():
        if sha in referenced or sha in noted:
            continue
        if modified > cutoff:
            report.kept_young += 1  # perhaps an upload whose row is about to commit
            continue
        blobs.delete(sha)
        report.leftovers.append(sha)
    report.dangling = sorted(referenced - present.keys())
    report.changes_pruned = index.prune_changes(grace_s)

    if report.orphans or report.leftovers or report.temporary or report.changes_pruned:
        log.info("store gc: removed %d orphaned blobs, %d unreferenced leftovers, %d interrupted writes, "
                 "%d change-log records", len(report.orphans), len(report.leftovers), report.temporary,
                 report.changes_pruned)
    if report.dangling:
        log.error("store: %d blob(s) that index rows point at are missing (%s); requests for those adapters "
                  "answer 500 until they are deleted or uploaded again", len(report.dangling),
                  ", ".join(s[:12] for s in report.dangling[:10]))
    return report
