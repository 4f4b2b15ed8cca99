"""The generation source: a branch's images made by an OpenAI-compatible image endpoint
(`POST /v1/images/generations`, which hosted APIs and local diffusion servers speak), through the
model seam: the request journal (a rerun pays nothing), retries with backoff and Retry-After, the
endpoint's concurrency and rate limits, early stop, and the run's budget.

**Prompts.** Image i of a branch (i = 0 .. per_branch - 1) is asked with the template `template`
(`<prompts_dir>/<template>.txt`, vlpref/prompts.py) rendered for subject i: the key phrase and
the keywords (each once) taking turns. A template may use `$subject`, `$key_phrase`,
`$keywords`, `$class1`, `$class2`, `$class3`, `$class_path` and `$variant` (i + 1); using any
other field is a `ConfigError` that lists these.

**Request and journal key (the one scheme here).** The seam speaks `ChatRequest`s, and the
journal keys them by (provider identity, model, sampling params, messages, prompt version,
sample index), vlpref/keys.py. An image request (`ImageGenRequest`) is carried as a
`ChatRequest` with two messages: a system message `IMAGE_REQUEST_TAG` + the request's options
as canonical JSON (`size`, `quality`, `style`, `seed`, `variant`, `extra_body`) and a user
message with the prompt; `prompt_version` is the template's version. Nothing of it is sent as
chat: `OpenAIImagesProvider` turns it back into an images body. So everything that changes the
image is in the key, the variant number keeps two images of one prompt apart, and the identity
`openai-images` (`openai-images:<cache_namespace>`) keeps image keys apart from the chat keys of
the same endpoint. What is journaled for a sample is the answer's `data[0]` as compact JSON
(`b64_json`, and `revised_prompt` when the endpoint rewrote the prompt), so the journal holds
the image itself (base64, about 1.33 x its size): a rerun reads it back and sends nothing.

**Endpoint.** `endpoint` names an entry of `endpoints:` of kind `openai`: its base URL, key,
timeouts, retries and `cache_namespace` apply. Image requests get a provider of their own,
paced apart from the endpoint's chat requests (OpenAI counts images per minute, not tokens):
the endpoint's `concurrency` and `rpm` unless the source sets its own. Batch mode does not
apply (online only). The body: `model`, `prompt`, `n: 1`, `size`, `response_format: b64_json`
(left out for `gpt-image-*` models, which always answer base64 and reject the field),
`quality`, `style` and `seed` when set, then `extra_body`.

**Budget.** A request is counted against `budget.requests` and `budget.per_model[<name>]`
(`name` of the source, default `image-generator`); its `usage` (gpt-image models report input
and output tokens) counts as prompt and completion tokens. No price is known for images: the
cost limit does not see them.

**Plan.** `vlpref plan` counts image requests like any other (to send / from the journal) and
goes on with a small placeholder image per request, unique to it, so the stages after it are
planned too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import openai
from PIL import Image

from vlpref.chat import ChatRequest, Message, Sample, Usage
from vlpref.config import GenerateSource, RunConfig
from vlpref.errors import ConfigError
from vlpref.images.normalize import ImageRejected
from vlpref.images.sources import SourceItem, SourceListing
from vlpref.keys import canonical_json
from vlpref.prompts import Prompt, load_prompt
from vlpref.providers.base import Provider
from vlpref.providers.openai_compat import (
    OpenAICompatOptions,
    OpenAICompatProvider,
    _FinalError,
    _RetryableError,
)
from vlpref.runner import BatchStats
from vlpref.service import Batch, ModelService
from vlpref.taxonomy import Subcategory

__all__ = [
    "IMAGES_PATH",
    "IMAGE_REQUEST_TAG",
    "TEMPLATE_FIELDS",
    "GeneratedItem",
    "ImageGenRequest",
    "OpenAIImagesProvider",
    "image_body",
    "list_generated",
    "parse_image_answer",
    "prompts_for",
]

IMAGES_PATH = "/images/generations"
IMAGE_REQUEST_TAG = "vlpref image request "
TEMPLATE_FIELDS = (
    "subject",
    "key_phrase",
    "keywords",
    "class1",
    "class2",
    "class3",
    "class_path",
    "variant",
)
_PLACEHOLDER_SIDE = 64


# --------------------------------------------------------------------------- the request


@dataclass(frozen=True)
class ImageGenRequest:
    """One image asked of an image endpoint (module docstring: how it is keyed)."""

    id: str
    model: str
    prompt: str
    size: str = "1024x1024"
    quality: str | None = None
    style: str | None = None
    seed: int | None = None
    variant: int = 0
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    prompt_version: str = ""

    def options(self) -> dict[str, Any]:
        """What besides the model and prompt changes the image (unset fields left out)."""
        out: dict[str, Any] = {"size": self.size, "variant": self.variant}
        for name in ("quality", "style", "seed"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.extra_body:
            out["extra_body"] = dict(self.extra_body)
        return out

    def to_chat(self) -> ChatRequest:
        system = Message.system(IMAGE_REQUEST_TAG + canonical_json(self.options()))
        return ChatRequest(
            id=self.id,
            model=self.model,
            messages=(system, Message.user(self.prompt)),
            prompt_version=self.prompt_version,
        )

    @classmethod
    def from_chat(cls, request: ChatRequest) -> ImageGenRequest:
        """The image request a `to_chat` request carries; ValueError for any other request."""
        if len(request.messages) != 2 or not request.messages[0].text.startswith(IMAGE_REQUEST_TAG):
            raise ValueError("not an image request (an images endpoint takes no chat)")
        options = json.loads(request.messages[0].text[len(IMAGE_REQUEST_TAG) :])
        return cls(
            id=request.id,
            model=request.model,
            prompt=request.messages[1].text,
            size=options["size"],
            quality=options.get("quality"),
            style=options.get("style"),
            seed=options.get("seed"),
            variant=options["variant"],
            extra_body=options.get("extra_body", {}),
            prompt_version=request.prompt_version,
        )


def image_body(request: ImageGenRequest) -> dict[str, Any]:
    """The JSON body of `POST /images/generations` for one image."""
    body: dict[str, Any] = {"model": request.model, "prompt": request.prompt, "n": 1}
    if request.size != "auto" or not request.model.startswith("gpt-image"):
        body["size"] = request.size
    if not request.model.startswith("gpt-image"):
        body["response_format"] = "b64_json"
    for name in ("quality", "style", "seed"):
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    body.update(request.extra_body)  # as the SDK's extra_body: top level, wins
    return body


def parse_image_answer(content: bytes) -> tuple[tuple[Sample, ...], Usage]:
    """An images answer as one sample whose text is `data[0]` as compact JSON. A body that is
    not an images answer is retried (`malformed`); one without base64 data is not (`url`
    answers mean the endpoint ignored `response_format`, and would again)."""
    try:
        data = json.loads(content)
        first = data["data"][0]
        if not isinstance(first, dict):
            raise TypeError("data[0] is not an object")
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise _RetryableError("malformed", f"not an images answer ({exc})", 200, None) from exc
    encoded = first.get("b64_json")
    if not isinstance(encoded, str) or not encoded:
        raise _FinalError(
            "bad_request", "the answer has no b64_json (it must be asked for base64 data)", 200
        )
    kept = {"b64_json": encoded}
    if isinstance(first.get("revised_prompt"), str):
        kept["revised_prompt"] = first["revised_prompt"]
    usage = data.get("usage") if isinstance(data, dict) else None
    usage = usage if isinstance(usage, dict) else {}
    prompt = int(usage.get("input_tokens") or usage.get("prompt_tokens") or 0)
    completion = int(usage.get("output_tokens") or usage.get("completion_tokens") or 0)
    sample = Sample(0, json.dumps(kept, separators=(",", ":")), "stop")
    return (sample,), Usage(prompt, completion)


# --------------------------------------------------------------------------- the provider


class OpenAIImagesProvider(OpenAICompatProvider):
    """`OpenAICompatProvider` with the images endpoint as its call: the same client, retries,
    Retry-After, rate limiter, concurrency, failure kinds and redaction; only the URL, the body
    and the parsing differ. Not a configurable kind: the generation source builds it from a
    `kind: openai` endpoint entry."""

    kind = "openai-images"

    @property
    def identity(self) -> str:
        namespace = self.options.cache_namespace
        return f"openai-images:{namespace}" if namespace else "openai-images"

    async def _get_client(self) -> openai.AsyncOpenAI:
        client = await super()._get_client()
        self._chat_url = f"{client.base_url}{IMAGES_PATH.lstrip('/')}"
        return client

    def _request_body(self, request: ChatRequest) -> bytes:
        return json.dumps(image_body(ImageGenRequest.from_chat(request))).encode()

    def _parse_answer(self, content: bytes) -> tuple[tuple[Sample, ...], Usage]:
        # The parent's send (its client, error handling and rate-limit feedback), this parser.
        return parse_image_answer(content)


def images_provider(
    service: ModelService, endpoint: Mapping[str, Any], source: GenerateSource
) -> OpenAIImagesProvider:
    """The service's image provider for an endpoint entry (one per endpoint and pacing)."""
    if str(endpoint.get("kind", "openai")) != "openai":
        raise ConfigError(
            f"the generate source's endpoint {source.endpoint!r} is of kind "
            f"{endpoint.get('kind')!r}: images are asked of an OpenAI-compatible (kind: openai) "
            "endpoint",
            field="stages.images.source.endpoint",
        )
    options = OpenAICompatOptions.model_validate(dict(endpoint))
    update: dict[str, Any] = {"mode": "online"}
    if source.concurrency is not None:
        update["concurrency"] = source.concurrency
    if source.rpm is not None:
        update["rpm"] = source.rpm
    options = options.model_copy(update=update)
    key = "openai-images\x1f" + canonical_json(options.model_dump(mode="json"))
    # Kept among the service's own providers: they live on its event loop, and the service
    # closes them with the rest. The registry has no image kind to build it from.
    with service._lock:
        held = service._providers.get(key)
        if held is None:
            held = service._providers[key] = OpenAIImagesProvider(options)
    return cast(OpenAIImagesProvider, held)


# --------------------------------------------------------------------------- the listing


@dataclass(frozen=True)
class GeneratedItem(SourceItem):
    """A source item whose bytes came with it (`data`), or the failure that replaced them."""

    data: bytes = b""
    failure: ImageRejected | None = None


def _subjects(leaf: Subcategory) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for term in (leaf.key_phrase, *leaf.keywords):
        term = term.strip()
        if term and term.casefold() not in seen:
            seen.add(term.casefold())
            out.append(term)
    return out or [leaf.class3]


def prompts_for(leaf: Subcategory, prompt: Prompt, count: int) -> list[tuple[str, str]]:
    """(subject, prompt text) of images 0 .. count - 1 of a branch."""
    unknown = sorted(prompt.fields - set(TEMPLATE_FIELDS))
    if unknown:
        raise ConfigError(
            f"template fields {unknown} are not known; an image prompt may use "
            f"{', '.join('$' + f for f in TEMPLATE_FIELDS)}",
            file=prompt.file,
        )
    subjects = _subjects(leaf)
    out: list[tuple[str, str]] = []
    for i in range(count):
        subject = subjects[i % len(subjects)]
        values = {
            "subject": subject,
            "key_phrase": leaf.key_phrase,
            "keywords": ", ".join(leaf.keywords),
            "class1": leaf.class1,
            "class2": leaf.class2,
            "class3": leaf.class3,
            "class_path": leaf.path,
            "variant": str(i + 1),
        }
        out.append((subject, prompt.render(**{k: values[k] for k in prompt.fields})))
    return out


def image_requests(
    leaf: Subcategory, source: GenerateSource, prompts_dir: str | None
) -> tuple[Prompt, list[tuple[str, ImageGenRequest]]]:
    """The template and the branch's requests, each with its subject."""
    prompt = load_prompt(source.template, prompts_dir)
    requests = [
        (
            subject,
            ImageGenRequest(
                id=f"{leaf.branch_id}:generate:{i}",
                model=source.model,
                prompt=text,
                size=source.size,
                quality=source.quality,
                style=source.style,
                seed=None if source.seed is None else source.seed + i,
                variant=i,
                extra_body=source.extra_body,
                prompt_version=prompt.version,
            ),
        )
        for i, (subject, text) in enumerate(prompts_for(leaf, prompt, source.per_branch))
    ]
    return prompt, requests


def list_generated(
    source: GenerateSource,
    leaf: Subcategory,
    run: RunConfig,
    service: ModelService | None = None,
) -> tuple[SourceListing, BatchStats]:
    """Ask (or read from the journal) the branch's images; every item carries its bytes or the
    failure that replaced them. `service`: the process's model service by default."""
    from vlpref.budget import guard_for
    from vlpref.planning import PlanningService, PlanProvider
    from vlpref.workspace import Workspace

    if source.endpoint not in run.endpoints:
        known = ", ".join(sorted(run.endpoints))
        raise ConfigError(
            f"the generate source names endpoint {source.endpoint!r}, which `endpoints:` does "
            f"not have (it has: {known})",
            field="stages.images.source.endpoint",
        )
    service = service or ModelService.shared()
    prompt, asked = image_requests(leaf, source, run.prompts_dir)
    real = images_provider(service, run.endpoints[source.endpoint], source)
    provider: Provider = real
    planning = isinstance(service, PlanningService)
    if planning:
        # Never sends: counts the request and answers a placeholder (vlpref/planning.py).
        provider = PlanProvider(real.identity, "openai", cast(PlanningService, service).recorder)
    else:
        guard = guard_for(run) if service.applies_budget else None
        if guard is not None:
            provider = guard.wrap(real, source.name)
    chats = [request.to_chat() for _, request in asked]
    stats = BatchStats()
    results = {}
    with Workspace(run.workspace).journal("images", leaf.branch_id) as journal:
        for result in service.run([Batch(provider, chats)], journal, stats):
            results[result.request.id] = result
    listing = SourceListing()
    for subject, request in asked:
        result = results[request.id]
        meta: dict[str, Any] = {
            "generator": source.name,
            "model": source.model,
            "prompt": request.prompt,
            "subject": subject,
            "template": source.template,
            "prompt_version": prompt.version,
            "variant": request.variant,
            **{k: v for k, v in request.options().items() if k not in ("variant", "extra_body")},
        }
        item_id = f"generate:{request.variant}"
        if result.failure is not None:
            failure = ImageRejected(
                result.failure.kind, result.failure.message, attempts=result.failure.attempts
            )
            listing.items.append(GeneratedItem(item_id, "generate", meta, failure=failure))
            continue
        text = result.samples[0].text
        try:
            answer = json.loads(text)
            data = base64.b64decode(answer["b64_json"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            if planning and not result.cached:
                data = _placeholder(text)
                meta["planned"] = True
            else:
                failure = ImageRejected(
                    "corrupt", f"{item_id}: the answer's b64_json is not base64"
                )
                listing.items.append(GeneratedItem(item_id, "generate", meta, failure=failure))
                continue
        else:
            if "revised_prompt" in answer:
                meta["revised_prompt"] = answer["revised_prompt"]
        listing.items.append(GeneratedItem(item_id, "generate", meta, data=data))
    if stats.sent:
        listing.notes.append(
            f"generate: {stats.sent} image request(s) sent, {stats.cached} from the journal"
        )
    return listing, stats


def _placeholder(tag: str) -> bytes:
    """A small PNG unique to a planned request (its pixels are a hash of the placeholder)."""
    pixels = hashlib.shake_256(tag.encode()).digest(8 * 8 * 3)
    image = Image.frombytes("RGB", (8, 8), pixels).resize(
        (_PLACEHOLDER_SIDE, _PLACEHOLDER_SIDE), Image.Resampling.NEAREST
    )
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
