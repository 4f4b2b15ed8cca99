"""Test safety nets for the image tests: no connection leaves loopback, and what gets opened."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest


def _check_address(address: Any) -> None:
    if not isinstance(address, tuple):
        return  # a unix socket path
    host = str(address[0]).split("%", 1)[0]
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise AssertionError(f"a test tried to connect to {host!r}: tests stay on loopback")


def forbid_non_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every socket connect (asyncio's included) must go to a loopback address, or it fails."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def connect(self: socket.socket, address: Any) -> None:
        _check_address(address)
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        _check_address(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)


@contextmanager
def opened_paths(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The paths `os.open` is asked for while the block runs (resolved)."""
    seen: list[str] = []
    real_open = os.open

    def spy(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        seen.append(os.path.realpath(os.fsdecode(path)))
        return real_open(path, flags, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "open", spy)
        yield seen
