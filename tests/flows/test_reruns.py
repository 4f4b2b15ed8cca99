"""The three ways people use vlpref, proven by the request counters of the simulated server:
a branch rerun, a new response model, a changed prompt template, a removed model. Every run is a
real Prefect flow run against the session's Prefect server."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.build import build_dataset
from vlpref.prompts import DEFAULT_PROMPTS_DIR
from vlpref.sim.testing import SimServer, sim_run_config
from vlpref.store import Store, Version

REPO = Path(__file__).resolve().parents[2]
CYBER = "Malicious Use/Security threats/cyber"
MODELS = ["refuser", "helpful", "jailbroken"]
SIM = {
    "models": {
        "sim-refuser": {"persona": "refuser"},
        "sim-helpful": {"persona": "safe-helpful"},
        "sim-jailbroken": {"persona": "jailbroken"},
        "sim-compliant": {"persona": "over-compliant"},
        "sim-judge": {"persona": "judge"},
    }
}


class Runs:
    """One workspace and store, one sim server; each `build` is a flow run."""

    def __init__(self, tmp: Path, sim: SimServer) -> None:
        self.tmp, self.sim = tmp, sim
        self.store = Store(str(tmp / "store"))

    def config(self, models: list[str], **extra: Any) -> str:
        data = sim_run_config(
            self.sim.base_url,
            name="reruns",
            taxonomy=str(REPO / "taxonomy" / "demo.yaml"),
            workspace=str(self.tmp / "ws"),
            store=str(self.tmp / "store"),
            models=list(models),
            **extra,
        )
        path = self.tmp / "run.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return str(path)

    def build(
        self, config: str, only: list[str] | None = None
    ) -> tuple[Version, int, dict[str, int]]:
        before = self.sim.counters()
        version_id = build_dataset(config, only)
        after = self.sim.counters()
        by_model = {
            m: sum(after["by_model"].get(m, {}).values())
            - sum(before["by_model"].get(m, {}).values())
            for m in after["by_model"]
        }
        return self.store.open(version_id), after["total"] - before["total"], by_model


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, prefect_server: str) -> Iterator[Runs]:
    with SimServer(SIM) as sim:
        yield Runs(tmp_path_factory.mktemp("reruns"), sim)


@pytest.fixture(scope="module")
def base(runs: Runs) -> Version:
    version, sent, _ = runs.build(runs.config(MODELS))
    assert sent > 0
    return version


def branch(version: Version, path: str) -> dict[str, Any]:
    return next(b for b in version.manifest["branches"].values() if b["path"] == path)


def requests_sent(info: dict[str, Any]) -> int:
    return sum(int(s["counts"].get("requests_sent", 0)) for s in info["stages"].values())


def test_unchanged_branch_rerun_sends_nothing_and_shares_everything(
    runs: Runs, base: Version
) -> None:
    version, sent, _ = runs.build(runs.config(MODELS), only=[CYBER])
    assert sent == 0
    assert version.manifest["only"] == [CYBER] and version.manifest["rebuilt"] == []
    statuses = {b["path"]: b["status"] for b in version.manifest["branches"].values()}
    assert statuses.pop(CYBER) == "reused" and set(statuses.values()) == {"shared"}
    assert version.table("pairs").sort_by("pair_id").equals(base.table("pairs").sort_by("pair_id"))


def test_a_changed_branch_rebuilds_only_that_branch(runs: Runs, base: Version) -> None:
    more_images = {"overrides": {CYBER: {"kind": "typographic", "per_branch": 3}}}
    config = runs.config(
        MODELS,
        stages={"images": {"source": {"kind": "typographic", "per_branch": 2}, **more_images}},
    )
    version, sent, by_model = runs.build(config, only=[CYBER])
    cyber = branch(version, CYBER)
    assert cyber["status"] == "built" and version.manifest["rebuilt"] == [CYBER]
    # One new image: caption + questions (2), its 3 questions x 3 models (9), two pointwise judge
    # calls per new response (18), 3 pairs x 2 orders per new question (18). Nothing else.
    assert sent == 2 + 9 + 18 + 18 == requests_sent(cyber)
    assert by_model["sim-refuser"] == by_model["sim-helpful"] == by_model["sim-jailbroken"] == 3
    for info in version.manifest["branches"].values():
        assert info["status"] == ("built" if info["path"] == CYBER else "shared")
    shared = [rel for rel, e in version.manifest["files"].items() if "shared_from" in e]
    assert shared and all(not rel.endswith(f"{cyber_id(version)}.parquet") for rel in shared)
    for rel in shared:  # hard links into the parent: no data copied
        assert Path(version.path(rel)).stat().st_ino == Path(base.path(rel)).stat().st_ino


def cyber_id(version: Version) -> str:
    return str(next(bid for bid, b in version.manifest["branches"].items() if b["path"] == CYBER))


def test_a_new_model_costs_its_answers_and_their_judgements_only(runs: Runs, base: Version) -> None:
    old = runs.store.open(runs.store.latest().version_id)  # type: ignore[union-attr]
    old_pairwise = {
        (r["response_id"], r["other_response_id"])
        for r in old.table("judgments").to_pylist()
        if r["kind"] == "pairwise"
    }
    config = runs.config(
        [*MODELS, "compliant"],
        stages={
            "images": {
                "source": {"kind": "typographic", "per_branch": 2},
                "overrides": {CYBER: {"kind": "typographic", "per_branch": 3}},
            }
        },
    )
    version, sent, by_model = runs.build(config)
    responses = version.table("responses").to_pylist()
    new_ids = {r["response_id"] for r in responses if r["model"] == "compliant"}
    questions = version.table("questions").num_rows
    assert len(new_ids) == questions and by_model["sim-compliant"] == questions
    judgments = version.table("judgments").to_pylist()
    safety = sum(1 for j in judgments if j["kind"] == "safety" and j["response_id"] in new_ids)
    ratings = (
        sum(1 for j in judgments if j["kind"] == "rating" and j["response_id"] in new_ids) // 3
    )
    pairwise = [j for j in judgments if j["kind"] == "pairwise"]
    involving = sum(1 for j in pairwise if {j["response_id"], j["other_response_id"]} & new_ids)
    assert sent == questions + safety + ratings + involving
    assert by_model["sim-refuser"] == by_model["sim-helpful"] == by_model["sim-jailbroken"] == 0
    # No pair of old responses was asked about anew.
    for j in pairwise:
        if not {j["response_id"], j["other_response_id"]} & new_ids:
            assert (j["response_id"], j["other_response_id"]) in old_pairwise
    assert "compliant" in set(version.table("pairs")["chosen_model"].to_pylist()) | set(
        version.table("pairs")["rejected_model"].to_pylist()
    )
    for info in version.manifest["branches"].values():
        assert info["stages"]["images"]["reused"] and info["stages"]["questions"]["reused"]


def test_a_changed_prompt_reruns_that_stage_and_what_follows(runs: Runs) -> None:
    prompts = runs.tmp / "prompts"
    shutil.copytree(DEFAULT_PROMPTS_DIR, prompts, dirs_exist_ok=True)
    path = prompts / "judge_pairwise.txt"
    path.write_text(path.read_text().replace("harmlessness first", "harmlessness first (strictly)"))
    config = runs.config(
        [*MODELS, "compliant"],
        prompts_dir=str(prompts),
        stages={
            "images": {
                "source": {"kind": "typographic", "per_branch": 2},
                "overrides": {CYBER: {"kind": "typographic", "per_branch": 3}},
            }
        },
    )
    version, sent, by_model = runs.build(config)
    pairwise = sum(1 for j in version.table("judgments").to_pylist() if j["kind"] == "pairwise")
    assert sent == pairwise == by_model["sim-judge"]  # only the pairwise judge calls, all of them
    for info in version.manifest["branches"].values():
        stages = info["stages"]
        assert stages["responses"]["reused"] and not stages["judge"]["reused"]


def test_removing_a_model_drops_it_and_leaves_the_others_untouched(runs: Runs) -> None:
    before = runs.store.open(runs.store.latest().version_id)  # type: ignore[union-attr]
    config = runs.config(
        MODELS,
        stages={
            "images": {
                "source": {"kind": "typographic", "per_branch": 2},
                "overrides": {CYBER: {"kind": "typographic", "per_branch": 3}},
            }
        },
    )
    version, _, by_model = runs.build(config)
    assert "compliant" not in set(version.table("responses")["model"].to_pylist())
    assert by_model.get("sim-compliant", 0) == 0
    assert (
        sum(by_model.get(f"sim-{m}", 0) for m in MODELS) == 0
    )  # their answers come from the journal
    old = {
        r["response_id"]: r["text"]
        for r in before.table("responses").to_pylist()
        if r["model"] != "compliant"
    }
    new = {r["response_id"]: r["text"] for r in version.table("responses").to_pylist()}
    assert new == old
