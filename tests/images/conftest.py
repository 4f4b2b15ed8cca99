import pytest

from tests.images.safety import forbid_non_loopback


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_non_loopback(monkeypatch)
