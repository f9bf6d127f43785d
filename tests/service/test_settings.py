"""service/settings.py: one Settings from flags, LORA_* variables and defaults; unsafe values refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings

KEY_A, KEY_B = "a" * 20, "b" * 20


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch):
    import os

    for name in list(os.environ):
        if name.startswith("LORA_"):
            monkeypatch.delenv(name)


def test_defaults():
    s = Settings()
    assert s.base_model is None and s.store is None and s.device == "auto" and s.dtype == "float32"  # store: per base
    assert (s.host, s.port, s.workers) == ("127.0.0.1", 8000, 1)
    assert s.max_rank == 64 and s.max_upload_bytes == 64 * 2**20 and s.host_cache_bytes == 512 * 2**20
    assert (s.max_batch_size, s.max_wait_ms, s.merge_policy) == (32, 5.0, "auto")
    assert s.admin_keys == [] and s.inference_keys == [] and not s.auth_enabled


def test_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("LORA_STORE", str(tmp_path))
    monkeypatch.setenv("LORA_ADMIN_KEYS", f"{KEY_A}, {KEY_B}")
    monkeypatch.setenv("LORA_MAX_UPLOAD_BYTES", "2MiB")
    monkeypatch.setenv("LORA_MERGE_POLICY", "NEVER")
    monkeypatch.setenv("LORA_BASE_MODEL", str(tmp_path))
    s = Settings()
    assert s.store == tmp_path and s.admin_keys == [KEY_A, KEY_B] and s.max_upload_bytes == 2 * 2**20
    assert s.merge_policy == "never" and s.base_model == str(tmp_path) and s.auth_enabled


def test_flags_beat_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LORA_PORT", "9000")
    monkeypatch.setenv("LORA_MAX_RANK", "8")
    s = Settings(_cli_parse_args=["--port", "9100", "--inference-keys", f"{KEY_A},{KEY_B}", "--dtype", "bfloat16"])
    assert s.port == 9100 and s.max_rank == 8 and s.inference_keys == [KEY_A, KEY_B] and s.dtype == "bfloat16"


def test_help_documents_every_setting(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as info:
        Settings(_cli_parse_args=["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for name, field in Settings.model_fields.items():
        assert f"--{name.replace('_', '-')}" in text and f"LORA_{name.upper()}" in text
        assert field.description, name


@pytest.mark.parametrize("overrides,message", [
    ({"workers": 2}, "--workers .* must be 1"),
    ({"admin_keys": ["short"]}, "at least 16"),
    ({"admin_keys": ["has a space in the key"]}, "printable ASCII"),
    ({"admin_keys": [KEY_A], "inference_keys": [KEY_A]}, "both"),
    ({"device": "tpu"}, "device must be"),
    ({"base_model": "/definitely/not/here"}, "not a directory"),
    ({"port": 0}, "greater than or equal to 1"),
    ({"max_rank": 0}, "greater than or equal to 1"),
    ({"max_upload_bytes": "10"}, "greater than or equal to 1024"),
    ({"dtype": "int8"}, "float32"),
    ({"merge_policy": "sometimes"}, "auto"),
    ({"stor": "typo"}, "Extra inputs"),
])
def test_unsafe_or_invalid_settings_are_refused(overrides: dict, message: str):
    with pytest.raises(ValidationError, match=message):
        Settings(**overrides)


def test_store_must_not_be_a_file(tmp_path: Path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValidationError, match="not a directory"):
        Settings(store=tmp_path / "f")


def test_keys_are_not_in_the_repr():
    s = Settings(admin_keys=[KEY_A], inference_keys=[KEY_B])
    assert KEY_A not in repr(s) and KEY_B not in repr(s)
    assert s.public_dict()["admin_keys"] == 1 and KEY_A not in str(s.public_dict())


def test_empty_store_variable_means_the_default_not_the_current_directory(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LORA_STORE", "")
    assert Settings().store is None  # the default: ./store/<model>-<identity>, chosen once the base is loaded


def test_keys_as_a_json_list(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LORA_ADMIN_KEYS", f'["{KEY_A}", "{KEY_B}"]')
    assert Settings().admin_keys == [KEY_A, KEY_B]
    monkeypatch.setenv("LORA_ADMIN_KEYS", f'["{KEY_A}", 5]')
    with pytest.raises(ValidationError, match="list of strings"):
        Settings()
