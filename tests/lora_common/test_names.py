"""lora_common/names.py: the one adapter name rule, as the service and lora-train both state it."""

from __future__ import annotations

import pytest

from lora_common.names import NAME_PATTERN, RESERVED_NAMES, name_problem


@pytest.mark.parametrize("name", ["a", "support-bot", "v1.2_final", "A" * 128, "0day"])
def test_valid_names(name):
    assert name_problem(name) is None


@pytest.mark.parametrize("name", ["", "a/b", "-lead", ".hidden", "a" * 129, "sp ace", "é", None, 3])
def test_names_outside_the_pattern(name):
    assert name_problem(name) == f"adapter names must match {NAME_PATTERN}"


def test_base_is_reserved():
    assert RESERVED_NAMES == {"base"} and name_problem("base") == "it is reserved for the bare base model"
    assert name_problem("Base") is None  # only the exact name
