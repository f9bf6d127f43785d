"""EngineConfig: every field comes from Settings by name (no getattr defaults anywhere in the engine)."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

from service.engine.config import EngineConfig
from service.settings import Settings

# A value for each field, none of them the default, so a field that from_settings forgot shows.
CHANGED = dict(max_rank=8, max_batch_size=7, max_wait_ms=3.5, max_batch_tokens=999, overtake_tokens=0,
               merge_policy="always", merge_window=16, merge_min_dwell=3, merge_kernel="addmm", host_cache_bytes=12345,
               device_cache_adapters=5, device_cache_bytes=54321, device_cache_eviction="lru")


def test_from_settings_covers_every_field(bert_dir, tmp_path):
    assert set(CHANGED) == {f.name for f in dataclasses.fields(EngineConfig)}
    defaults = EngineConfig()
    assert all(getattr(defaults, k) != v for k, v in CHANGED.items())
    settings = Settings(base_model=str(bert_dir), store=tmp_path / "store", device="cpu", **CHANGED)
    assert EngineConfig.from_settings(settings) == EngineConfig(**CHANGED)


def test_the_defaults_are_the_settings_defaults(bert_dir, tmp_path):
    settings = Settings(base_model=str(bert_dir), store=tmp_path / "store", device="cpu")
    assert EngineConfig.from_settings(settings) == EngineConfig()  # one set of defaults, not two that drift


def test_the_engine_reads_no_setting_through_getattr():
    engine_dir = Path(inspect.getfile(EngineConfig)).parent
    for path in engine_dir.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"getattr\((self\.)?(settings|config)\b", text), path.name
        assert "settings." not in text.replace("service.settings", "") or path.name == "config.py", path.name
