"""`vlpref check` checks what `vlpref run` will need, so that nothing is paid for before a
predictable failure, and `run` refuses the same things before Prefect starts: the taxonomy (and
the --only selection), every prompt template the run uses (guard ones included), two response
samples per question, the key variables, the workspace and store folders, and the store's
LATEST version. Every problem is one `error:` line naming the file and the field; all of them
are reported together, exit code 2, and nothing is created."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from vlpref import cli, preflight
from vlpref.config import load_config
from vlpref.prompts import load_prompt
from vlpref.resources import PROMPTS_DIR, TAXONOMY_DIR

KEY_ENV = "CHECK_TEST_KEY"


def write(tmp_path: Path, **change: Any) -> Path:
    """A config that passes every check (its taxonomy and prompts beside it), with `change`."""
    (tmp_path / "taxonomy.yaml").write_text((TAXONOMY_DIR / "demo.yaml").read_text())
    data: dict[str, Any] = {
        "name": "checked",
        "taxonomy": "taxonomy.yaml",
        "workspace": "ws",
        "store": "store",
        "endpoints": {
            "sim": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key_env": KEY_ENV}
        },
        "models": [
            {"name": "a", "endpoint": "sim", "model": "m"},
            {"name": "b", "endpoint": "sim", "model": "m"},
        ],
        "generator": {"name": "gen", "endpoint": "sim", "model": "m"},
        "judges": [{"name": "judge", "endpoint": "sim", "model": "m"}],
    }
    data.update(change)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def problems(path: Path, only: list[str] | None = None) -> list[str]:
    warnings: list[str] = []
    found = preflight.find_problems(
        load_config(path), network=False, local=True, only=only, warn=warnings.append
    )
    return found + [f"warning: {w}" for w in warnings]


@pytest.fixture(autouse=True)
def key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "set")


def copy_prompts(tmp_path: Path) -> Path:
    folder = tmp_path / "prompts"
    shutil.copytree(PROMPTS_DIR, folder)
    return folder


# -- each check --------------------------------------------------------------------------------


def test_a_complete_config_has_no_problem(tmp_path: Path) -> None:
    assert problems(write(tmp_path)) == []
    assert not (tmp_path / "ws").exists() and not (tmp_path / "store").exists()


def test_the_taxonomy_must_load(tmp_path: Path) -> None:
    path = write(tmp_path)
    (tmp_path / "taxonomy.yaml").unlink()
    (problem,) = problems(path)
    assert problem.startswith(f"taxonomy: {tmp_path / 'taxonomy.yaml'}: cannot read taxonomy file")
    (tmp_path / "taxonomy.yaml").write_text("name: t\ndomains: [oops\n")
    (problem,) = problems(path)
    assert problem.startswith(f"taxonomy: {tmp_path / 'taxonomy.yaml'}: line 3: invalid YAML")


def test_the_only_selection_must_match(tmp_path: Path) -> None:
    (problem,) = problems(write(tmp_path, only=["Malicious Usage"]))
    assert problem.startswith("only: ") and "Malicious Usage" in problem
    (problem,) = problems(write(tmp_path), only=["Nope"])
    assert problem.startswith("--only: ") and "Nope" in problem
    assert problems(write(tmp_path), only=["Malicious Use"]) == []


def test_every_template_must_read_and_have_the_stage_s_placeholders(tmp_path: Path) -> None:
    folder = copy_prompts(tmp_path)
    path = write(tmp_path, prompts_dir="prompts")
    assert problems(path) == []
    (folder / "caption.txt").unlink()
    (folder / "response.txt").write_text("Answer: $questoin\n")
    (folder / "judge_safety.txt").write_text("a lone $ sign\n")
    found = problems(path)
    assert found == [
        f"prompts_dir: {folder / 'caption.txt'}: cannot read prompt template: "
        "No such file or directory",
        f"prompts_dir: {folder / 'response.txt'}: the template's placeholders do not match what "
        "the stage fills in (missing $question; unknown $questoin; expected question)",
        f"prompts_dir: {folder / 'judge_safety.txt'}: invalid template: Invalid placeholder in "
        "string: line 1, col 8",
    ]


def test_a_guard_judge_s_template_is_checked_too(tmp_path: Path) -> None:
    folder = copy_prompts(tmp_path)
    (folder / "guard_shieldgemma.txt").unlink()
    judges = [{"name": "guard", "endpoint": "sim", "model": "m", "protocol": "shieldgemma"}]
    (problem,) = problems(write(tmp_path, prompts_dir="prompts", judges=judges))
    assert problem.startswith(f"prompts_dir: {folder / 'guard_shieldgemma.txt'}: cannot read")
    # The md-judge template may ask for the policy too; nothing else.
    (folder / "guard_md_judge.txt").write_text("$policy $question $response $verdict\n")
    judges = [{"name": "guard", "endpoint": "sim", "model": "m", "protocol": "md-judge"}]
    (problem,) = problems(write(tmp_path, prompts_dir="prompts", judges=judges))
    assert "guard_md_judge.txt" in problem and "unknown $verdict" in problem


def test_the_template_table_matches_the_shipped_templates() -> None:
    for name in preflight.TEMPLATE_FIELDS:
        assert load_prompt(name).fields == preflight.TEMPLATE_FIELDS[name], name
    for name in ("guard_shieldgemma", "guard_md_judge"):
        fields = load_prompt(name).fields
        assert preflight.GUARD_FIELDS <= fields <= preflight.GUARD_FIELDS | {"policy"}


def test_a_config_that_cannot_make_a_pair_is_refused(tmp_path: Path) -> None:
    one = [{"name": "a", "endpoint": "sim", "model": "m"}]
    (problem,) = problems(write(tmp_path, models=one))
    assert problem.startswith("models: each question gets 1 response sample")
    assert "a preference pair needs two" in problem
    two = [{"name": "a", "endpoint": "sim", "model": "m", "sampling": {"n": 2}}]
    assert problems(write(tmp_path, models=two)) == []


def test_the_key_variable_must_be_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "")
    assert problems(write(tmp_path)) == [
        f"endpoints.sim.api_key_env: the environment variable {KEY_ENV} is not set (or empty)"
    ]


def test_the_workspace_and_store_must_be_folders_that_can_be_written(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    found = problems(write(tmp_path, workspace="a-file", store="a-file/store"))
    assert found == [
        f"workspace: {tmp_path / 'a-file'} is not a folder",
        f"store: {tmp_path / 'a-file' / 'store'} cannot be created: {tmp_path / 'a-file'} is "
        "not a folder",
    ]


def test_a_store_on_another_filesystem_is_left_unchecked(tmp_path: Path) -> None:
    found = problems(write(tmp_path, store="memory://nowhere/store"))
    assert found == [
        "warning: store: memory://nowhere/store is not a local path; not checked before the run"
    ]


def publish(store_path: Path, count: int = 1) -> list[Any]:
    from tests.tasks.test_publish import make_tables
    from vlpref.config import PublishStage
    from vlpref.publish import branch_parts, dataset_card
    from vlpref.store import Store

    store = Store(str(store_path))
    parts = branch_parts("b1", make_tables(), PublishStage())
    return [store.publish(parts, {"name": "x"}, dataset_card) for _ in range(count)]


@pytest.mark.parametrize("damage", ["marker", "manifest", "part", "latest"])
def test_latest_must_name_a_complete_version(tmp_path: Path, damage: str) -> None:
    path = write(tmp_path)
    (info,) = publish(tmp_path / "store")
    assert problems(path) == []
    version = Path(info.location)
    if damage == "marker":
        (version / "_COMPLETE").write_text("\x00 torn")
        expected = f"store: {version / '_COMPLETE'}: "
    elif damage == "manifest":
        (version / "manifest.json").unlink()
        expected = f"store: {version / 'manifest.json'}: "
    elif damage == "part":
        part = next(version.glob("data/*/*.parquet"))
        part.unlink()
        expected = f"store: {part}: missing"
    else:
        (tmp_path / "store" / "LATEST").write_text("20990101T000000.000000Z-00000000\n")
        expected = f"store: {tmp_path / 'store' / 'LATEST'}: names '20990101T000000.000000Z-"
    (problem,) = problems(path)
    assert problem.startswith(expected), problem


# -- through the command line ------------------------------------------------------------------


def broken(tmp_path: Path) -> Path:
    """Four problems at once: no taxonomy, one sample per question, a workspace under a file,
    a key variable that is not set."""
    (tmp_path / "a-file").write_text("x")
    path = write(
        tmp_path,
        models=[{"name": "a", "endpoint": "sim", "model": "m"}],
        workspace="a-file/ws",
    )
    (tmp_path / "taxonomy.yaml").unlink()
    return path


EXPECTED = (
    ": taxonomy: ",
    ": models: each question gets 1 response sample",
    ": workspace: ",
    f": endpoints.sim.api_key_env: the environment variable {KEY_ENV} is not set",
)


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_check_reports_every_problem_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = broken(tmp_path)
    monkeypatch.delenv(KEY_ENV)
    monkeypatch.setattr(sys, "argv", ["vlpref", "check", str(path)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    lines = error_lines(capsys.readouterr().err)
    assert exit_.value.code == 2
    assert len(lines) == len(EXPECTED)
    for line, expected in zip(lines, EXPECTED, strict=True):
        assert line.startswith(f"error: {path}{expected}"), line
    assert not (tmp_path / "ws").exists() and not (tmp_path / "store").exists()


def test_check_names_the_branches_it_would_build(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path)
    monkeypatch.setattr(sys, "argv", ["vlpref", "check", str(path), "--only", "Malicious Use"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code in (0, None), err
    assert "2 response model(s) (2 samples per question)" in err and "2 branch(es)" in err


def test_run_refuses_the_same_before_prefect_starts(tmp_path: Path) -> None:
    """A real `vlpref run`, even with --no-preflight (which skips only the network checks)."""
    path = broken(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in (KEY_ENV, "PREFECT_API_URL")}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "vlpref.cli", "run", str(path), "--no-preflight"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == len(EXPECTED), proc.stderr[-3000:]
    for line, expected in zip(lines, EXPECTED, strict=True):
        assert line.startswith(f"error: {path}{expected}"), line
    assert "prefect" not in proc.stderr.lower()  # no temporary server was started
    assert time.perf_counter() - started < 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "run.yaml"]


def test_a_judge_asking_rules_needs_them_on_every_selected_branch(tmp_path: Path) -> None:
    """Found before a request: `rules` on a judge and branches whose taxonomy node has none; the
    rule template must read and have $question, $response and $rule."""
    judges = [{"name": "judge", "endpoint": "sim", "model": "m", "rules": "max"}]
    path = write(tmp_path, judges=judges)
    assert problems(path) == []  # the demo taxonomy has rules on every leaf
    tree = yaml.safe_load((tmp_path / "taxonomy.yaml").read_text())
    for domain in tree["domains"]:
        domain.pop("rules", None)
        for category in domain["categories"]:
            category.pop("rules", None)
            for leaf in category["subcategories"]:
                if leaf["name"] != "bully":
                    leaf.pop("rules", None)
    (tmp_path / "taxonomy.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    (problem,) = problems(path)
    assert problem.startswith("judges: judge ask(s) rules, but 3 branch(es) have none: ")
    assert "'Malicious Use/Security threats/cyber'" in problem and "rules: off" in problem
    assert problems(path, only=["Representation & ToxicityHarms/Toxic"]) == []

    folder = copy_prompts(tmp_path)
    (folder / "judge_rule.txt").write_text("TASK: rule\n<response>$response</response>\n")
    (problem,) = problems(
        write(tmp_path, judges=judges, prompts_dir="prompts"),
        only=["Representation & ToxicityHarms/Toxic"],
    )
    assert problem == (
        f"prompts_dir: {folder / 'judge_rule.txt'}: the template's placeholders do not match "
        "what the stage fills in (missing $question, $rule; expected question, response, rule)"
    )


def test_check_takes_a_config_uri(tmp_path: Path) -> None:
    """A config on shared storage is named by a URI; the command line keeps it whole (a Path
    would collapse `scheme://` to `scheme:/`)."""
    path = write(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "vlpref.cli", "check", path.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, KEY_ENV: "set"},
    )
    assert proc.returncode == 0, proc.stderr
    assert f"ok {path.resolve().as_uri()}: 2 response model(s)" in proc.stderr + proc.stdout
