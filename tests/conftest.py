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


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real `prefect server start` (SQLite, loopback) for the whole test session; every flow
    run in the session goes to it. Cheaper than an ephemeral server per process (7-18 s each) and
    the same thing a scheduled deployment talks to."""
    from vlpref.prefect_server import PrefectServer, api_url_in_environment

    home = tmp_path_factory.mktemp("prefect-home")
    with (
        PrefectServer(home) as server,
        server.as_current(),
        api_url_in_environment(server.api_url),  # for the child processes the session starts
    ):
        yield server.api_url
