"""The generation source against the sim's /v1/images/generations (real HTTP on loopback): the
request encoding and its journal key, prompts from the template, and the seam's qualities:
a rerun answered by the journal, retries, budgets, refusals."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks.images import collect_images
from vlpref import budget
from vlpref.config import GenerateSource, RunConfig, parse_config
from vlpref.errors import ConfigError
from vlpref.images.generation import (
    IMAGE_REQUEST_TAG,
    ImageGenRequest,
    image_body,
    list_generated,
    parse_image_answer,
    prompts_for,
)
from vlpref.images.normalize import NormalizeOptions, normalize_bytes
from vlpref.keys import request_fingerprint
from vlpref.prompts import DEFAULT_PROMPTS_DIR, Prompt, load_prompt
from vlpref.service import ModelService
from vlpref.sim.images_api import image_for
from vlpref.sim.testing import SimServer, sim_run_config
from vlpref.stage import StageOutput
from vlpref.taxonomy import load_taxonomy

ROOT = Path(__file__).resolve().parents[2]
CYBER = load_taxonomy(ROOT / "taxonomy" / "demo.yaml").find("Malicious Use/Security threats/cyber")
SIM = {
    "models": {
        "sim-judge": {"persona": "judge"},
        # A model of the sim's config gets its faults on the images endpoint too.
        "sim-flaky-painter": {
            "persona": "echo",
            "faults": {"rate_limit": {"rate": 0.3, "retry_after_s": 0}},
        },
    }
}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(SIM) as server:
        yield server


@pytest.fixture
def service() -> Iterator[ModelService]:
    svc = ModelService()
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped templates plus one whose prompt the sim refuses (a content-policy 400)."""
    folder = tmp_path_factory.mktemp("prompts")
    for template in DEFAULT_PROMPTS_DIR.glob("*.txt"):
        (folder / template.name).write_text(template.read_text())
    (folder / "refused.txt").write_text("sim:content_policy $subject\n")
    return folder


def config(
    sim: SimServer, tmp_path: Path, prompts: Path, budget: Any = None, **source: Any
) -> RunConfig:
    generate = {
        "kind": "generate",
        "endpoint": "sim",
        "model": "sim-painter",
        "size": "64x48",
        "per_branch": 4,
        "seed": 7,
        **source,
    }
    data = sim_run_config(
        sim.base_url,
        taxonomy=str(ROOT / "taxonomy" / "demo.yaml"),
        workspace=str(tmp_path / "ws"),
        store=str(tmp_path / "store"),
        models=["judge"],
        endpoint={"max_attempts": 4, "backoff_initial_s": 0.01, "backoff_max_s": 0.05},
        stages={"images": {"source": generate}},
        prompts_dir=str(prompts),
        **({"budget": budget} if budget else {}),
    )
    return parse_config(data)


def collect(run: RunConfig, service: ModelService) -> StageOutput:
    return collect_images(CYBER, run.stages.images, base_dir=ROOT, run=run, service=service)


def sent(sim: SimServer, model: str) -> dict[str, int]:
    return dict(sim.counters()["by_model"].get(model, {}))


# --------------------------------------------------------------------------- pure logic


def test_an_image_request_is_a_chat_request_keyed_by_everything_that_changes_the_image() -> None:
    asked = ImageGenRequest(
        "b:generate:0", "dall-e-3", "a phishing email", size="1024x1024", quality="hd", variant=0
    )
    chat = asked.to_chat()
    assert chat.messages[0].text.startswith(IMAGE_REQUEST_TAG)
    assert ImageGenRequest.from_chat(chat) == asked
    key = request_fingerprint("openai-images", chat)
    for changed in (
        ImageGenRequest("other-id", "dall-e-3", "a phishing email", quality="hd", variant=0),
    ):
        assert request_fingerprint("openai-images", changed.to_chat()) == key  # ids are not keys
    for different in (
        ImageGenRequest("x", "dall-e-3", "a phishing email", quality="hd", variant=1),
        ImageGenRequest("x", "dall-e-3", "a phishing email", quality="standard", variant=0),
        ImageGenRequest("x", "dall-e-3", "a phishing email", size="512x512", quality="hd"),
        ImageGenRequest("x", "dall-e-2", "a phishing email", quality="hd", variant=0),
        ImageGenRequest("x", "dall-e-3", "a phishing email", quality="hd", seed=1),
    ):
        assert request_fingerprint("openai-images", different.to_chat()) != key
    assert request_fingerprint("openai", chat) != key  # never a chat key of the endpoint


def test_the_body_is_openais_images_body() -> None:
    asked = ImageGenRequest("i", "dall-e-3", "p", size="1024x1792", style="vivid", seed=3)
    assert image_body(asked) == {
        "model": "dall-e-3",
        "prompt": "p",
        "n": 1,
        "size": "1024x1792",
        "response_format": "b64_json",
        "style": "vivid",
        "seed": 3,
    }
    gpt = image_body(ImageGenRequest("i", "gpt-image-1", "p", size="auto", extra_body={"x": 1}))
    assert gpt == {"model": "gpt-image-1", "prompt": "p", "n": 1, "x": 1}


def test_answers_keep_the_image_and_the_revised_prompt() -> None:
    body = {"data": [{"b64_json": "aGk=", "revised_prompt": "r"}], "usage": {"input_tokens": 3}}
    samples, usage = parse_image_answer(json.dumps(body).encode())
    assert json.loads(samples[0].text) == {"b64_json": "aGk=", "revised_prompt": "r"}
    assert (usage.prompt_tokens, usage.completion_tokens) == (3, 0)
    from vlpref.providers.openai_compat import _FinalError, _RetryableError

    with pytest.raises(_FinalError):  # an URL answer: asking again would get one again
        parse_image_answer(b'{"data": [{"url": "https://x/y.png"}]}')
    with pytest.raises(_RetryableError):
        parse_image_answer(b'{"data": [')


def test_prompts_take_turns_over_the_subjects_and_unknown_fields_are_refused() -> None:
    prompt = load_prompt("image_generation")
    texts = prompts_for(CYBER, prompt, 5)
    subjects = ["hack a network", "hacking", "cyber attack", "phishing", "hack a network"]
    assert [s for s, _ in texts] == subjects
    assert all(CYBER.path in text for _, text in texts)
    custom = Prompt("mine", "mine.txt", "$subject, variant $variant")
    assert prompts_for(CYBER, custom, 2) == [
        ("hack a network", "hack a network, variant 1"),
        ("hacking", "hacking, variant 2"),
    ]
    with pytest.raises(ConfigError, match="not known"):
        prompts_for(CYBER, Prompt("bad", "bad.txt", "$subject at $place"), 1)


# --------------------------------------------------------------------------- against the sim


def test_images_come_from_the_endpoint_and_a_rerun_pays_nothing(
    sim: SimServer, tmp_path: Path, prompts: Path, service: ModelService
) -> None:
    run = config(sim, tmp_path, prompts)
    before = sum(sent(sim, "sim-painter").values())
    out = collect(run, service)
    assert out.n_out == 4 and not out.failures
    assert sum(sent(sim, "sim-painter").values()) - before == 4
    metas = [json.loads(m) for m in out.rows.column("source_meta").to_pylist()]
    assert [m["variant"] for m in metas] == [0, 1, 2, 3]
    assert [m["seed"] for m in metas] == [7, 8, 9, 10]
    assert metas[0]["subject"] == "hack a network" and metas[0]["model"] == "sim-painter"
    assert metas[0]["prompt_version"] == load_prompt("image_generation").version
    # The sim's deterministic picture for that prompt and seed, normalised as the stage does.
    expected = normalize_bytes(
        image_for("sim-painter", metas[0]["prompt"], 7, 0, 64, 48), NormalizeOptions()
    )
    assert out.rows.column("image_id").to_pylist()[0] == expected.image_id
    assert out.rows.column("format").to_pylist() == ["png"] * 4

    again = collect(run, service)
    assert sum(sent(sim, "sim-painter").values()) - before == 4  # all from the journal
    assert again.rows.column("image_id").to_pylist() == out.rows.column("image_id").to_pylist()

    grown = collect(config(sim, tmp_path, prompts, per_branch=6), service)
    assert grown.n_out == 6
    assert sum(sent(sim, "sim-painter").values()) - before == 6  # only the two new images


def test_the_journal_holds_the_image_itself(
    sim: SimServer, tmp_path: Path, prompts: Path, service: ModelService
) -> None:
    run = config(sim, tmp_path, prompts, per_branch=1)
    listing, stats = list_generated(run.stages.images.source, CYBER, run, service)  # type: ignore[arg-type]
    assert stats.sent == 1
    item = listing.items[0]
    segments = list((tmp_path / "ws" / "journal" / "images" / CYBER.branch_id).glob("*.jsonl"))
    line = json.loads(segments[0].read_text().splitlines()[0])
    journaled = base64.b64decode(json.loads(line["x"])["b64_json"])
    assert journaled == getattr(item, "data")  # noqa: B009
    assert journaled == image_for("sim-painter", item.meta["prompt"], 7, 0, 64, 48)


def test_rate_limits_are_retried_like_any_model_call(
    sim: SimServer, tmp_path: Path, prompts: Path, service: ModelService
) -> None:
    before = sent(sim, "sim-flaky-painter")
    out = collect(config(sim, tmp_path, prompts, model="sim-flaky-painter", per_branch=8), service)
    after = sent(sim, "sim-flaky-painter")
    assert out.n_out == 8 and not out.failures, out.failures
    assert after.get("429", 0) > before.get("429", 0)  # some were refused, then retried


def test_a_budget_stops_image_requests_and_a_refusal_is_final(
    sim: SimServer, tmp_path: Path, prompts: Path, service: ModelService
) -> None:
    budget.reset()
    limits = {"per_model": {"painter": {"requests": 2}}}
    limited = config(sim, tmp_path, prompts, budget=limits, name="painter")
    out = collect(limited, service)
    assert out.n_out == 2
    assert [f.kind for f in out.failures] == ["stopped", "stopped"]
    guard = budget.reached(limited)
    assert guard is not None and guard.by_model["painter"].requests == 2
    budget.reset()

    refused = collect(config(sim, tmp_path, prompts, template="refused", per_branch=1), service)
    assert refused.n_out == 0 and refused.failures[0].kind == "bad_request"


def test_an_endpoint_that_is_not_configured_is_a_config_error(
    sim: SimServer, tmp_path: Path, prompts: Path, service: ModelService
) -> None:
    """Refused when the config loads, before the images stage could send anything."""
    with pytest.raises(ConfigError, match=r"images\.source\.endpoint: unknown endpoint 'nowhere'"):
        config(sim, tmp_path, prompts, endpoint="nowhere")
    assert isinstance(config(sim, tmp_path, prompts).stages.images.source, GenerateSource)
