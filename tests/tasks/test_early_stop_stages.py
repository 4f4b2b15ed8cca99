"""Early stop in the model-calling stages, against the simulated server: a model the endpoint does
not serve, a wrong key and a judge or generator whose answers never parse each cost the first N
requests of the batch, not the whole batch; every item is still accounted for (in = out + failed,
checked by StageOutput), and the failures say why."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from tasks.images import collect_images
from tasks.judge import judge_responses
from tasks.questions import generate_questions
from tasks.responses import collect_responses
from vlpref.config import ImagesStage, RunConfig, TypographicSource, parse_config
from vlpref.records import QUESTIONS, stable_id, table
from vlpref.service import ModelService
from vlpref.sim.testing import SimServer, sim_run_config
from vlpref.stage import StageOutput
from vlpref.taxonomy import Subcategory, load_taxonomy

REPO = Path(__file__).resolve().parents[2]
KEY = "stage-sim-key"
N = 8
SIM: dict[str, Any] = {
    "require_api_key": KEY,
    "models": {
        "sim-refuser": {"persona": "refuser"},
        "sim-jailbroken": {"persona": "jailbroken"},
        "sim-judge": {"persona": "judge"},
        "sim-bad-generator": {"persona": "judge", "malformed_rate": 1.0},
    },
}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(SIM) as server:
        yield server


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch, sim: SimServer) -> None:
    monkeypatch.setenv("STAGE_SIM_KEY", KEY)
    monkeypatch.setenv("STAGE_WRONG_KEY", "wrong")
    sim.reset()


@pytest.fixture
def service() -> Iterator[ModelService]:
    """A service of its own per test: no model is trusted yet (vlpref/service.py, TRUST_S)."""
    svc = ModelService()
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def leaf() -> Subcategory:
    return load_taxonomy(REPO / "taxonomy" / "demo.yaml").leaves()[0]


@pytest.fixture(scope="module")
def images(leaf: Subcategory) -> pa.Table:
    out = collect_images(
        leaf, ImagesStage(source=TypographicSource(per_branch=20)), base_dir=Path(".")
    )
    assert out.n_out == 20
    return out.rows


def config(sim: SimServer, tmp_path: Path, **overrides: Any) -> RunConfig:
    data = sim_run_config(
        sim.base_url,
        name="early-stop",
        taxonomy=str(REPO / "taxonomy" / "demo.yaml"),
        workspace=str(tmp_path / "ws"),
        store=str(tmp_path / "store"),
        endpoint={"api_key_env": "STAGE_SIM_KEY", "max_attempts": 1},
        models=["refuser"],
        stages={"judge": {"pairwise": False}},
    )
    data["endpoints"]["wrong-key"] = {**data["endpoints"]["sim"], "api_key_env": "STAGE_WRONG_KEY"}
    data.update(overrides)
    return parse_config(data)


def arrivals(sim: SimServer, model: str) -> dict[str, int]:
    by_model: dict[str, dict[str, int]] = sim.counters()["by_model"]
    return by_model.get(model, {})


def failure_kinds(out: StageOutput) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for f in out.failures:
        kinds[f.kind] = kinds.get(f.kind, 0) + 1
    return kinds


def many_questions(images: pa.Table, leaf: Subcategory, count: int) -> pa.Table:
    image_ids = images.column("image_id").to_pylist()
    rows = [
        {
            "question_id": stable_id("q", i),
            "image_id": image_ids[i % len(image_ids)],
            "type": "easy",
            "text": f"How would someone do thing number {i}?",
            "caption": "a caption",
            "branch_id": leaf.branch_id,
            "class1": leaf.class1,
            "class2": leaf.class2,
            "class3": leaf.class3,
            "generator": "gen",
            "prompt_hash": "test",
        }
        for i in range(count)
    ]
    return table(rows, QUESTIONS)


def test_responses_of_a_model_the_endpoint_does_not_serve(
    sim: SimServer, tmp_path: Path, leaf: Subcategory, images: pa.Table, service: ModelService
) -> None:
    missing = {"name": "missing", "endpoint": "sim", "model": "no-such-model"}
    cfg = config(
        sim,
        tmp_path,
        models=[{"name": "refuser", "endpoint": "sim", "model": "sim-refuser"}, missing],
    )
    questions = many_questions(images, leaf, 200)
    out = collect_responses(leaf.branch_id, questions, images, cfg, None, service)
    assert (out.n_in, out.n_out, out.n_failed) == (400, 200, 200)
    assert arrivals(sim, "no-such-model") == {"404": N}  # 8 of its 200 requests were sent
    assert arrivals(sim, "sim-refuser") == {"200": 200}  # the healthy model, untouched
    assert failure_kinds(out) == {"bad_request": N, "stopped": 200 - N}
    stopped = [f for f in out.failures if f.kind == "stopped"]
    assert all(
        f.reason
        == "stopped: not sent: the first 8 requests to no-such-model all failed: "
        "bad_request 404: The model `no-such-model` does not exist or you do not have access "
        "to it."
        and f.attempts == 0
        for f in stopped
    )
    assert out.extra["requests_sent"] == 200 + N


def test_questions_with_a_wrong_key(
    sim: SimServer, tmp_path: Path, leaf: Subcategory, images: pa.Table, service: ModelService
) -> None:
    cfg = config(
        sim,
        tmp_path,
        generator={"name": "gen", "endpoint": "wrong-key", "model": "sim-judge"},
    )
    out = generate_questions(leaf, images, cfg, None, service)
    assert (out.n_in, out.n_out, out.n_failed) == (60, 0, 60)
    assert arrivals(sim, "sim-judge") == {"401": N}  # the captions' probe, nothing more
    assert failure_kinds(out) == {"auth": 3 * N, "stopped": 3 * (20 - N)}
    assert all(
        "all failed: auth 401: Incorrect API key provided" in f.reason
        for f in out.failures
        if f.kind == "stopped"
    )


def test_questions_that_never_parse(
    sim: SimServer, tmp_path: Path, leaf: Subcategory, images: pa.Table, service: ModelService
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
    )
    out = generate_questions(leaf, images, cfg, None, service)
    assert (out.n_in, out.n_out, out.n_failed) == (60, 0, 60)
    # 20 captions; the first 8 question sets, asked 3 times each (max_attempts); no others.
    assert arrivals(sim, "sim-bad-generator") == {"200": 20 + 3 * N}
    assert failure_kinds(out) == {"unparseable": 3 * N, "stopped": 3 * (20 - N)}
    assert {f.reason.split(": unparseable")[0] for f in out.failures if f.kind == "stopped"} == {
        "questions request failed (stopped): not sent: the first 8 requests to sim-bad-generator "
        "all failed"
    }


@pytest.fixture
def responses(
    sim: SimServer, tmp_path: Path, leaf: Subcategory, images: pa.Table, service: ModelService
) -> tuple[pa.Table, pa.Table]:
    """30 questions x (refuser, jailbroken): 60 responses, i.e. 120 pointwise judge calls."""
    cfg = config(
        sim,
        tmp_path,
        models=[
            {"name": "refuser", "endpoint": "sim", "model": "sim-refuser"},
            {"name": "jailbroken", "endpoint": "sim", "model": "sim-jailbroken"},
        ],
    )
    questions = many_questions(images, leaf, 30)
    out = collect_responses(leaf.branch_id, questions, images, cfg, None, service)
    assert out.n_out == 60
    sim.reset()
    return questions, out.rows


@pytest.mark.parametrize(
    ("judge", "sent", "kinds", "cause"),
    [
        # A persona that does not follow the verdict protocol: the first 8 calls are each asked
        # max_attempts (3) times, as unparseable answers always are; the other 112 never.
        (
            {"endpoint": "sim", "model": "sim-refuser", "structured": "off"},
            {"200": 3 * N},
            {"unparseable": N, "stopped": 120 - N},
            "stayed unreadable after 3 ask(s) each: ",
        ),
        # A wrong key: 8 calls, no re-asks (the provider does not retry a 401).
        (
            {"endpoint": "wrong-key", "model": "sim-judge"},
            {"401": N},
            {"auth": N, "stopped": 120 - N},
            "all failed: auth 401: Incorrect API key provided",
        ),
    ],
)
def test_a_judge_that_cannot_judge_is_asked_no_more(
    sim: SimServer,
    tmp_path: Path,
    leaf: Subcategory,
    images: pa.Table,
    service: ModelService,
    responses: tuple[pa.Table, pa.Table],
    judge: dict[str, str],
    sent: dict[str, int],
    kinds: dict[str, int],
    cause: str,
) -> None:
    questions, rows = responses
    cfg = config(sim, tmp_path, judges=[{"name": "bad-judge", **judge}])
    out = judge_responses(leaf.branch_id, questions, rows, images, cfg, None, service)
    assert (out.n_in, out.n_out, out.n_failed) == (120, 0, 120)
    assert arrivals(sim, judge["model"]) == sent
    assert failure_kinds(out) == kinds
    assert all(cause in f.reason for f in out.failures if f.kind == "stopped")
    assert out.extra["requests_sent"] == sum(sent.values())
