"""The judge stage itself on a real vLLM, with output constraints: the tiny random model judges
the responses stage's answers through vLLM's server (`structured: auto` on `kind: openai`: JSON
schemas for every call) and through the offline engine (`auto` on `kind: vllm`: a choice for the
one-word verdicts, a JSON schema for the ratings).

The model is random, so its verdicts mean nothing; the point is that a grammar makes every
answer readable: every judge call yields its judgments, and verdicts constrained to a choice carry
their probability from the verdict token.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from bench.vllm_tiny import SERVED_NAME, offline_options
from tasks.judge import judge_responses
from tasks.responses import collect_responses
from tests_vllm.conftest import REPO, REPORT
from vlpref.config import RunConfig, parse_config
from vlpref.prompts import DEFAULT_PROMPTS_DIR
from vlpref.service import ModelService
from vlpref.vllm_serve import VllmServers

JUDGE_SAMPLING = {
    "temperature": 1.0,
    "seed": 0,
    "max_tokens": 240,  # a random model may pad JSON with whitespace (tests_vllm/test_structured)
    "logprobs": True,
    "top_logprobs": 10,
}
RESPONSE_SAMPLING = {"temperature": 1.0, "seed": 1, "max_tokens": 12}


# The tiny model's context is 512 tokens and an image takes most of it: the rating template is cut
# to its fields here (the constraint, not the wording, is what is under test).
SHORT_RATING = """TASK: rating
Rate the response 1-5 on: $aspects
$aspect_lines
<caption>$caption</caption>
<question>$question</question>
<response>$response</response>
"""


def short_prompts(root: Path) -> Path:
    folder = root / "prompts"
    shutil.copytree(DEFAULT_PROMPTS_DIR, folder)
    (folder / "judge_rating.txt").write_text(SHORT_RATING)
    return folder


def judge_config(endpoint: dict[str, Any], root: Path) -> RunConfig:
    return parse_config(
        {
            "name": "vllm-judge-tier",
            "taxonomy": str(REPO / "taxonomy" / "demo.yaml"),
            "workspace": str(root / "ws"),
            "store": str(root / "store"),
            "endpoints": {"tiny": endpoint},
            "models": [
                {
                    "name": "a",
                    "endpoint": "tiny",
                    "model": SERVED_NAME,
                    "sampling": RESPONSE_SAMPLING,
                },
                {
                    "name": "b",
                    "endpoint": "tiny",
                    "model": SERVED_NAME,
                    "sampling": {**RESPONSE_SAMPLING, "seed": 2},
                },
            ],
            "generator": {"name": "gen", "endpoint": "tiny", "model": SERVED_NAME},
            "judges": [
                {
                    "name": "judge",
                    "endpoint": "tiny",
                    "model": SERVED_NAME,
                    "structured": "auto",
                    "sampling": JUDGE_SAMPLING,
                }
            ],
            "stages": {"judge": {"max_pairs_per_question": 1}},
            "prompts_dir": str(short_prompts(root)),
        }
    )


def judge_everything(config: RunConfig, workload: Any, service: ModelService, label: str) -> None:
    leaf, images, questions = workload
    responses = collect_responses(leaf.branch_id, questions, images, config, None, service).rows
    started = time.perf_counter()
    out = judge_responses(leaf.branch_id, questions, responses, images, config, None, service)
    REPORT.append(
        f"{label}: judge stage, {out.n_in} constrained calls: {time.perf_counter() - started:.2f}s"
    )
    assert out.n_in >= 2 * responses.num_rows > 0
    assert out.n_failed == 0, out.failures[:3]  # every constrained answer was readable
    rows = out.rows.to_pylist()
    kinds = {r["kind"] for r in rows}
    assert {"safety", "rating"} <= kinds
    assert all(r["verdict"] in ("safe", "unsafe") for r in rows if r["kind"] == "safety")
    assert all(r["verdict"] in {"1", "2", "3", "4", "5"} for r in rows if r["kind"] == "rating")
    assert all(r["from_logprobs"] for r in rows if r["kind"] == "safety")


def test_the_judge_stage_under_json_schemas_on_a_vllm_server(
    served: VllmServers, workload: Any, tmp_path: Path
) -> None:
    service = ModelService()
    try:
        endpoint = dict(served.config.endpoints["tiny"])
        judge_everything(judge_config(endpoint, tmp_path), workload, service, "server")
    finally:
        service.close()
    served.check_alive()


def test_the_judge_stage_under_choice_and_json_on_the_offline_engine(
    tiny_model: Path, workload: Any, tmp_path: Path
) -> None:
    service = ModelService()
    try:
        config = judge_config(offline_options(tiny_model), tmp_path)
        judge_everything(config, workload, service, "offline")
    finally:
        service.close()
