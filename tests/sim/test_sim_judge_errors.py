"""A judge that is wrong in known ways (issue 15, item 6): prior bias, image dependence, noise,
content-free calls, reasoning, and labelled sets whose truth is known."""

from __future__ import annotations

import base64
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.sim.helpers import QUESTION, RESPONSES, safety_prompt
from vlpref.sim import labelled
from vlpref.sim import personas as p
from vlpref.sim.config import SimConfig, load_config
from vlpref.sim.server import ImageCache, complete, parse_chat
from vlpref.sim.tokens import tokenize


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _logit(q: float) -> float:
    return math.log(q / (1.0 - q))


def _p_unsafe(settings: p.PersonaSettings, text: str, *, seed: int = 0, model: str = "j") -> float:
    messages = [{"role": "user", "content": text}]
    prompt = p.Prompt(p.prompt_digest(model, messages), text)
    g = p.generate(settings, prompt, seed=seed, index=0, temperature=0.0)
    dist = g.decisions[min(g.decisions)]
    return dist["unsafe"]


def _judge(**kw: Any) -> p.PersonaSettings:
    return p.PersonaSettings("judge", **kw)


# ----------------------------------------------------------------------------- prior bias


@pytest.mark.parametrize("bias", [-3.0, -0.5, 0.7, 2.0])
def test_prior_bias_shifts_the_logit_exactly(bias: float) -> None:
    for response in RESPONSES:
        h = p.assess(response, QUESTION + "\n").harmless
        got = _p_unsafe(_judge(prior_bias=bias), safety_prompt(response))
        assert got == pytest.approx(_sigmoid(1.6 * (3 - h) + bias), abs=1e-12)
        base = _p_unsafe(_judge(), safety_prompt(response))
        assert _logit(got) - _logit(base) == pytest.approx(bias, abs=1e-9)


def test_other_tasks_ignore_the_safety_options() -> None:
    text = (
        f"TASK: pairwise\n<question>{QUESTION}</question>\n"
        f"<response_a>{RESPONSES[0]}</response_a>\n<response_b>{RESPONSES[1]}</response_b>"
    )
    plain = p.generate(_judge(), p.Prompt(b"x" * 32, text), seed=0, index=0, temperature=0)
    biased = _judge(prior_bias=3.0, noise=2.0, image_dependence=1.0)
    same = p.generate(biased, p.Prompt(b"x" * 32, text), seed=0, index=0, temperature=0)
    assert plain == same


# ----------------------------------------------------------------------------- content-free


@pytest.mark.parametrize("empty", ["", "N/A", "  n/a  ", "\n"])
@pytest.mark.parametrize("bias", [0.0, 1.3, -2.2])
def test_content_free_response_answers_the_prior(empty: str, bias: float) -> None:
    settings = _judge(prior_bias=bias, noise=1.5, image_dependence=0.5)
    assert _p_unsafe(settings, safety_prompt(empty)) == pytest.approx(_sigmoid(bias), abs=1e-12)


def _png(colour: tuple[int, int, int], *, dot: bool = False) -> str:
    im = Image.new("RGB", (32, 32), colour)
    if dot:
        im.putpixel((3, 3), (255, 255, 255))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _served(model_cfg: dict[str, Any], text: str, image: str | None) -> dict[str, Any]:
    config: SimConfig = load_config({"models": {"j": {"persona": "judge", **model_cfg}}})
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    body = {
        "model": "j",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    req = parse_chat(json.dumps(body).encode(), config, ImageCache())
    mc = config.models["j"]
    settings = p.PersonaSettings(
        "judge",
        prior_bias=mc.prior_bias,
        image_dependence=mc.image_dependence,
        noise=mc.noise,
    )
    return complete(settings, req, "id")


def _served_p(out: dict[str, Any]) -> float:
    choice = out["choices"][0]
    verdict = next(  # the decision token: its top_logprobs hold both verdicts
        t
        for t in choice["logprobs"]["content"]
        if {x["token"].strip() for x in t["top_logprobs"]} == {"safe", "unsafe"}
    )
    tops = verdict["top_logprobs"]
    return sum(math.exp(t["logprob"]) for t in tops if t["token"].strip() == "unsafe")


def test_blank_image_or_text_only_is_content_free_but_a_real_image_is_not() -> None:
    cfg = {"prior_bias": 1.0, "image_dependence": 0.6, "noise": 2.0}
    text = safety_prompt("N/A")
    prior = _sigmoid(1.0)
    for image in (None, _png((0, 0, 0)), _png((200, 30, 90))):
        assert _served_p(_served(cfg, text, image)) == pytest.approx(prior, abs=1e-4)
    real = _png((200, 30, 90), dot=True)
    info = ImageCache().get(real)
    assert not info.blank and info.key
    m = 1.6 * (3 - p.image_harmlessness(info))
    got = _served_p(_served(cfg, text, real))
    assert got == pytest.approx(_sigmoid(0.6 * m + 1.0), abs=1e-4)


def test_image_dependence_mixes_the_image_cue() -> None:
    images = [p.ImageInfo(32, 32, key=f"k{i}") for i in range(40)]
    text = safety_prompt(RESPONSES[0])
    h = p.assess(RESPONSES[0], QUESTION + "\n").harmless
    seen = set()
    for info in images:
        for w in (0.0, 0.3, 1.0):
            prompt = p.Prompt(b"d" * 32, text, images=(info,))
            logit = p.safety_logit(p.parse_blocks(text), _judge(image_dependence=w), prompt)
            m = 1.6 * (3 - p.image_harmlessness(info))
            assert logit.total == pytest.approx((1 - w) * 1.6 * (3 - h) + w * m)
            if w == 1.0:
                seen.add(round(logit.p_unsafe, 6))
    assert len(seen) > 30  # with w = 1 the verdict follows the image, not the response
    assert p.image_harmlessness(p.ImageInfo()) == 3.0


# ----------------------------------------------------------------------------- noise


def test_noise_is_deterministic_per_request_and_has_its_std() -> None:
    sigma = 0.8
    diffs = []
    for i in range(600):
        text = safety_prompt(f"The object number {i} could be used in several ways.")
        noisy = _p_unsafe(_judge(noise=sigma), text)
        assert _p_unsafe(_judge(noise=sigma), text, seed=7) == noisy  # seed-independent
        diffs.append(_logit(noisy) - _logit(_p_unsafe(_judge(), text)))
    assert statistics.fmean(diffs) == pytest.approx(0.0, abs=0.1)
    assert statistics.stdev(diffs) == pytest.approx(sigma, rel=0.1)
    assert len({round(d, 9) for d in diffs}) == len(diffs)


# ----------------------------------------------------------------------------- reasoning


@pytest.mark.parametrize("marker", ["safety-reasoning", "safety + think step by step"])
def test_reasoning_ignores_bias_and_noise_at_a_token_price(marker: str) -> None:
    biased = _judge(prior_bias=2.5, noise=1.0)
    for response in RESPONSES:
        plain = safety_prompt(response)
        if marker == "safety-reasoning":
            text = plain.replace("TASK: safety", "TASK: safety-reasoning")
        else:
            text = plain + "\nThink step by step before you answer."
        assert p.reasoning_requested(text)
        prompt = p.Prompt(p.prompt_digest("j", text), text)
        g = p.generate(biased, prompt, seed=0, index=0, temperature=0)
        assert g.text.startswith("<think>\n") and "\n</think>\n" in g.text
        verdict_at = min(g.decisions)
        assert g.text[verdict_at:].split("\n")[0] in ("safe", "unsafe")
        unbiased = _p_unsafe(_judge(), plain)
        assert g.decisions[verdict_at]["unsafe"] == pytest.approx(unbiased, abs=1e-12)
        short = p.generate(biased, p.Prompt(b"z" * 32, plain), seed=0, index=0, temperature=0)
        assert len(tokenize(g.text)) - len(tokenize(short.text)) > 60
    assert not p.reasoning_requested(safety_prompt("x"))


# ----------------------------------------------------------------------------- labelled sets


def _metrics(pred: list[str], gold: list[str]) -> tuple[float, float]:
    pairs = list(zip(pred, gold, strict=True))
    tp = sum(a == b == "unsafe" for a, b in pairs)
    fp = sum(a == "unsafe" and b == "safe" for a, b in pairs)
    fn = sum(a == "safe" and b == "unsafe" for a, b in pairs)
    return sum(a == b for a, b in pairs) / len(pairs), 2 * tp / (2 * tp + fp + fn)


def _verdicts(
    settings: p.PersonaSettings, rows: list[dict[str, Any]], reasoning: bool
) -> list[str]:
    out = []
    for row in rows:
        text = labelled.safety_prompt(row, reasoning=reasoning)
        prompt = p.Prompt(p.prompt_digest("j", text), text)
        g = p.generate(settings, prompt, seed=0, index=0, temperature=0)
        out.append(g.text[min(g.decisions) :].split("\n")[0])
    return out


def test_labelled_sets_are_deterministic_and_balanced() -> None:
    rows = labelled.safety_rows(200, seed=0)
    assert rows == labelled.safety_rows(200, seed=0)
    assert rows != labelled.safety_rows(200, seed=1)
    assert sum(r["label"] == "unsafe" for r in rows) == 100
    assert sum(r["clear"] for r in rows) == 140
    for persona, count in {"jailbroken": 40, "over-compliant": 40, "hedged": 20}.items():
        assert sum(r["persona"] == persona for r in rows) == count
    assert all(r["image"].startswith(b"\x89PNG") for r in rows)
    pairs = labelled.pairwise_rows(100, seed=0)
    assert pairs == labelled.pairwise_rows(100, seed=0)
    assert sum(r["preferred"] == "A" for r in pairs) == 50
    for r in pairs:
        good = r["persona_a"] if r["preferred"] == "A" else r["persona_b"]
        assert labelled.CLEAR[good] == "safe"
    ratings = labelled.rating_rows(50, seed=0)
    assert all(
        set(r["ratings"]) == {"harmlessness", "helpfulness", "faithfulness"} for r in ratings
    )
    assert all(1 <= v <= 5 for r in ratings for v in r["ratings"].values())
    harm = {r["persona"]: r["ratings"]["harmlessness"] for r in ratings}
    assert harm["jailbroken"] == 1 and harm["refuser"] == 5


def test_unbiased_judge_matches_the_labels_and_bias_costs_a_measured_margin(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = labelled.safety_rows(200, seed=0)
    gold = [r["label"] for r in rows]
    unbiased = _verdicts(_judge(), rows, False)
    assert unbiased == gold  # every row, clear and ambiguous
    results = {}
    for name, settings in {
        "unbiased": _judge(),
        "prior_bias=+2": _judge(prior_bias=2.0),
        "prior_bias=-2": _judge(prior_bias=-2.0),
        "prior_bias=+2,noise=1": _judge(prior_bias=2.0, noise=1.0),
    }.items():
        plain = _metrics(_verdicts(settings, rows, False), gold)
        cascade = _metrics(_verdicts(settings, rows, True), gold)
        results[name] = (plain, cascade)
        with capsys.disabled():
            print(f"\n{name}: acc/F1 {plain[0]:.3f}/{plain[1]:.3f}, reasoning {cascade}")
    assert results["unbiased"][0] == (1.0, 1.0)
    assert results["prior_bias=+2"][0] == pytest.approx((0.8, 200 / 240))
    assert results["prior_bias=-2"][0] == pytest.approx((0.7, 80 / 140))
    assert results["prior_bias=+2,noise=1"][0][0] <= 0.85
    for _plain, cascade in results.values():
        assert cascade == (1.0, 1.0)  # reasoning recovers what bias and noise lost


def test_write_jsonl_and_parquet(tmp_path: Path) -> None:
    out = tmp_path / "sets" / "safety.jsonl"
    written = labelled.write(out, 20, seed=3, kind="safety")
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines == written and len(lines) == 20
    for row in lines:
        assert (out.parent / row["image"]).read_bytes().startswith(b"\x89PNG")
        assert not Path(row["image"]).is_absolute()
    table = pq.read_table(out.with_suffix(".parquet")).to_pylist()
    assert [r["id"] for r in table] == [r["id"] for r in lines]
    assert table[0]["image_bytes"] == (out.parent / lines[0]["image"]).read_bytes()
    assert labelled.main([str(tmp_path / "p.jsonl"), "--n", "4", "--kind", "pairwise"]) == 0
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 4


def test_served_reasoning_costs_completion_tokens_and_config_bounds() -> None:
    cfg = {"prior_bias": 2.0, "noise": 0.5}
    row = labelled.safety_rows(10, seed=0)[8]
    plain = _served(cfg, labelled.safety_prompt(row), None)
    reasoned = _served(cfg, labelled.safety_prompt(row, reasoning=True), None)
    extra = reasoned["usage"]["completion_tokens"] - plain["usage"]["completion_tokens"]
    assert 100 <= extra <= 160
    assert reasoned["choices"][0]["message"]["content"].startswith("<think>\n")
    assert _served_p(reasoned) == pytest.approx(_p_unsafe(_judge(), labelled.safety_prompt(row)))
    from vlpref.errors import ConfigError

    for bad in ({"image_dependence": 1.5}, {"noise": -1}, {"prior_bias": 50}):
        with pytest.raises(ConfigError):
            load_config({"models": {"j": {"persona": "judge", **bad}}})
