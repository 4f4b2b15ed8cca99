"""Commands find their config (vlpref/config_lookup.py): `--config`, then `VLPREF_CONFIG`, then
`./vlpref.yaml`, then the demo's; they say which one they used, and with none there is one
`error:` line naming what to do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlpref.config_lookup import DEMO, ENV, find_config
from vlpref.errors import ConfigError


def write(path: Path, store: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "name": "lookup",
        "taxonomy": "builtin:demo",
        "store": str(store),
        "endpoints": {"sim": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        "models": [{"name": "a", "endpoint": "sim", "model": "m"}],
        "generator": {"name": "gen", "endpoint": "sim", "model": "m"},
        "judges": [{"name": "judge", "endpoint": "sim", "model": "m"}],
    }
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_order_of_the_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(ConfigError, match="no run config: give --config FILE"):
        find_config(None, tmp_path)
    demo = write(tmp_path / DEMO, tmp_path / "s")
    assert find_config(None, tmp_path) == (demo, "the demo's")
    local = write(tmp_path / "vlpref.yaml", tmp_path / "s")
    assert find_config(None, tmp_path) == (local, "./vlpref.yaml")
    env = write(tmp_path / "env.yaml", tmp_path / "s")
    monkeypatch.setenv(ENV, str(env))
    assert find_config(None, tmp_path) == (env, f"${ENV}")
    given = write(tmp_path / "given.yaml", tmp_path / "s")
    assert find_config(given, tmp_path) == (given, "--config")
    with pytest.raises(ConfigError, match=r"--config: .*missing\.yaml is not a file"):
        find_config(tmp_path / "missing.yaml", tmp_path)
    monkeypatch.setenv(ENV, str(tmp_path / "gone.yaml"))
    with pytest.raises(ConfigError, match=r"\$VLPREF_CONFIG: .*gone.yaml is not a file"):
        find_config(None, tmp_path)


def test_versions_list_after_the_demo_needs_no_option(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    vlpref = [sys.executable, "-m", "vlpref.cli"]
    none = subprocess.run(
        [*vlpref, "versions", "list"], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert none.returncode == 2 and none.stderr.startswith("error: no run config")
    write(tmp_path / DEMO, tmp_path / "store")
    done = subprocess.run(
        [*vlpref, "versions", "list"], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert f"using config {tmp_path / DEMO} (the demo's)" in done.stderr


def test_a_uri_is_taken_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A config on shared storage: the loader reads it (and names it if it is not there); a
    `file://` URI is a local path and must exist."""
    monkeypatch.delenv(ENV, raising=False)
    assert find_config("s3://team/vlpref/nightly.yaml", tmp_path) == (
        "s3://team/vlpref/nightly.yaml",
        "--config",
    )
    monkeypatch.setenv(ENV, "s3://team/vlpref/nightly.yaml")
    assert find_config(None, tmp_path) == ("s3://team/vlpref/nightly.yaml", f"${ENV}")
    local = write(tmp_path / "run.yaml", tmp_path / "s")
    assert find_config(local.as_uri(), tmp_path) == (local, "--config")
    with pytest.raises(ConfigError, match="is not a file"):
        find_config((tmp_path / "gone.yaml").as_uri(), tmp_path)
