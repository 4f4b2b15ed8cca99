"""vLLM's offline engine (`vllm.LLM`) in this process: `kind: vllm`.

    endpoints:
      qwen-local:
        kind: vllm
        model: Qwen/Qwen2-VL-7B-Instruct      # a hub id or a local directory
        max_model_len: 8192
        gpu_memory_utilization: 0.9
        limit_mm_per_prompt: {image: 1}
    models:
      - {name: qwen2-vl-7b, endpoint: qwen-local, model: Qwen/Qwen2-VL-7B-Instruct}

How it runs:

- vLLM is imported, and the engine built, only when the first batch arrives; importing this
  module costs nothing and needs no vLLM. Without vLLM a clear `ProviderError` names the
  `vllm` extra.
- Every engine call of the process runs on one *device thread*, so the event loop never blocks
  and two engines never compete for the device. Concurrent batches (several branches, several
  models) are queued there and merged into `LLM.chat` calls of up to `batch_size` requests:
  vLLM batches them on the device, and results are handed back (and journaled) chunk by chunk.
- Several offline models, one GPU: when the device thread turns to another `kind: vllm`
  endpoint's work, the idle engine is released first (deleted, garbage-collected, CUDA cache
  emptied, vLLM's distributed state torn down) unless it says `keep_resident: true` (several
  models per GPU, each with a `gpu_memory_utilization` fraction). The current engine finishes
  everything queued for it before the device switches, so models take turns rather than thrash.
  `aclose()` releases the engine too.
- A request whose processing raises (a bad image, a prompt over `max_model_len`) becomes a
  `Failure(kind="engine")`; the rest of its chunk is answered one by one, so nothing is dropped.
  If the engine itself dies, its chunk fails the same way and the next chunk starts a new engine.
- A request's output `constraint` becomes `SamplingParams(structured_outputs=
  StructuredOutputsParams(json=SCHEMA))` or `(choice=[...])` (vLLM 0.32's
  `vllm/sampling_params.py`; `GuidedDecodingParams` and `guided_decoding=` are gone there). A
  schema vLLM cannot compile fails that request alone, as `Failure(kind="engine")`.

Logprobs under a constraint: vLLM applies the grammar's bitmask to the logits before its sampler
computes logprobs, in either `logprobs_mode` (`raw_logprobs`, the default, or `processed_*`, set
through `extra_engine_args`), so a constrained answer's logprobs are over the tokens the grammar
allows at each step, renormalised among them: the chosen token and its top-k alternatives, where a
forbidden token (logprob -inf) appears only when fewer than k tokens are allowed. Such a -inf is
reported as -9999.0, as vLLM's server does, so both kinds journal the same numbers. A choice's
first token is a prefix of one choice (`safe`, or `un` of `unsafe`); a rating digit inside the JSON
is its own token. Ratios between allowed tokens are the unconstrained model's, so the judge's
renormalised probabilities are unchanged by the mask.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import importlib
import io
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vlpref.chat import (
    ChatRequest,
    ChatResult,
    Failure,
    Message,
    OutputConstraint,
    Sample,
    TextPart,
    TokenLogprob,
    Usage,
)
from vlpref.errors import ProviderError
from vlpref.providers.base import Provider
from vlpref.redact import redact

logger = logging.getLogger(__name__)

# What vLLM's server reports for a logprob of -inf (a token the grammar forbids); ours too.
LOGPROB_FLOOR = -9999.0

INSTALL_HINT = "install the vllm extra: pip install 'vlpref[vllm]' (see docs/vllm.md)"

# Engine arguments that have a named option: `extra_engine_args` may not set them a second time.
_NAMED_ENGINE_ARGS = frozenset(
    {
        "model",
        "dtype",
        "max_model_len",
        "gpu_memory_utilization",
        "tensor_parallel_size",
        "enforce_eager",
        "limit_mm_per_prompt",
        "trust_remote_code",
        "seed",
        "served_model_name",
    }
)


class VllmOptions(BaseModel):
    """The endpoint entry of a run config for `kind: vllm` (vLLM's offline engine)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["vllm"] = "vllm"
    model: str = Field(min_length=1, description="hub id or local directory of the model")
    served_model_name: str | None = Field(
        default=None, description="the id requests name (models[].model); `model` by default"
    )
    dtype: str = "auto"
    max_model_len: int | None = Field(default=None, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    enforce_eager: bool = False
    limit_mm_per_prompt: dict[str, int] | None = None
    trust_remote_code: bool = False
    seed: int = 0
    cache_namespace: str = ""
    batch_size: int = Field(
        default=256, ge=1, description="requests per LLM.chat call; results arrive per call"
    )
    keep_resident: bool = Field(
        default=False,
        description="keep the engine loaded while another vllm endpoint runs (needs memory "
        "fractions that fit together)",
    )
    extra_engine_args: dict[str, Any] = Field(
        default_factory=dict, description="more keyword arguments for vllm.LLM(...)"
    )

    @field_validator("extra_engine_args")
    @classmethod
    def _no_duplicates(cls, value: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(set(value) & _NAMED_ENGINE_ARGS)
        if clash:
            raise ValueError(f"{clash[0]!r} has its own option; set it there, not here")
        return value

    @property
    def name(self) -> str:
        return self.served_model_name or self.model

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `vllm.LLM(...)`."""
        kwargs: dict[str, Any] = {
            "model": self.model,
            "dtype": self.dtype,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "tensor_parallel_size": self.tensor_parallel_size,
            "enforce_eager": self.enforce_eager,
            "trust_remote_code": self.trust_remote_code,
            "seed": self.seed,
        }
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        if self.limit_mm_per_prompt is not None:
            kwargs["limit_mm_per_prompt"] = dict(self.limit_mm_per_prompt)
        kwargs.update(self.extra_engine_args)
        return kwargs


def import_vllm() -> Any:
    """The `vllm` module, or a `ProviderError` that says how to install it."""
    try:
        return importlib.import_module("vllm")
    except ImportError as exc:
        raise ProviderError(
            f"kind 'vllm' needs vLLM, which cannot be imported ({exc}); {INSTALL_HINT}"
        ) from exc


# -- requests -> vLLM, vLLM -> results --------------------------------------------------------


def message_to_vllm(message: Message) -> dict[str, Any]:
    """One message in vLLM's chat format. Image bytes are decoded here and handed over as PIL
    images with their sha256 as the media uuid (vLLM then processes a repeated image once);
    URL images are fetched by vLLM."""
    if len(message.content) == 1 and isinstance(message.content[0], TextPart):
        return {"role": message.role, "content": message.content[0].text}
    parts: list[dict[str, Any]] = []
    for part in message.content:
        if isinstance(part, TextPart):
            parts.append({"type": "text", "text": part.text})
        elif part.data is not None:
            from PIL import Image

            image = Image.open(io.BytesIO(part.data))
            image.load()
            parts.append({"type": "image_pil", "image_pil": image, "uuid": part.sha256})
        else:
            parts.append({"type": "image_url", "image_url": {"url": part.as_url()}})
    return {"role": message.role, "content": parts}


def sampling_kwargs(request: ChatRequest, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """`vllm.SamplingParams` keyword arguments: the model's generation defaults (as vLLM's
    server applies them), overridden by what the request sets."""
    p = request.params
    kwargs: dict[str, Any] = {"max_tokens": None, **defaults}
    kwargs["n"] = p.n
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        value = getattr(p, name)
        if value is not None:
            kwargs[name] = value
    if p.stop:
        kwargs["stop"] = list(p.stop)
    # OpenAI semantics: logprobs=True gives the chosen token's logprob, top_logprobs=k adds the
    # k most likely alternatives. vLLM's `logprobs=k` returns the chosen token plus the top k.
    kwargs["logprobs"] = (p.top_logprobs or 0) if p.logprobs else None
    return kwargs


def structured_outputs_kwargs(constraint: OutputConstraint) -> dict[str, Any]:
    """Keyword arguments for vLLM's `StructuredOutputsParams` (`vllm/sampling_params.py`, 0.32):
    exactly one of `json` (the schema, a dict) or `choice` (the strings)."""
    if constraint.kind == "json_schema":
        return {"json": constraint.schema}
    return {"choice": list(constraint.choices)}


def sampling_params(vllm: Any, request: ChatRequest, defaults: Mapping[str, Any]) -> Any:
    """The request's `vllm.SamplingParams`, its constraint as `structured_outputs`."""
    kwargs = sampling_kwargs(request, defaults)
    if request.constraint is not None:
        params_class = vllm.sampling_params.StructuredOutputsParams
        kwargs["structured_outputs"] = params_class(**structured_outputs_kwargs(request.constraint))
    return vllm.SamplingParams(**kwargs)


def _logprob(entry: Any) -> float:
    return max(float(entry.logprob), LOGPROB_FLOOR)


def _token_text(token_id: int, entry: Any, tokenizer: Any) -> str:
    text = getattr(entry, "decoded_token", None) if entry is not None else None
    if text is None:
        text = tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"
    return str(text)


def map_logprobs(
    token_ids: Iterable[int], steps: Any, top_k: int, tokenizer: Any
) -> tuple[TokenLogprob, ...]:
    """vLLM's per-position `{token_id: Logprob}` -> chosen token + its `top_k` best alternatives
    (most likely first), as the OpenAI-compatible providers report them."""
    out: list[TokenLogprob] = []
    for position, token_id in enumerate(token_ids):
        step: Mapping[int, Any] = steps[position] or {}
        chosen = step.get(token_id)
        ranked = sorted(step.items(), key=lambda item: -float(item[1].logprob))[:top_k]
        out.append(
            TokenLogprob(
                token=_token_text(token_id, chosen, tokenizer),
                logprob=_logprob(chosen) if chosen is not None else float("nan"),
                top=tuple((_token_text(t, e, tokenizer), _logprob(e)) for t, e in ranked),
            )
        )
    return tuple(out)


def map_output(request: ChatRequest, output: Any, tokenizer: Any, latency_s: float) -> ChatResult:
    """One `vllm.RequestOutput` -> a `ChatResult` (samples in choice order, usage, logprobs)."""
    samples: list[Sample] = []
    completion_tokens = 0
    for choice in sorted(output.outputs, key=lambda c: int(c.index)):
        token_ids = list(choice.token_ids)
        completion_tokens += len(token_ids)
        logprobs = None
        if request.params.logprobs and choice.logprobs is not None:
            logprobs = map_logprobs(
                token_ids, choice.logprobs, request.params.top_logprobs or 0, tokenizer
            )
        samples.append(
            Sample(
                index=int(choice.index),
                text=str(choice.text),
                finish_reason=str(choice.finish_reason or "unknown"),
                logprobs=logprobs,
                completion_tokens=len(token_ids),
            )
        )
    usage = Usage(len(output.prompt_token_ids or ()), completion_tokens)
    if not samples:
        return ChatResult(
            request,
            failure=Failure("engine", "vLLM returned no completion"),
            latency_s=latency_s,
            attempts=1,
        )
    return ChatResult(request, samples=tuple(samples), usage=usage, latency_s=latency_s, attempts=1)


def _engine_failure(request: ChatRequest, exc: BaseException, latency_s: float) -> ChatResult:
    """An engine's exception as a failure; its message may quote anything (a hub token in a
    download error): redacted (`vlpref.redact`), like every provider failure."""
    message = redact(f"{type(exc).__name__}: {exc}")[:500]
    return ChatResult(request, failure=Failure("engine", message), latency_s=latency_s, attempts=1)


# -- the device thread ------------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    request: ChatRequest
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[ChatResult]
    seq: int

    def resolve(self, result: ChatResult | BaseException) -> None:
        def settle() -> None:
            if self.future.done():
                return
            if isinstance(result, BaseException):
                self.future.set_exception(result)
            else:
                self.future.set_result(result)

        with contextlib.suppress(RuntimeError):  # the caller's loop is gone: nobody waits
            self.loop.call_soon_threadsafe(settle)


@dataclass(eq=False)
class _Control:
    """A request to release `provider`'s engine on the device thread, and its outcome."""

    provider: VllmProvider
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class _Device:
    """The one thread of this process that touches vLLM engines."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queues: dict[VllmProvider, collections.deque[_Job]] = {}
        self._controls: collections.deque[_Control] = collections.deque()
        self._seq = itertools.count()
        self._current: VllmProvider | None = None
        self._thread: threading.Thread | None = None

    def submit(
        self, provider: VllmProvider, requests: list[ChatRequest], loop: asyncio.AbstractEventLoop
    ) -> list[_Job]:
        with self._cond:
            queue = self._queues.setdefault(provider, collections.deque())
            jobs = [_Job(r, loop, loop.create_future(), next(self._seq)) for r in requests]
            queue.extend(jobs)
            self._ensure_thread()
            self._cond.notify()
        return jobs

    def withdraw(self, provider: VllmProvider, jobs: Iterable[_Job]) -> None:
        """Forget queued jobs nobody waits for any more (the caller stopped iterating)."""
        drop = set(jobs)
        with self._cond:
            queue = self._queues.get(provider)
            if queue:
                kept = [j for j in queue if j not in drop]
                queue.clear()
                queue.extend(kept)

    def release(self, provider: VllmProvider) -> None:
        """Release `provider`'s engine on the device thread; block until done."""
        control = _Control(provider)
        with self._cond:
            for job in self._queues.pop(provider, ()):
                job.resolve(ProviderError("the vllm provider was closed"))
            if self._current is provider:
                self._current = None
            if self._thread is None or not self._thread.is_alive():
                control.done.set()  # no thread: no engine was ever built on it
            else:
                self._controls.append(control)
                self._cond.notify()
        control.done.wait()
        if control.error is not None:
            raise control.error

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="vlpref-vllm", daemon=True)
            self._thread.start()

    def _next_chunk(self) -> tuple[VllmProvider, list[_Job]] | _Control:
        with self._cond:
            while True:
                if self._controls:
                    return self._controls.popleft()
                ready = {p: q for p, q in self._queues.items() if q}
                if ready:
                    break
                self._cond.wait()
            # Stay on the resident engine while it has work; then the oldest waiting request.
            if self._current in ready:
                provider = self._current
            else:
                provider = min(ready, key=lambda p: ready[p][0].seq)
            queue = ready[provider]
            size = provider.options.batch_size
            chunk = [queue.popleft() for _ in range(min(size, len(queue)))]
            for idle in [p for p, q in self._queues.items() if not q]:
                del self._queues[idle]  # holds no provider that has nothing queued
            self._current = provider
            return provider, chunk

    def _run(self) -> None:
        resident: list[VllmProvider] = []
        while True:
            item = self._next_chunk()
            if isinstance(item, _Control):
                try:
                    item.provider._release_engine()
                except BaseException as exc:
                    item.error = exc
                finally:
                    if item.provider in resident:
                        resident.remove(item.provider)
                    item.done.set()
                continue
            provider, chunk = item
            for other in list(resident):
                if other is not provider and not other.options.keep_resident:
                    try:
                        other._release_engine()
                    except Exception:
                        logger.exception("releasing the vLLM engine of %s", other.options.model)
                    resident.remove(other)
            try:
                results = provider._run_chunk([job.request for job in chunk])
                for job, result in zip(chunk, results, strict=True):
                    job.resolve(result)
            except BaseException as exc:  # the engine cannot start: a provider-level error
                for job in chunk:
                    job.resolve(exc)
            if provider._llm is not None and provider not in resident:
                resident.append(provider)


_DEVICE = _Device()


# -- the provider -----------------------------------------------------------------------------


class VllmProvider(Provider):
    """Chat requests answered by a `vllm.LLM` engine in this process."""

    kind = "vllm"

    def __init__(self, options: VllmOptions) -> None:
        self.options = options
        self._llm: Any = None
        self._defaults: dict[str, Any] = {}
        self._start_error: ProviderError | None = None
        self.engine_starts = 0  # how many times an engine was built (tests, logs)

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> None:
        VllmOptions.model_validate(dict(options))

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> Self:
        return cls(VllmOptions.model_validate(dict(options)))

    @property
    def identity(self) -> str:
        return f"vllm:{self.options.cache_namespace}" if self.options.cache_namespace else "vllm"

    @property
    def engine_loaded(self) -> bool:
        return self._llm is not None

    # -- the seam ------------------------------------------------------------------------------

    async def complete(self, requests: Iterable[ChatRequest]) -> AsyncIterator[ChatResult]:
        batch = list(requests)
        if not batch:
            return
        jobs = _DEVICE.submit(self, batch, asyncio.get_running_loop())
        waiting = {job.future: job for job in jobs}
        try:
            while waiting:
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    del waiting[future]
                    yield future.result()  # raises a ProviderError if the engine cannot start
        finally:
            if waiting:
                _DEVICE.withdraw(self, waiting.values())
                for future in waiting:
                    future.cancel()

    async def aclose(self) -> None:
        """Release the engine (and its GPU memory); a later batch starts a new one."""
        await asyncio.to_thread(_DEVICE.release, self)

    # -- on the device thread ------------------------------------------------------------------

    def _ensure_engine(self) -> Any:
        if self._llm is not None:
            return self._llm
        if self._start_error is not None:
            raise self._start_error
        vllm = import_vllm()
        try:
            llm = vllm.LLM(**self.options.engine_kwargs())
        except Exception as exc:
            self._start_error = ProviderError(
                f"vLLM engine for {self.options.model!r} did not start: {type(exc).__name__}: {exc}"
            )
            raise self._start_error from exc
        self._llm = llm
        self.engine_starts += 1
        try:
            self._defaults = dict(llm.model_config.get_diff_sampling_param() or {})
        except Exception:
            self._defaults = {}
        return llm

    def _run_chunk(self, requests: list[ChatRequest]) -> list[ChatResult]:
        """Answer a chunk in one `LLM.chat` call; on an exception, one by one to isolate it."""
        llm = self._ensure_engine()
        vllm = import_vllm()
        results: list[ChatResult | None] = [None] * len(requests)
        prepared: list[tuple[int, list[dict[str, Any]], Any]] = []
        for i, request in enumerate(requests):
            if request.model != self.options.name:
                results[i] = ChatResult(
                    request,
                    failure=Failure(
                        "bad_request",
                        f"this vllm endpoint serves {self.options.name!r}, not {request.model!r}",
                    ),
                    attempts=1,
                )
                continue
            try:
                messages = [message_to_vllm(m) for m in request.messages]
                params = sampling_params(vllm, request, self._defaults)
            except Exception as exc:
                results[i] = _engine_failure(request, exc, 0.0)
                continue
            prepared.append((i, messages, params))
        if prepared:
            tokenizer = self._tokenizer(llm)
            started = time.perf_counter()
            try:
                outputs = llm.chat(
                    [m for _, m, _ in prepared], [p for _, _, p in prepared], use_tqdm=False
                )
                latency = time.perf_counter() - started
                for (i, _, _), output in zip(prepared, outputs, strict=True):
                    results[i] = map_output(requests[i], output, tokenizer, latency)
            except Exception as exc:
                if type(exc).__name__ == "EngineDeadError":
                    # The engine is gone: fail the chunk, and let the next chunk start a new one.
                    latency = time.perf_counter() - started
                    for i, _, _ in prepared:
                        results[i] = _engine_failure(requests[i], exc, latency)
                    self._release_engine()
                else:  # one request spoiled the call: answer them one by one to find it
                    for i, messages, params in prepared:
                        results[i] = self._run_one(llm, requests[i], messages, params, tokenizer)
        return [r for r in results if r is not None]

    def _run_one(
        self,
        llm: Any,
        request: ChatRequest,
        messages: list[dict[str, Any]],
        params: Any,
        tokenizer: Any,
    ) -> ChatResult:
        started = time.perf_counter()
        try:
            (output,) = llm.chat([messages], [params], use_tqdm=False)
            return map_output(request, output, tokenizer, time.perf_counter() - started)
        except Exception as exc:
            return _engine_failure(request, exc, time.perf_counter() - started)

    @staticmethod
    def _tokenizer(llm: Any) -> Any:
        try:
            return llm.get_tokenizer()
        except Exception:
            return None

    def _release_engine(self) -> None:
        """Delete the engine and free what it held: its engine-core process, Python objects,
        the CUDA cache, and vLLM's distributed state (so a next engine can initialise it)."""
        llm, self._llm = self._llm, None
        self._start_error = None
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        shutdown = getattr(core, "shutdown", None)
        if callable(shutdown):
            with contextlib.suppress(Exception):
                shutdown()
        del llm, engine, core, shutdown
        gc.collect()
        with contextlib.suppress(Exception):
            parallel_state = importlib.import_module("vllm.distributed.parallel_state")
            parallel_state.cleanup_dist_env_and_memory()
        with contextlib.suppress(Exception):
            torch = importlib.import_module("torch")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.synchronize()
        gc.collect()
