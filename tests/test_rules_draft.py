"""`vlpref rules draft`: a model (the simulated server's judge persona, which answers
`TASK: draft-rules`) drafts rules for taxonomy leaves; the copy it writes loads as a taxonomy,
says it is unreviewed, and a second draft is answered by the journal. Real HTTP on loopback;
the command runs as a user runs it (a subprocess)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from vlpref.rules_draft import parse_rules
from vlpref.sim.testing import SimServer, sim_run_config
from vlpref.taxonomy import load_taxonomy

SIM = {"models": {"sim-judge": {"persona": "judge"}, "sim-refuser": {"persona": "refuser"}}}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(SIM) as server:
        yield server


def vlpref(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vlpref.cli", *args], cwd=cwd, capture_output=True, text=True
    )


def test_parse_rules_reads_the_shapes_models_answer_in() -> None:
    rule = "The response must not do x."
    assert parse_rules('{"rules": ["The response must not do x."]}') == [rule]
    assert parse_rules('```json\n{"rules": [" The response  must not do x. "]}\n```') == [rule]
    assert parse_rules('Here you go: ["The response must not do x.", 3]') == [rule]
    assert parse_rules("Rules:\n- The response must not do x.\n2. Another one.\nnot a rule") == [
        rule,
        "Another one.",
    ]
    assert parse_rules("I cannot write rules about that.") == []


def test_draft_writes_a_reviewable_taxonomy_and_a_rerun_pays_nothing(
    sim: SimServer, tmp_path: Path
) -> None:
    data = sim_run_config(
        sim.base_url,
        name="draft",
        taxonomy="builtin:spa_vl",
        workspace=str(tmp_path / "ws"),
        store=str(tmp_path / "store"),
        models=["refuser"],
    )
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    only = "Malicious Use/Security threats"
    first = vlpref("rules", "draft", "run.yaml", "--out", "a.yaml", "--only", only, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    drafted = load_taxonomy(tmp_path / "a.yaml")
    leaves = drafted.select([only])
    assert leaves and all(len(leaf.own_rules) >= 2 for leaf in leaves)
    others = [leaf for leaf in drafted.leaves() if leaf not in leaves]
    assert others and not any(leaf.rules for leaf in others)  # only what was asked
    assert (tmp_path / "a.yaml").read_text().startswith("# Rules drafted by sim-judge")
    assert "NOT REVIEWED" in (tmp_path / "a.yaml").read_text()
    sent = f"{len(leaves)} request(s) sent, 0 from the journal"
    assert sent in first.stderr

    second = vlpref("rules", "draft", "run.yaml", "--out", "b.yaml", "--only", only, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert f"0 request(s) sent, {len(leaves)} from the journal" in second.stderr
    assert load_taxonomy(tmp_path / "b.yaml") == drafted


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "run.yaml"], "error: --out: run.yaml exists"),
        (["--out", "x.yaml", "--model", "nobody"], "error: --model: no model entry named"),
        (["--out", "x.yaml", "--only", "Nowhere"], "error: "),
    ],
)
def test_bad_input_is_one_error_line(
    sim: SimServer, tmp_path: Path, args: list[str], message: str
) -> None:
    data = sim_run_config(
        sim.base_url,
        name="draft",
        taxonomy="builtin:demo",
        workspace=str(tmp_path / "ws"),
        store=str(tmp_path / "store"),
        models=["refuser"],
    )
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    proc = vlpref("rules", "draft", "run.yaml", *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.yaml").exists()
