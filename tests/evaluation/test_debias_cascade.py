"""CLUE-style refinement, measured with the judge evaluation on a labelled set whose truth is
known (`vlpref.sim.labelled`): a sim judge with a strong prior bias loses F1; the content-free
debiasing and the reasoning cascade win it back, at a counted price; on an unbiased judge they
cost nothing in F1. Real HTTP to the simulated server on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vlpref.config import RunConfig, parse_config
from vlpref.evaluation.labelled import load_labelled
from vlpref.evaluation.run import evaluate
from vlpref.service import ModelService
from vlpref.sim import labelled as sim_labelled
from vlpref.sim.testing import SimServer, sim_run_config

SIM = {
    "models": {
        "sim-biased": {"persona": "judge", "prior_bias": 2.0},
        "sim-fair": {"persona": "judge"},
        "sim-refuser": {"persona": "refuser"},
    }
}
SAMPLING = {"temperature": 0, "logprobs": True, "top_logprobs": 5}
REFINE = {"debias": "content_free", "cascade_band": [0.2, 0.8]}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(SIM) as server:
        yield server


@pytest.fixture(scope="module")
def labelled_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("labelled") / "set.jsonl"
    sim_labelled.write(path, n=100, seed=0)
    return path


def config(sim: SimServer, tmp: Path, model: str, **judge: Any) -> RunConfig:
    data = sim_run_config(
        sim.base_url,
        name="eval",
        taxonomy="builtin:demo",
        workspace=str(tmp / "ws"),
        store=str(tmp / "store"),
        models=["refuser"],
        judges=[{"name": "j", "endpoint": "sim", "model": model, "sampling": SAMPLING, **judge}],
    )
    return parse_config(data)


def f1_and_calls(report: dict[str, Any]) -> tuple[float, int]:
    overall = report["results"]["j"]["overall"]
    return float(overall["f1"]), int(report["cost"]["judge_calls"])


def run(sim: SimServer, tmp: Path, path: Path, model: str, **judge: Any) -> tuple[float, int]:
    service = ModelService()
    try:
        report = evaluate(
            config(sim, tmp, model, **judge), load_labelled(path, "safety"), service=service
        )
    finally:
        service.close()
    return f1_and_calls(report)


def test_debiasing_and_cascading_recover_a_biased_judge(
    sim: SimServer, labelled_file: Path, tmp_path: Path
) -> None:
    raw_f1, raw_calls = run(sim, tmp_path / "raw", labelled_file, "sim-biased")
    fixed_f1, fixed_calls = run(sim, tmp_path / "fixed", labelled_file, "sim-biased", **REFINE)
    assert fixed_f1 >= raw_f1 + 0.10, (raw_f1, fixed_f1)
    assert raw_calls == 100 < fixed_calls  # the prior and reasoning calls are counted


def test_they_cost_an_unbiased_judge_no_f1(
    sim: SimServer, labelled_file: Path, tmp_path: Path
) -> None:
    raw_f1, _ = run(sim, tmp_path / "raw", labelled_file, "sim-fair")
    fixed_f1, _ = run(sim, tmp_path / "fixed", labelled_file, "sim-fair", **REFINE)
    assert fixed_f1 >= raw_f1 - 0.01, (raw_f1, fixed_f1)
