"""prefect.yaml's build step (vlpref/deploy_steps.py) on its own, in a git repository of the
test's making: which config locations it accepts, and which code it records for the workers.
The step inside a real `prefect deploy` is tests/flows/test_deploy.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.test_config import GOOD
from vlpref.deploy_steps import DeployCheckError, check_config, code_to_run
from vlpref.resources import TAXONOMY_DIR


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A checkout with one commit holding runs/nightly.yaml, as the current folder."""
    root = tmp_path / "checkout"
    (root / "runs").mkdir(parents=True)
    (root / "runs" / "nightly.yaml").write_text(GOOD)
    (root / "runs" / "taxonomy.yaml").write_text((TAXONOMY_DIR / "demo.yaml").read_text())
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "config")
    monkeypatch.chdir(root)
    for name in ("VLPREF_GIT_REPOSITORY", "VLPREF_GIT_REF"):
        monkeypatch.delenv(name, raising=False)
    return root


@pytest.mark.parametrize("value", ["", "   "])
def test_no_config_fails_with_what_to_set(repo: Path, value: str) -> None:
    with pytest.raises(DeployCheckError, match=r"^VLPREF_CONFIG is not set: set it to"):
        check_config(value)


def test_a_committed_relative_config_is_deployed_as_written(repo: Path) -> None:
    assert check_config("runs/nightly.yaml") == "runs/nightly.yaml"


def test_an_uncommitted_relative_config_is_refused(repo: Path) -> None:
    (repo / "runs" / "local.yaml").write_text(GOOD)
    with pytest.raises(DeployCheckError, match=r"runs/local\.yaml is not committed"):
        check_config("runs/local.yaml")


def test_a_config_that_does_not_load_is_refused_with_its_error(repo: Path) -> None:
    (repo / "runs" / "nightly.yaml").write_text(GOOD + "unknown_field: 1\n")
    with pytest.raises(DeployCheckError, match=r"unknown_field: .*unknown field"):
        check_config("runs/nightly.yaml")


def test_without_a_remote_workers_clone_this_checkout_at_head(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = code_to_run()
    assert code == {"repository": str(repo.resolve()), "commit": git(repo, "rev-parse", "HEAD")}
    assert "no git remote" in capsys.readouterr().err


def test_a_ref_is_pinned_to_its_commit_and_a_remote_is_preferred(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    git(repo, "tag", "v1")
    git(repo, "remote", "add", "origin", "https://git.example/team/vlpref.git")
    monkeypatch.setenv("VLPREF_GIT_REF", "v1")
    code = code_to_run()
    assert code == {
        "repository": "https://git.example/team/vlpref.git",
        "commit": git(repo, "rev-parse", "HEAD"),
    }
    monkeypatch.setenv("VLPREF_GIT_REF", "no-such-ref")
    with pytest.raises(DeployCheckError, match="VLPREF_GIT_REF=no-such-ref names no commit"):
        code_to_run()


def test_outside_a_checkout_deploy_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    with pytest.raises(DeployCheckError, match="runs in a git checkout"):
        code_to_run()
