"""Fixtures of the trainers tier: a real version (the export tests' fixture: a Prefect flow run
against the simulated server) and the tiny Idefics3 processor and model of the vLLM tier, built
locally with no download. TRL must import, or the tier fails: nothing here is skipped."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.conftest import prefect_server
from tests.export.conftest import out, version

__all__ = ["out", "prefect_server", "version"]


def pytest_configure(config: pytest.Config) -> None:
    try:
        import trl  # noqa: F401
    except Exception as exc:  # the tier exists to run TRL's own data path: fail, never skip
        raise pytest.UsageError(
            f"the trainers tier needs TRL importable ({type(exc).__name__}: {exc}); "
            "run it with `make test-trainers`, which builds .venv-trainers"
        ) from exc
