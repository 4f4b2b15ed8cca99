"""What a run will send, found without sending it: the parts of `vlpref plan` that are not the flow.

The plan runs the stages themselves (flows/plan.py walks `flows/stages.py`), with a model
service whose providers never send (`PlanningService`): a request the journal answers is counted
as *from the journal*; any other is counted as *to send*, with estimated tokens, and answered by
a placeholder, so the stages after it go on and their own requests are counted too. A request
whose text holds a placeholder (`PLANNED`) exists only if the answers before it come out as
planned, so it is counted as a *bound* (an upper bound, marked `≤`), never as exact.

Tokens are estimates, documented so a user can check them:
- text: 1 token per 4 characters (OpenAI's rule of thumb for English), rounded up, plus 4 per
  message for the chat format;
- an image, by the kind of endpoint: `openai` (and plug-ins), OpenAI's documented high-detail
  rule: fit within 2048 x 2048, scale the shorter side down to 768, then 170 tokens per 512 px
  tile plus 85; `vllm` / `vllm-server`, 576 (a LLaVA-1.5 336 px image; models differ a lot:
  Qwen2-VL takes (h/28)(w/28)): set the model entry's `image_tokens` for yours;
- completion: the mean completion tokens of the journaled answers of the same model in the same
  stage of the plan, else the sampling's `max_tokens` (else 256), times `n`.
Cost: prompt tokens x `price.input_per_mtok` + completion tokens x `price.output_per_mtok`, per
million; a model without a price has no cost (reported as such, never as 0).
"""

from __future__ import annotations

import io
import math
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Self, cast

from vlpref.chat import ChatRequest, ChatResult, ImagePart, Sample, TextPart
from vlpref.config import ModelEntry, RunConfig
from vlpref.journal import Journal
from vlpref.keys import request_fingerprint
from vlpref.providers.base import Provider
from vlpref.runner import BatchStats
from vlpref.service import Batch, ModelService

PLANNED = "⟪planned⟫"
"""Marks placeholder text: a request holding it depends on answers not known yet."""

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4
DEFAULT_COMPLETION_TOKENS = 256
VLLM_IMAGE_TOKENS = 576


def text_tokens(text: str) -> int:
    """Estimated tokens of a text (module docstring)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def openai_image_tokens(width: int, height: int) -> int:
    """OpenAI's documented high-detail rule: fit in 2048 x 2048, shorter side to 768, then 85 +
    170 per 512 px tile."""
    if width <= 0 or height <= 0:
        return 85
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)


def image_size(part: ImagePart) -> tuple[int, int]:
    """The image's pixel size from its header (0 x 0 for a URL image or unreadable bytes)."""
    if part.data is None:
        return 0, 0
    from PIL import Image

    try:
        with Image.open(io.BytesIO(part.data)) as img:
            return img.size
    except Exception:  # the stage that built the request decoded it; a plan never fails on it
        return 0, 0


def image_tokens(part: ImagePart, kind: str, override: int | None) -> int:
    """Estimated prompt tokens of one image for a model (module docstring)."""
    if override is not None:
        return override
    if kind in ("vllm", "vllm-server"):
        return VLLM_IMAGE_TOKENS
    return openai_image_tokens(*image_size(part))


def prompt_tokens(request: ChatRequest, kind: str, image_override: int | None) -> int:
    total = 0
    for message in request.messages:
        total += MESSAGE_OVERHEAD_TOKENS
        for part in message.content:
            if isinstance(part, TextPart):
                total += text_tokens(part.text)
            elif isinstance(part, ImagePart):
                total += image_tokens(part, kind, image_override)
    return total


def depends_on_plan(request: ChatRequest) -> bool:
    """Whether the request holds placeholder text (it exists only if earlier answers do)."""
    return any(
        isinstance(part, TextPart) and PLANNED in part.text
        for message in request.messages
        for part in message.content
    )


def placeholder(request: ChatRequest, stage: str) -> str:
    """An answer that lets the stages after this one go on (and be counted). Judge calls get a
    verdict each protocol reads; every other stage gets text unique to the request, so that
    placeholder questions and responses are never deduplicated or paired as identical."""
    tag = f"{PLANNED} {request_fingerprint('plan', request)[:12]}"
    if stage == "questions":
        # Valid as a caption and as the question set (every key the stage may ask for).
        keys = ("easy_question", "hard_question", "hard_statement")
        body = ", ".join(f'"{k}": "{tag} {k}"' for k in keys)
        return "{" + body + "}"
    if stage == "judge":
        kind = request.id.split("\x1f", 1)[0]
        if kind == "pairwise":
            return f"A\nRationale: {tag}"
        if kind == "rating":
            return f"{tag}"  # unparseable on purpose: its score is not known
        return f"safe\nRationale: {tag}"
    return tag


@dataclass
class Line:
    """One row of a plan: a stage of a branch, for one model."""

    stage: str
    branch: str
    model: str  # the config entry's name
    from_journal: int = 0
    to_send: int = 0  # exact
    bound: int = 0  # depends on answers not known yet: an upper bound
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reused: bool = False  # the stage's output exists for its key: nothing to ask at all

    def add(self, other: Line) -> None:
        self.from_journal += other.from_journal
        self.to_send += other.to_send
        self.bound += other.bound
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens


@dataclass
class Recorder:
    """What the planning providers saw, by (stage, branch, model entry name)."""

    entries: Mapping[str, ModelEntry]  # entry name -> entry: the models the stage asks
    stage: str = ""
    branch: str = ""
    lines: dict[tuple[str, str, str], Line] = field(default_factory=dict)
    # (stage, model id) -> completion tokens of journaled answers: the completion estimate
    answered: dict[tuple[str, str], list[int]] = field(default_factory=lambda: defaultdict(list))
    pending: list[tuple[Line, ChatRequest]] = field(default_factory=list)
    placeheld: set[str] = field(default_factory=set)  # fingerprints answered by placeholders
    # (stage, branch, name) -> planned judge calls by kind (`pointwise`, `pairwise:exact`,
    # `pairwise:bound`, `reasoning:...`, `reasoning_prior:...`): what flows/plan.py bounds.
    kinds: dict[tuple[str, str, str], Counter[str]] = field(
        default_factory=lambda: defaultdict(Counter)
    )

    def count_kind(self, line: Line, request: ChatRequest, bound: bool) -> None:
        if self.stage != "judge":
            return
        parts = request.id.split("\x1f")
        kind = parts[0]
        if kind == "prior" and parts[-1] == "reasoning":
            kind = "reasoning_prior"
        counter = self.kinds[(line.stage, line.branch, line.model)]
        if kind in ("pairwise", "reasoning", "reasoning_prior"):
            counter[f"{kind}:{'bound' if bound else 'exact'}"] += 1
        elif kind != "prior":
            counter["pointwise"] += 1

    def line(self, request: ChatRequest) -> Line:
        """The line of the model entry that asks `request`: named in the request id where the
        stage puts it there (responses: `<entry>\x1f...`; judge: `<kind>\x1f<judge>\x1f...`),
        else the entry serving its model id (two entries may serve one model id)."""
        name = self.entry_name(request)
        key = (self.stage, self.branch, name)
        if key not in self.lines:
            self.lines[key] = Line(self.stage, self.branch, name)
        return self.lines[key]

    def entry_name(self, request: ChatRequest) -> str:
        for candidate in request.id.split("\x1f")[:2]:
            if candidate in self.entries:
                return candidate
        serving = [e.name for e in self.entries.values() if e.model == request.model]
        return serving[0] if serving else request.model

    def completion_estimate(self, request: ChatRequest) -> int:
        seen = self.answered.get((self.stage, request.model))
        if seen:
            return math.ceil(sum(seen) / len(seen)) * request.params.n
        return (request.params.max_tokens or DEFAULT_COMPLETION_TOKENS) * request.params.n


class PlanProvider(Provider):
    """Sends nothing: records each request and answers it with a placeholder. It has its real
    provider's identity, so the journal answers exactly what it would answer in a run."""

    kind = "plan"

    def __init__(self, identity: str, endpoint_kind: str, recorder: Recorder) -> None:
        self._identity = identity
        self.endpoint_kind = endpoint_kind
        self.recorder = recorder

    @property
    def identity(self) -> str:
        return self._identity

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> Self:
        raise NotImplementedError("built by the planning service only")

    async def complete(self, requests: Iterable[ChatRequest]) -> AsyncIterator[ChatResult]:
        rec = self.recorder
        for request in requests:
            line = rec.line(request)
            entry = rec.entries.get(line.model)
            override = entry.image_tokens if entry is not None else None
            bound = depends_on_plan(request)
            if bound:
                line.bound += 1
            else:
                line.to_send += 1
            rec.count_kind(line, request, bound)
            line.prompt_tokens += prompt_tokens(request, self.endpoint_kind, override)
            rec.pending.append((line, request))  # completion estimated once the stage is done
            rec.placeheld.add(request_fingerprint(self.identity, request))
            text = placeholder(request, rec.stage)
            # Each sample its own text: n placeholder samples are n distinct answers downstream.
            samples = tuple(Sample(i, f"{text} #{i}", "stop") for i in range(request.params.n))
            yield ChatResult(request, samples=samples)


class PlanningService(ModelService):
    """A model service that never sends (module docstring). Not journaled: `run` passes no
    journal writes through, since placeholder answers must never be recorded as answers."""

    applies_budget = False

    def __init__(self, config: RunConfig, recorder: Recorder) -> None:
        super().__init__()
        self.config = config
        self.recorder = recorder
        self._plan_providers: dict[int, PlanProvider] = {}

    def provider(
        self, options: Mapping[str, Any], *, early_stop_after: int | None = None
    ) -> Provider:
        kind = str(options.get("kind", "openai"))
        real = super().provider(options)  # its identity keys the journal; it never sends here
        key = id(real)
        if key not in self._plan_providers:
            self._plan_providers[key] = PlanProvider(real.identity, kind, self.recorder)
        return self._plan_providers[key]

    def run(
        self,
        batches: Iterable[Batch | tuple[Provider, Iterable[ChatRequest]]],
        journal: Any,
        stats: BatchStats | None = None,
        *,
        chunk_size: int = 2048,
        early_stop_after: int | None = None,
    ) -> Iterator[ChatResult]:
        # A read-only view of the journal: the runner appends what providers answer, and a
        # placeholder must never become an answer on disk.
        view = cast(Journal, _ReadOnlyJournal(journal)) if journal is not None else None
        identity: dict[int, str] = {}  # id(request) -> its provider's identity

        def noted(provider: Provider, requests: Iterable[ChatRequest]) -> Iterator[ChatRequest]:
            for request in requests:
                identity[id(request)] = provider.identity
                yield request

        wrapped = [
            Batch(b.provider, noted(b.provider, b.requests), b.check)
            if isinstance(b, Batch)
            else Batch(b[0], noted(b[0], b[1]))
            for b in batches
        ]
        for result in super().run(wrapped, view, stats, chunk_size=chunk_size, early_stop_after=0):
            request = result.request
            fingerprint = request_fingerprint(identity.pop(id(request), ""), request)
            # Cached and not a repeat of a planned request (which the same call answers): the
            # journal holds it.
            if result.cached and fingerprint not in self.recorder.placeheld:
                line = self.recorder.line(request)
                line.from_journal += 1
                for sample in result.samples:
                    if sample.usage is not None:
                        key = (self.recorder.stage, request.model)
                        self.recorder.answered[key].append(sample.usage.completion_tokens)
            yield result


class _ReadOnlyJournal:
    """A journal that answers lookups and drops appends."""

    def __init__(self, journal: Any) -> None:
        self._journal = journal

    def __getattr__(self, name: str) -> Any:
        return getattr(self._journal, name)

    def __contains__(self, key: object) -> bool:
        return key in self._journal

    def append(self, entries: Iterable[Any]) -> None:
        for _ in entries:  # consume, write nothing
            pass


def settle(recorder: Recorder) -> None:
    """Add the completion estimates of the requests planned so far (after their stage ran, when
    the stage's journaled answers have been seen)."""
    for line, request in recorder.pending:
        line.completion_tokens += recorder.completion_estimate(request)
    recorder.pending.clear()


def cost(line: Line, entry: ModelEntry | None) -> float | None:
    """The cost of a line's tokens to send (exact and bound), or None without a price."""
    if entry is None or entry.price is None:
        return None
    return entry.price.cost(line.prompt_tokens, line.completion_tokens)
