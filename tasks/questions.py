"""Questions stage: per image, a detailed caption, then SPA-VL's three prompt types.

Two rounds of requests to the generator: captions for every image of the branch, then the
questions (easy question, hard question, hard statement) from image + caption + class path. An
answer that does not parse as the expected JSON is asked again with another seed, up to
`max_attempts`; after that its question slots are failures with the reason. Nothing is filled
with a placeholder. A failure records the attempts made for its image in the round that failed
(caption or questions): the provider's HTTP attempts summed over the re-asks, an answer from the
journal counting one and a request early stop did not send counting none.

Accounting unit: question slots (images x configured types). in = out + failed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa

from tasks.common import image_part, provider_for, retry_params
from vlpref.chat import ChatRequest, ChatResult, Message, OutputConstraint
from vlpref.config import RunConfig
from vlpref.journal import Journal
from vlpref.prompts import Prompt, load_prompt
from vlpref.protocols import constraint_for
from vlpref.records import QUESTIONS, stable_id, table
from vlpref.runner import BatchStats
from vlpref.service import Batch, ModelService
from vlpref.stage import FailureRow, StageOutput
from vlpref.taxonomy import Subcategory

TYPE_KEYS = {"easy": "easy_question", "hardq": "hard_question", "hards": "hard_statement"}
_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


class UnparseableQuestions(ValueError):
    pass


REASON_CHARS = 200  # a failure reason is one line of at most this many characters


def _brief(text: str) -> str:
    """The first line of `text`, cut to REASON_CHARS: reasons are read in tables, one per row."""
    lines = text.strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= REASON_CHARS else line[: REASON_CHARS - 3].rstrip() + "..."


def _tries(result: ChatResult) -> int:
    """The attempts a result stands for: its HTTP attempts; 1 for a journal hit (asked once,
    earlier); 0 for a request that was not sent."""
    return result.attempts or (1 if result.cached else 0)


def parse_questions(text: str, types: tuple[str, ...]) -> dict[str, str]:
    """The JSON object of the questions prompt -> {type: text}; tolerant of code fences and
    chatter around the object, strict about the keys and their values."""
    match = _JSON_OBJECT.search(text)
    if not match:
        raise UnparseableQuestions(f"no JSON object in the answer: {text[:80]!r}")
    try:
        data = json.loads(match.group(0))
    except json.JSONDecodeError as exc:
        raise UnparseableQuestions(f"invalid JSON ({exc.msg}): {text[:80]!r}") from exc
    if not isinstance(data, dict):
        raise UnparseableQuestions("the JSON is not an object")
    out: dict[str, str] = {}
    for qtype in types:
        value = data.get(TYPE_KEYS[qtype])
        if not isinstance(value, str) or not value.strip():
            raise UnparseableQuestions(f"missing or empty {TYPE_KEYS[qtype]!r}")
        out[qtype] = value.strip()
    return out


def class_path(leaf: Subcategory) -> str:
    return f"{leaf.class1} > {leaf.class2} > {leaf.class3}"


@dataclass
class _Caption:
    text: str | None = None
    failure: str | None = None


def generate_questions(
    leaf: Subcategory,
    images: pa.Table,
    config: RunConfig,
    journal: Journal | None,
    service: ModelService | None = None,
) -> StageOutput:
    stage = config.stages.questions
    gen = config.generator
    provider = provider_for(config, gen, service)
    service = service or ModelService.shared()
    caption_prompt = load_prompt("caption", config.prompts_dir)
    questions_prompt = load_prompt("questions", config.prompts_dir)
    rows = images.to_pylist()
    keywords = ", ".join(leaf.keywords)
    params = gen.sampling.to_params()
    if params.n != 1:
        params = replace(params, n=1)  # one caption / one question set per image

    stats = BatchStats()
    # The question set as a JSON schema when the generator's endpoint can constrain it
    # (vlpref/protocols.py); captions are free text.
    constraint = constraint_for(
        gen.structured,
        config.endpoint_kind(gen.endpoint),
        "questions",
        question_keys=[TYPE_KEYS[t] for t in stage.types],
    )
    # image -> the kind of its last failed request (a `Failure.kind`, `stopped` for one early
    # stop did not send): a slot's failure kind, so the rerun policy (vlpref/retry.py) knows
    # whether asking again can heal it. Unparseable answers and empty captions are `unparseable`.
    request_failed: dict[str, str] = {}
    captions: dict[str, _Caption] = {r["image_id"]: _Caption() for r in rows}
    caption_tries: dict[str, int] = {}
    pending = {r["image_id"]: r for r in rows}
    for attempt in range(stage.max_attempts):
        if not pending:
            break
        requests = [
            ChatRequest(
                id=image_id,
                model=gen.model,
                messages=(
                    Message.user(
                        image_part(row),
                        caption_prompt.render(class_path=class_path(leaf), keywords=keywords),
                    ),
                ),
                params=retry_params(params, attempt),
                prompt_version=caption_prompt.version,
            )
            for image_id, row in pending.items()
        ]
        for result in service.run([(provider, requests)], journal, stats):
            image_id = result.request.id
            caption = captions[image_id]
            caption_tries[image_id] = caption_tries.get(image_id, 0) + _tries(result)
            text = result.samples[0].text.strip() if result.ok and result.samples else ""
            if result.ok and text:
                caption.text, caption.failure = text, None
                pending.pop(image_id)
            elif not result.ok:
                assert result.failure is not None
                request_failed[image_id] = result.failure.kind
                caption.failure = _brief(
                    f"caption request failed ({result.failure.kind}): {result.failure.message}"
                )
                pending.pop(image_id)  # the provider already retried transport errors
            else:
                caption.failure = "empty caption"

    questions: dict[str, dict[str, str]] = {}
    failures: list[FailureRow] = []
    attempts_used: dict[str, int] = {}
    last_error: dict[str, str] = {}
    pending = {r["image_id"]: r for r in rows if captions[r["image_id"]].text}
    for attempt in range(stage.max_attempts):
        if not pending:
            break
        requests = [
            _questions_request(
                questions_prompt,
                leaf,
                keywords,
                row,
                captions[image_id].text or "",
                gen.model,
                params,
                attempt,
                constraint,
            )
            for image_id, row in pending.items()
        ]
        # The first answers all unparseable: the generator is asked no more (re-asks are answers
        # that failed to parse already, so only transport failures stop those).
        check = None if attempt else _questions_check(stage.types)
        for result in service.run([Batch(provider, requests, check)], journal, stats):
            image_id = result.request.id
            attempts_used[image_id] = attempts_used.get(image_id, 0) + _tries(result)
            if not result.ok:
                assert result.failure is not None
                request_failed[image_id] = result.failure.kind
                last_error[image_id] = _brief(
                    f"questions request failed ({result.failure.kind}): {result.failure.message}"
                )
                pending.pop(image_id)
                continue
            request_failed.pop(image_id, None)
            try:
                questions[image_id] = parse_questions(result.samples[0].text, stage.types)
                pending.pop(image_id)
            except UnparseableQuestions as exc:
                last_error[image_id] = _brief(f"unparseable questions: {exc}")

    out_rows: list[dict[str, Any]] = []
    for row in rows:
        image_id = row["image_id"]
        caption = captions[image_id]
        if image_id in questions:
            for qtype, text in questions[image_id].items():
                out_rows.append(
                    _question_row(
                        row, qtype, text, caption.text or "", gen.name, questions_prompt.version
                    )
                )
            continue
        reason = caption.failure if caption.text is None else last_error.get(image_id, "no answer")
        kind = request_failed.get(image_id, "unparseable")
        tries = caption_tries if caption.text is None else attempts_used
        for qtype in stage.types:
            failures.append(
                FailureRow(f"{image_id}:{qtype}", kind, reason or "unknown", tries.get(image_id, 0))
            )

    return StageOutput(
        stage="questions",
        branch_id=leaf.branch_id,
        unit="question slots",
        n_in=len(rows) * len(stage.types),
        rows=table(out_rows, QUESTIONS),
        failures=tuple(failures),
        extra={"images": len(rows), "requests_sent": stats.sent, "requests_cached": stats.cached},
    )


def _questions_check(types: tuple[str, ...]) -> Callable[[ChatResult], str | None]:
    """Why an answer of the questions round is unusable, for the early-stop probe."""

    def check(result: ChatResult) -> str | None:
        try:
            parse_questions(result.samples[0].text if result.samples else "", types)
        except UnparseableQuestions as exc:
            return f"unparseable questions: {exc}"
        return None

    return check


def _questions_request(
    prompt: Prompt,
    leaf: Subcategory,
    keywords: str,
    row: Mapping[str, Any],
    caption: str,
    model: str,
    params: Any,
    attempt: int,
    constraint: OutputConstraint | None,
) -> ChatRequest:
    text = prompt.render(class_path=class_path(leaf), keywords=keywords, caption=caption)
    return ChatRequest(
        id=row["image_id"],
        model=model,
        messages=(Message.user(image_part(row), text),),
        params=retry_params(params, attempt),
        prompt_version=prompt.version,
        constraint=constraint,
    )


def _question_row(
    image: Mapping[str, Any], qtype: str, text: str, caption: str, generator: str, prompt_hash: str
) -> dict[str, Any]:
    return {
        "question_id": stable_id(image["image_id"], qtype, text),
        "image_id": image["image_id"],
        "type": qtype,
        "text": text,
        "caption": caption,
        "branch_id": image["branch_id"],
        "class1": image["class1"],
        "class2": image["class2"],
        "class3": image["class3"],
        "generator": generator,
        "prompt_hash": prompt_hash,
    }


__all__ = ["ChatResult", "generate_questions", "parse_questions"]
