"""One Prometheus exposition for the whole cluster: the ingress's HTTP series, then every replica's engine
series (adapter loads, cache hits, merges, batches) with a `replica` label. Families are merged by name,
so each appears once with all its samples, as the text format requires."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["merge_metrics"]

_HTTP = "lora_http_"  # counted where HTTP is served: the ingress; replicas' copies are always empty


class _Families:
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


def merge_metrics(ingress: bytes, replicas: Iterable[tuple[str, bytes]]) -> bytes:
    families: dict[str, Metric] = {}
    for family in text_string_to_metric_families(ingress.decode()):
        if family.name.startswith(_HTTP):
            families[family.name] = family
    for replica, text in replicas:
        for family in text_string_to_metric_families(text.decode()):
            if family.name.startswith(_HTTP):
                continue
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                             family.unit))
            merged.samples += [s._replace(labels={**s.labels, "replica": replica}) for s in family.samples]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families.values()))
    return generate_latest(registry)
