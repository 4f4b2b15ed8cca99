"""CLUE-style refinement, measured with the judge evaluation on a labelled set whose truth is
known (`vlpref.sim.labelled`): a sim judge with a strong prior bias loses F1; the content-free
debiasing and the reasoning cascade win it back, at a counted price; on an unbiased judge they
cost nothing in F1. Objectified rules (the labelled categories' taxonomy with rules) are
measured the same way: alone they do not remove a judge's bias (noisy-or compounds it), with
debiasing they recover it, and every rule costs one call per item. Real HTTP to the simulated
server on loopback."""

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
        "sim-image": {"persona": "judge", "image_dependence": 0.7},
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
    (path.parent / "taxonomy.yaml").write_text(sim_labelled.taxonomy_yaml())
    return path


def config(sim: SimServer, tmp: Path, model: str, taxonomy: str, **judge: Any) -> RunConfig:
    data = sim_run_config(
        sim.base_url,
        name="eval",
        taxonomy=taxonomy,
        workspace=str(tmp / "ws"),
        store=str(tmp / "store"),
        models=["refuser"],
        judges=[{"name": "j", "endpoint": "sim", "model": model, "sampling": SAMPLING, **judge}],
    )
    return parse_config(data)


def f1_and_calls(report: dict[str, Any]) -> tuple[float, int]:
    overall = report["results"]["j"]["overall"]
    return float(overall["f1"]), int(report["cost"]["judge_calls"])


def evaluated(sim: SimServer, tmp: Path, path: Path, model: str, **judge: Any) -> dict[str, Any]:
    service = ModelService()
    taxonomy = str(path.parent / "taxonomy.yaml")
    try:
        return evaluate(
            config(sim, tmp, model, taxonomy, **judge),
            load_labelled(path, "safety"),
            service=service,
        )
    finally:
        service.close()


def run(sim: SimServer, tmp: Path, path: Path, model: str, **judge: Any) -> tuple[float, int]:
    return f1_and_calls(evaluated(sim, tmp, path, model, **judge))


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


def test_debiasing_removes_the_pull_of_the_image_and_the_cascade_keeps_it_out(
    sim: SimServer, labelled_file: Path, tmp_path: Path
) -> None:
    """A judge that reads the image more than the response (image_dependence 0.7): the prior is
    asked with the same image, so it carries the image's pull and dividing it out leaves the
    response's own evidence; the reasoning calls are debiased by their own content-free prior,
    so the cascade does not put the pull back. Measured: raw 0.647, debias 1.000, both 1.000
    (without the reasoning prior the cascade fell back to 0.647)."""
    raw_f1, _ = run(sim, tmp_path / "raw", labelled_file, "sim-image")
    debias_f1, _ = run(sim, tmp_path / "d", labelled_file, "sim-image", debias="content_free")
    both = evaluated(sim, tmp_path / "both", labelled_file, "sim-image", **REFINE)
    both_f1, both_calls = f1_and_calls(both)
    assert debias_f1 >= raw_f1 + 0.10 and both_f1 >= raw_f1 + 0.10, (raw_f1, debias_f1, both_f1)
    cost = both["cost"]
    # One prior per item, one reasoning call per cascaded item and one reasoning prior for it.
    items = 100
    assert cost["prior_calls"] == items + cost["cascaded"] > items
    assert both_calls == items + cost["prior_calls"] + cost["cascaded"]


RULES_PER_ITEM = 3  # the labelled taxonomy: one rule for all, two per category


def test_rules_alone_keep_a_judge_s_bias_and_debiased_rules_recover_it(
    sim: SimServer, labelled_file: Path, tmp_path: Path
) -> None:
    raw_f1, raw_calls = run(sim, tmp_path / "raw", labelled_file, "sim-biased")
    max_f1, max_calls = run(sim, tmp_path / "max", labelled_file, "sim-biased", rules="max")
    noisy_f1, _ = run(sim, tmp_path / "noisy", labelled_file, "sim-biased", rules="noisy_or")
    report = evaluated(
        sim, tmp_path / "fixed", labelled_file, "sim-biased", rules="max", debias="content_free"
    )
    fixed_f1, fixed_calls = f1_and_calls(report)
    # Measured on this set: raw 0.833, max 0.833, noisy-or 0.667, max + debias 1.000.
    assert max_f1 == pytest.approx(raw_f1)  # the bias hits every rule call alike
    assert noisy_f1 <= raw_f1 - 0.10  # ... and noisy-or compounds it over the rules
    assert fixed_f1 >= raw_f1 + 0.10
    items = raw_calls
    assert max_calls == items * (1 + RULES_PER_ITEM)  # the holistic call, then one per rule
    cost = report["cost"]
    assert cost["rule_calls"] == cost["prior_calls"] == items * RULES_PER_ITEM
    assert fixed_calls == items * (1 + 2 * RULES_PER_ITEM)
    assert report["rules"] == {
        "items_with_rules": items,
        "distinct_rules": 1 + 2 * len(sim_labelled.RULES),
        "combine": {"j": "max"},
    }
    # Journaled: the same evaluation again sends nothing.
    again = evaluated(
        sim, tmp_path / "fixed", labelled_file, "sim-biased", rules="max", debias="content_free"
    )
    assert again["cost"]["requests_sent"] == 0
    assert f1_and_calls(again) == (fixed_f1, fixed_calls)


def test_rules_cost_an_unbiased_judge_no_f1(
    sim: SimServer, labelled_file: Path, tmp_path: Path
) -> None:
    raw_f1, _ = run(sim, tmp_path / "raw", labelled_file, "sim-fair")
    for how in ("max", "noisy_or"):
        f1, _ = run(sim, tmp_path / how, labelled_file, "sim-fair", rules=how)
        assert f1 >= raw_f1 - 0.01, (how, raw_f1, f1)
