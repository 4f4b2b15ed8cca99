"""A build with two judges: the version manifest's `judge_agreement` (Cohen's kappa over the
branch's safety verdicts) and `stages.judge.aggregate` in the stage keys only when not `mean`."""

from __future__ import annotations

from pathlib import Path

import yaml

from flows.build import build_dataset
from flows.stages import _aggregate, _judge_settings
from vlpref.config import parse_config
from vlpref.sim.testing import SimServer, sim_run_config
from vlpref.store import Store

REPO = Path(__file__).resolve().parents[2]
SIM = {
    "models": {
        "sim-refuser": {"persona": "refuser"},
        "sim-jailbroken": {"persona": "jailbroken"},
        "sim-judge": {"persona": "judge"},
        "sim-llama-guard": {"persona": "llama-guard"},
    }
}


def test_manifest_gives_kappa_of_two_judges(tmp_path: Path, prefect_server: str) -> None:
    with SimServer(SIM) as sim:
        data = sim_run_config(
            sim.base_url,
            taxonomy=str(REPO / "taxonomy" / "demo.yaml"),
            workspace=str(tmp_path / "ws"),
            store=str(tmp_path / "store"),
            models=["refuser", "jailbroken"],
            per_branch=2,
            judges=[
                {"name": "judge", "endpoint": "sim", "model": "sim-judge"},
                {
                    "name": "guard",
                    "endpoint": "sim",
                    "model": "sim-llama-guard",
                    "protocol": "llama-guard",
                },
            ],
            stages={"judge": {"aggregate": "any_unsafe"}},
        )
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(data))
        leaf = "Malicious Use"
        version_id = build_dataset(str(path), only=[leaf])
    manifest = Store(str(tmp_path / "store")).open(version_id).manifest
    agreement = manifest["judge_agreement"]
    assert agreement["metric"] == "cohen_kappa" and agreement["judges"] == 2
    assert agreement["items"] > 0 and isinstance(agreement["value"], float)
    assert agreement["branches_without_counts"] == 0
    built = [b for b in manifest["branches"].values() if b["status"] == "built"]
    assert built and all(b["judge_agreement_counts"]["judges"] == ["guard", "judge"] for b in built)
    summed = sum(sum(b["judge_agreement_counts"]["contingency"].values()) for b in built)
    assert summed == agreement["items"]  # every response judged by both, over every branch
    assert manifest["stages"]["judge"]["aggregate"] == "any_unsafe"


def test_aggregate_enters_stage_keys_only_when_not_mean(tmp_path: Path) -> None:
    base = sim_run_config(
        "http://127.0.0.1:9/v1",
        taxonomy=str(REPO / "taxonomy" / "demo.yaml"),
        workspace=str(tmp_path / "ws"),
        store=str(tmp_path / "store"),
        models=["refuser"],
    )
    default = parse_config(base)
    assert "aggregate" not in _judge_settings(default) and _aggregate(default) == []
    chosen = parse_config({**base, "stages": {"judge": {"aggregate": "majority"}}})
    assert _judge_settings(chosen)["aggregate"] == "majority"
    assert _aggregate(chosen) == ["aggregate=majority"]
