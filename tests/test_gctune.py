"""The build's collector settings: applied inside, restored after, shared by nested builds."""

from __future__ import annotations

import gc

import pytest

from vlpref.gctune import ENV_DISABLE, THROUGHPUT_THRESHOLDS, throughput_gc


def test_thresholds_are_raised_inside_and_restored_after() -> None:
    before = gc.get_threshold()
    with throughput_gc():
        assert gc.get_threshold() == THROUGHPUT_THRESHOLDS
        assert gc.get_freeze_count() > 0  # what was alive at the start is no longer walked
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_nested_builds_restore_only_when_the_outer_one_ends() -> None:
    before = gc.get_threshold()
    with throughput_gc():
        with throughput_gc():
            pass
        assert gc.get_threshold() == THROUGHPUT_THRESHOLDS
    assert gc.get_threshold() == before


def test_restored_when_the_build_raises() -> None:
    before = gc.get_threshold()
    with pytest.raises(RuntimeError), throughput_gc():
        raise RuntimeError("branch failed")
    assert gc.get_threshold() == before


def test_the_environment_can_keep_cpythons_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_DISABLE, "1")
    before = gc.get_threshold()
    with throughput_gc():
        assert gc.get_threshold() == before
