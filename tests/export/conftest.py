"""One real version for the export tests: the end-to-end test's config (tests/flows/test_build)
built once through a Prefect flow run (the session's server) against the simulated server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# `datasets` reads these when imported: set them first, so nothing here can reach the hub.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flows.build import build_dataset
from tests.flows.test_build import SECRET, SIM, write_config
from vlpref.sim.testing import SimServer
from vlpref.store import Store, Version

# max-margin (not spa-vl, which only keeps pairs whose two orders agree) with contradicted pairs
# kept, and a judge with a strong position bias: some pairs are inconsistent.
PAIRS = {"policy": "max-margin", "drop_contradicted": False, "min_margin": 0.0}
BIASED = {
    **SIM,
    "models": {**SIM["models"], "sim-judge": {"persona": "judge", "position_bias": 0.6}},
}


@pytest.fixture(scope="session")
def version(tmp_path_factory: pytest.TempPathFactory, prefect_server: str) -> Iterator[Version]:
    """A complete version: 4 branches, 3 images each, 3 splits, 5 response models, pairs that
    are not all consistent (the consistency filter has something to drop)."""
    tmp = tmp_path_factory.mktemp("export-version")
    os.environ["VLPREF_E2E_KEY"] = SECRET
    try:
        with SimServer(BIASED) as sim:
            version_id = build_dataset(str(write_config(tmp, sim.base_url, pairs=PAIRS)))
    finally:
        del os.environ["VLPREF_E2E_KEY"]
    yield Store(str(tmp / "store")).open(version_id)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "export"
