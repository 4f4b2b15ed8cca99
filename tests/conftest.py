"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from vlpref.sim.testing import SimServer, SimServerFactory


@pytest.fixture
def sim_server() -> Iterator[SimServerFactory]:
    """Factory: `sim_server(config_dict)` starts a simulated server; all stop at teardown."""
    started: list[SimServer] = []

    def start(config: Mapping[str, Any]) -> SimServer:
        server = SimServer(config).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
