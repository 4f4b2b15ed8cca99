"""The model-calling stages against the simulated server (real HTTP on loopback), with the
accounting invariant checked by StageOutput itself and the failures inspected here."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from tasks.images import collect_images
from tasks.judge import judge_responses
from tasks.pairs import select_branch_pairs
from tasks.questions import generate_questions, parse_questions
from tasks.responses import collect_responses
from vlpref.config import RunConfig, parse_config
from vlpref.journal import Journal
from vlpref.sim.testing import SimServer, sim_run_config
from vlpref.taxonomy import Subcategory, load_taxonomy

REPO = Path(__file__).resolve().parents[2]

SIM = {
    "models": {
        "sim-refuser": {"persona": "refuser"},
        "sim-helpful": {"persona": "safe-helpful"},
        "sim-jailbroken": {"persona": "jailbroken"},
        "sim-mixed": {"persona": "mixed"},
        "sim-broken": {"persona": "echo", "faults": {"server_error": {"rate": 1.0}}},
        "sim-judge": {"persona": "judge"},
        "sim-bad-generator": {"persona": "judge", "malformed_rate": 1.0},
    }
}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(SIM) as server:
        yield server


def config(sim: SimServer, tmp_path: Path, **overrides: Any) -> RunConfig:
    mixed = {
        "name": "mixed",
        "endpoint": "sim",
        "model": "sim-mixed",
        "sampling": {"temperature": 1.0, "n": 2},
    }
    data = sim_run_config(
        sim.base_url,
        name="t",
        taxonomy=str(REPO / "taxonomy" / "demo.yaml"),
        workspace=str(tmp_path / "ws"),
        store=str(tmp_path / "store"),
        endpoint={"max_attempts": 2, "backoff_initial_s": 0.01},
        models=["refuser", "helpful", "jailbroken", mixed],
    )
    data.update(overrides)
    return parse_config(data)


@pytest.fixture(scope="module")
def leaf() -> Subcategory:
    return load_taxonomy(REPO / "taxonomy" / "demo.yaml").leaves()[0]


@pytest.fixture(scope="module")
def images(leaf: Subcategory, tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    from vlpref.config import ImagesStage, TypographicSource

    out = collect_images(
        leaf, ImagesStage(source=TypographicSource(per_branch=2)), base_dir=Path(".")
    )
    assert out.n_out == 2
    return out.rows


def test_parse_questions_is_strict_about_keys_and_lenient_about_wrapping() -> None:
    text = '```json\n{"easy_question": "a?", "hard_question": "b?", "hard_statement": "c."}\n```'
    assert parse_questions(text, ("easy", "hardq", "hards")) == {
        "easy": "a?",
        "hardq": "b?",
        "hards": "c.",
    }
    for bad in ["no json", '{"easy_question": "a?"', '{"easy_question": ""}', "[1, 2]"]:
        with pytest.raises(ValueError):
            parse_questions(bad, ("easy",))


def test_questions_three_types_per_image(
    sim: SimServer, tmp_path: Path, leaf: Subcategory, images: pa.Table
) -> None:
    out = generate_questions(leaf, images, config(sim, tmp_path), Journal(str(tmp_path / "j")))
    assert (out.n_in, out.n_out, out.n_failed) == (6, 6, 0)
    rows = out.rows.to_pylist()
    assert sorted(r["type"] for r in rows) == ["easy", "easy", "hardq", "hardq", "hards", "hards"]
    assert all(r["text"] and r["caption"] and r["class3"] == leaf.class3 for r in rows)


def test_unparseable_questions_are_retried_then_failed_not_filled(
    sim: SimServer, tmp_path: Path, leaf: Subcategory, images: pa.Table
) -> None:
    cfg = config(
        sim,
        tmp_path,
        generator={
            "name": "gen",
            "endpoint": "sim",
            "model": "sim-bad-generator",
            "structured": "off",
        },
        stages={
            "questions": {"max_attempts": 3},
            "images": {"source": {"kind": "typographic", "per_branch": 2}},
        },
    )
    before = sum(sim.counters()["by_model"].get("sim-bad-generator", {}).values())
    out = generate_questions(leaf, images, cfg, None)
    assert (out.n_in, out.n_out, out.n_failed) == (6, 0, 6)
    assert all(f.kind == "unparseable" and f.attempts == 3 for f in out.failures)
    # 2 captions + 3 question attempts per image
    assert sum(sim.counters()["by_model"]["sim-bad-generator"].values()) - before == 2 + 2 * 3


def test_caption_failures_record_the_attempts_made(
    sim: SimServer, tmp_path: Path, leaf: Subcategory, images: pa.Table
) -> None:
    """A generator that always answers 500: every caption fails after the endpoint's retries, and
    each slot's failure says how many requests that took (it used to say 0)."""
    cfg = config(sim, tmp_path, generator={"name": "gen", "endpoint": "sim", "model": "sim-broken"})
    out = generate_questions(leaf, images, cfg, None)
    assert (out.n_in, out.n_out, out.n_failed) == (6, 0, 6)
    assert {f.kind for f in out.failures} == {"server_error"}  # what failed, for the rerun policy
    # endpoint max_attempts is 2: two HTTP attempts per image, none re-asked after a failure
    assert all(f.attempts == 2 for f in out.failures), [f.attempts for f in out.failures]
    reason = out.failures[0].reason
    assert reason.startswith("caption request failed (server_error)") and "500" in reason
    assert "\n" not in reason and len(reason) <= 200


def test_responses_failures_are_counted_with_reasons(
    sim: SimServer, tmp_path: Path, leaf: Subcategory, images: pa.Table
) -> None:
    cfg = config(sim, tmp_path)
    questions = generate_questions(leaf, images, cfg, None).rows
    broken = [
        *cfg.models,
        cfg.models[0].model_copy(update={"name": "broken", "model": "sim-broken"}),
    ]
    cfg = cfg.model_copy(update={"models": tuple(broken)})
    out = collect_responses(leaf.branch_id, questions, images, cfg, None)
    assert out.n_in == 6 * (1 + 1 + 1 + 2 + 1)
    assert out.n_failed == 6 and {f.kind for f in out.failures} == {"server_error"}
    assert all("500" in f.reason and f.attempts == 2 for f in out.failures)
    models = out.rows.column("model").to_pylist()
    assert models.count("mixed") == 12 and "broken" not in models


def test_judge_then_pairs(
    sim: SimServer, tmp_path: Path, leaf: Subcategory, images: pa.Table
) -> None:
    cfg = config(sim, tmp_path)
    questions = generate_questions(leaf, images, cfg, None).rows
    responses = collect_responses(leaf.branch_id, questions, images, cfg, None).rows
    judged = judge_responses(leaf.branch_id, questions, responses, images, cfg, None)
    assert judged.n_failed == 0
    rows = judged.rows.to_pylist()
    safety = [r for r in rows if r["kind"] == "safety"]
    ratings = [r for r in rows if r["kind"] == "rating"]
    pairwise = [r for r in rows if r["kind"] == "pairwise"]
    assert len(safety) == responses.num_rows and len(ratings) == 3 * responses.num_rows
    assert all(0 <= r["score"] <= 1 and r["from_logprobs"] for r in safety)
    assert all(1 <= r["score"] <= 5 for r in ratings)
    assert all(abs(sum(json.loads(r["probabilities"]).values()) - 1) < 1e-6 for r in rows)
    asked = {(r["response_id"], r["other_response_id"]) for r in pairwise}
    assert all((b, a) in asked for a, b in asked)  # every pair in both orders

    pairs, rankings = select_branch_pairs(leaf.branch_id, questions, responses, judged.rows, cfg)
    assert pairs.n_in == questions.num_rows == pairs.n_out + pairs.n_failed
    assert pairs.n_out > 0
    p_unsafe = {r["response_id"]: r["score"] for r in safety}
    for pair in pairs.rows.to_pylist():
        assert p_unsafe[pair["chosen_response_id"]] <= p_unsafe[pair["rejected_response_id"]] + 0.25
        assert pair["chosen_model"] != "jailbroken"
    assert rankings.num_rows == responses.num_rows
