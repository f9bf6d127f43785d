"""The auto merge policy: merges a dominant adapter, leaves on mixed traffic, and does not thrash."""

from __future__ import annotations

import pytest

from service.engine.policy import MergePolicy


def test_merges_only_when_one_adapter_dominates_a_full_window():
    p = MergePolicy("auto", window=10, enter=0.9, leave=0.6, min_dwell=1)
    p.observe(["x"] * 5)
    assert p.decide(None, pinned=False) == (False, None)  # window not full yet
    p.observe(["x"] * 4 + ["y"])
    assert p.decide(None, pinned=False) == (True, "x")


def test_hysteresis_keeps_the_merge_between_the_two_thresholds():
    p = MergePolicy("auto", window=10, enter=0.9, leave=0.6, min_dwell=1)
    p.observe(["x"] * 10)
    assert p.decide(None, False) == (True, "x")
    p.observe(["x"] * 7 + ["y"] * 3)  # 70%: below enter, above leave -> stays merged
    assert p.decide("x", False) == (False, "x")
    p.observe(["x"] * 5 + ["y", "z", None, "y", "z"])  # 50% -> leaves
    assert p.decide("x", False) == (True, None)


def test_alternating_traffic_cannot_switch_every_batch():
    p = MergePolicy("auto", window=4, enter=0.75, leave=0.5, min_dwell=5)
    changes = 0
    for i in range(40):
        p.observe(["x"] * 4 if (i // 2) % 2 else ["y"] * 4)
        changed, _ = p.decide("x" if changes % 2 else None, False)
        changes += changed
    assert changes <= 40 // 5


@pytest.mark.parametrize("mode", ["never", "always"])
def test_non_auto_policies_and_pins_never_change_mode(mode):
    p = MergePolicy(mode, window=2, min_dwell=0)
    p.observe(["x"] * 4)
    assert p.decide(None, False) == (False, None)
    auto = MergePolicy("auto", window=2, min_dwell=0)
    auto.observe(["x"] * 4)
    assert auto.decide("y", pinned=True) == (False, "y")


def test_bad_policy_settings_are_refused():
    with pytest.raises(ValueError):
        MergePolicy("sometimes")
    with pytest.raises(ValueError):
        MergePolicy("auto", enter=0.5, leave=0.7)


def test_a_forgotten_adapter_no_longer_counts_and_a_refused_one_is_never_chosen():
    p = MergePolicy("auto", window=4, min_dwell=0)
    p.observe(["gone"] * 4)
    p.forget("gone")
    assert list(p.recent) == [] and p.decide(None, pinned=False) == (False, None)
    p.observe(["tied"] * 4)
    p.refuse("tied")
    assert p.decide(None, pinned=False) == (False, None)
    p.forget("tied")  # a new version under that name may merge again
    p.observe(["tied"] * 4)
    assert p.decide(None, pinned=False) == (True, "tied")
