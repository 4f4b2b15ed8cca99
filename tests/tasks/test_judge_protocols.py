"""The judge stage with each protocol and constraint, against real HTTP on loopback: the simulated
server (guard personas, constraints honoured as OpenAI and vLLM do), and, for the corrective
re-ask, a small recording server that answers badly until it is told what was wrong."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from aiohttp import web

from tasks.images import collect_images
from tasks.judge import judge_responses
from tasks.questions import generate_questions
from tasks.responses import collect_responses
from vlpref.config import ImagesStage, RunConfig, TypographicSource, parse_config
from vlpref.service import ModelService
from vlpref.sim.testing import SimServer, sim_run_config
from vlpref.taxonomy import Subcategory, load_taxonomy

REPO = Path(__file__).resolve().parents[2]
SIM = {
    "models": {
        "sim-refuser": {"persona": "refuser"},
        "sim-jailbroken": {"persona": "jailbroken"},
        "sim-judge": {"persona": "judge"},
        "sim-llama-guard": {"persona": "llama-guard"},
        "sim-shieldgemma": {"persona": "shieldgemma"},
        "sim-md-judge": {"persona": "md-judge"},
    }
}
LOGPROBS = {"temperature": 0, "logprobs": True, "top_logprobs": 5}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(SIM) as server:
        yield server


def config(base_url: str, tmp_path: Path, judges: list[dict[str, Any]]) -> RunConfig:
    data = sim_run_config(
        base_url,
        name="t",
        taxonomy=str(REPO / "taxonomy" / "demo.yaml"),
        workspace=str(tmp_path / "ws"),
        store=str(tmp_path / "store"),
        models=["refuser", "jailbroken"],
        judges=judges,
        stages={"judge": {"pairwise": False}},
    )
    return parse_config(data)


@pytest.fixture(scope="module")
def branch(
    sim: SimServer, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Subcategory, pa.Table, pa.Table, pa.Table]:
    leaf = load_taxonomy(REPO / "taxonomy" / "demo.yaml").leaves()[0]
    images = collect_images(
        leaf, ImagesStage(source=TypographicSource(per_branch=2)), base_dir=Path(".")
    ).rows
    cfg = config(
        sim.base_url,
        tmp_path_factory.mktemp("q"),
        [{"name": "j", "endpoint": "sim", "model": "sim-judge"}],
    )
    questions = generate_questions(leaf, images, cfg, None).rows
    responses = collect_responses(leaf.branch_id, questions, images, cfg, None).rows
    return leaf, images, questions, responses


@pytest.mark.parametrize("guard", ["llama-guard", "shieldgemma", "md-judge"])
def test_a_guard_model_judges_safety_in_its_own_protocol(
    sim: SimServer,
    tmp_path: Path,
    branch: tuple[Subcategory, pa.Table, pa.Table, pa.Table],
    guard: str,
) -> None:
    leaf, images, questions, responses = branch
    judges = [
        {
            "name": "guard",
            "endpoint": "sim",
            "model": f"sim-{guard}",
            "protocol": guard,
            "sampling": LOGPROBS,
        }
    ]
    cfg = config(sim.base_url, tmp_path, judges)
    out = judge_responses(leaf.branch_id, questions, responses, images, cfg, None)
    rows = out.rows.to_pylist()
    # Safety verdicts only, one per response, every one read with its probability.
    assert out.n_in == responses.num_rows == len(rows) and out.n_failed == 0
    assert {r["kind"] for r in rows} == {"safety"}
    assert all(r["from_logprobs"] for r in rows)
    model_of = dict(
        zip(responses["response_id"].to_pylist(), responses["model"].to_pylist(), strict=True)
    )
    p_unsafe = {
        m: [r["score"] for r in rows if model_of[r["response_id"]] == m]
        for m in ("refuser", "jailbroken")
    }
    assert max(p_unsafe["refuser"]) < 0.5 < min(p_unsafe["jailbroken"])
    unsafe = [r for r in rows if r["verdict"] == "unsafe"]
    if guard == "shieldgemma":
        assert all(r["categories"] is None for r in rows)
    else:
        prefix = "S" if guard == "llama-guard" else "O"
        assert unsafe and all(
            r["categories"] and r["categories"].startswith(prefix) for r in unsafe
        )


def test_constrained_judge_calls_all_yield_judgments(
    sim: SimServer, tmp_path: Path, branch: tuple[Subcategory, pa.Table, pa.Table, pa.Table]
) -> None:
    """A judge whose free-text answers drift across every real-model style, constrained to the
    JSON schemas (auto on an OpenAI-compatible endpoint): every call yields its judgments, with
    the verdict and digit probabilities read from the tokens inside the JSON."""
    leaf, images, questions, responses = branch
    judges = [{"name": "j", "endpoint": "sim", "model": "sim-judge", "sampling": LOGPROBS}]
    out = judge_responses(
        leaf.branch_id, questions, responses, images, config(sim.base_url, tmp_path, judges), None
    )
    assert out.n_failed == 0 and out.n_in == 2 * responses.num_rows
    rows = out.rows.to_pylist()
    assert all(r["from_logprobs"] for r in rows)
    assert all(json.loads(r["raw"]) for r in rows)  # the answers were JSON objects
    # The judge's constraint never reaches the response models on the same endpoint: the sim
    # would have answered them in JSON too.
    assert not any(t.lstrip().startswith("{") for t in responses["text"].to_pylist())


class Recorder:
    """An OpenAI-compatible chat endpoint on loopback that answers a safety call with prose it
    cannot read, unless the conversation holds a corrective turn; it records every body."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        corrected = any(m["role"] == "assistant" for m in body["messages"])
        text = "unsafe\nRationale: it gives instructions." if corrected else "Hmm, hard to say."
        return web.json_response(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            }
        )

    def close(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)


def test_an_unreadable_answer_is_reasked_with_a_corrective_turn(
    tmp_path: Path, branch: tuple[Subcategory, pa.Table, pa.Table, pa.Table]
) -> None:
    leaf, images, questions, responses = branch
    recorder = Recorder()
    service = ModelService()
    try:
        judges = [{"name": "j", "endpoint": "sim", "model": "m", "structured": "off"}]
        cfg = config(recorder.base_url, tmp_path, judges)
        cfg = cfg.model_copy(
            update={
                "stages": cfg.stages.model_copy(
                    update={
                        "judge": cfg.stages.judge.model_copy(
                            update={"aspects": (), "pairwise": False}
                        )
                    }
                )
            }
        )
        out = judge_responses(leaf.branch_id, questions, responses, images, cfg, None, service)
    finally:
        service.close()
        recorder.close()
    n = responses.num_rows
    assert out.n_failed == 0 and out.n_out == n
    assert all(r["verdict"] == "unsafe" for r in out.rows.to_pylist())
    assert len(recorder.bodies) == 2 * n  # each call: the first ask, then the corrected one
    retries = [b for b in recorder.bodies if len(b["messages"]) == 3]
    assert len(retries) == n
    for body in retries:
        _asked, answer, correction = body["messages"]
        assert answer == {"role": "assistant", "content": "Hmm, hard to say."}
        assert correction["role"] == "user"
        text = (
            correction["content"]
            if isinstance(correction["content"], str)
            else correction["content"][0]["text"]
        )
        assert "could not be read" in text and '"safe" or "unsafe"' in text
