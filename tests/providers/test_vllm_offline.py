"""`kind: vllm` without vLLM: options, the mapping to and from vLLM's types, per-request
isolation, and the device thread's turn-taking, against a fake `vllm` module. The real engine is
exercised by the vLLM tier (`make test-vllm`, tests_vllm/)."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
from collections.abc import Iterator
from types import ModuleType, SimpleNamespace
from typing import Any, ClassVar

import pytest
from PIL import Image
from pydantic import ValidationError

from vlpref.chat import ChatRequest, ImagePart, Message, OutputConstraint, SamplingParams
from vlpref.config import parse_config
from vlpref.errors import ConfigError, ProviderError
from vlpref.journal import Journal
from vlpref.providers import available_kinds, complete_all, provider_class
from vlpref.providers import vllm_offline as vo
from vlpref.runner import BatchStats, run_all

MODEL = "org/tiny"


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


def request(rid: str, text: str = "hello", **params: Any) -> ChatRequest:
    return ChatRequest(rid, MODEL, (Message.user(text),), SamplingParams(**params))


class EngineDeadError(RuntimeError):
    """Named like vLLM's: the engine process is gone."""


class FakeLLM:
    """Enough of `vllm.LLM` for the provider: `chat`, `get_tokenizer`, `model_config`, and an
    engine core whose `shutdown` is recorded. Prompts containing "BOOM" raise, like a request
    vLLM refuses."""

    alive: ClassVar[set[int]] = set()
    created = 0
    lock = threading.Lock()

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.calls: list[int] = []
        self.params: list[dict[str, Any]] = []  # every request's SamplingParams kwargs
        with FakeLLM.lock:
            FakeLLM.created += 1
            FakeLLM.alive.add(id(self))
        self.model_config = SimpleNamespace(get_diff_sampling_param=lambda: {"temperature": 0.6})
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=self._shutdown))

    def _shutdown(self) -> None:
        FakeLLM.alive.discard(id(self))

    def get_tokenizer(self) -> Any:
        return SimpleNamespace(decode=lambda ids: f"<{ids[0]}>")

    def chat(self, conversations: list[Any], params: list[Any], use_tqdm: bool) -> list[Any]:
        assert use_tqdm is False and len(conversations) == len(params)
        self.calls.append(len(conversations))
        self.params.extend(params)
        for conversation in conversations:
            if "BOOM" in str(conversation):
                raise ValueError("prompt too long")
            if "DEAD" in str(conversation):
                raise EngineDeadError("engine core died")
        return [self._output(c, p) for c, p in zip(conversations, params, strict=True)]

    @staticmethod
    def _output(conversation: list[dict[str, Any]], params: dict[str, Any]) -> Any:
        choices = []
        for index in range(params["n"]):
            token_ids = [10 + index, 11, 12]
            logprobs = None
            if params["logprobs"] is not None:
                logprobs = [
                    {
                        tid: SimpleNamespace(logprob=-1.0, decoded_token=f"t{tid}"),
                        99: SimpleNamespace(logprob=-0.1, decoded_token=None),  # more likely
                        98: SimpleNamespace(logprob=-5.0, decoded_token="rare"),
                    }
                    for tid in token_ids
                ]
            choices.append(
                SimpleNamespace(
                    index=index,
                    text=f"answer {index} to {conversation[-1]['role']}",
                    token_ids=token_ids,
                    logprobs=logprobs,
                    finish_reason="length" if index else "stop",
                )
            )
        return SimpleNamespace(prompt_token_ids=list(range(7)), outputs=choices[::-1])


class FakeStructuredOutputsParams(SimpleNamespace):
    """vLLM 0.32's `StructuredOutputsParams`: exactly one constraint, else a ValueError (vLLM's
    `VLLMValidationError` is one)."""

    def __init__(self, **kwargs: Any) -> None:
        if len(kwargs) != 1:
            raise ValueError(f"You can only use one kind of structured outputs: {kwargs}")
        if kwargs.get("json") == {"type": "unsupported"}:
            raise ValueError("The provided JSON schema contains features not supported")
        super().__init__(**kwargs)


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    module = ModuleType("vllm")
    module.LLM = FakeLLM  # type: ignore[attr-defined]
    module.SamplingParams = lambda **kw: dict(kw)  # type: ignore[attr-defined]
    module.sampling_params = SimpleNamespace(  # type: ignore[attr-defined]
        StructuredOutputsParams=FakeStructuredOutputsParams
    )
    monkeypatch.setattr(vo, "import_vllm", lambda: module)
    FakeLLM.alive.clear()
    FakeLLM.created = 0
    yield module


def provider(**options: Any) -> vo.VllmProvider:
    return vo.VllmProvider.from_config({"kind": "vllm", "model": MODEL, **options})


def test_the_kind_is_built_in_and_importing_it_does_not_import_vllm() -> None:
    assert "vllm" in available_kinds()
    assert provider_class("vllm") is vo.VllmProvider
    code = (
        "import sys, vlpref.providers.vllm_offline as m, vlpref.vllm_serve;"
        "m.VllmProvider.from_config({'kind': 'vllm', 'model': 'x'});"
        "assert 'vllm' not in sys.modules and 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_options_are_checked_when_the_config_loads() -> None:
    base = {
        "name": "t",
        "taxonomy": "t.yaml",
        "models": [{"name": "m", "endpoint": "local", "model": MODEL}],
        "generator": {"name": "g", "endpoint": "local", "model": MODEL},
        "judges": [{"name": "j", "endpoint": "local", "model": MODEL}],
    }
    ok = parse_config({**base, "endpoints": {"local": {"kind": "vllm", "model": MODEL}}})
    assert ok.endpoint_kind("local") == "vllm"
    with pytest.raises(ConfigError, match=r"endpoints\.local\.gpu_memory_utilisation"):
        parse_config(
            {
                **base,
                "endpoints": {
                    "local": {"kind": "vllm", "model": MODEL, "gpu_memory_utilisation": 0.5}
                },
            }
        )
    with pytest.raises(ValidationError, match="has its own option"):
        vo.VllmOptions.model_validate({"model": MODEL, "extra_engine_args": {"max_model_len": 10}})
    engine = vo.VllmOptions.model_validate(
        {"model": MODEL, "max_model_len": 512, "extra_engine_args": {"swap_space": 0}}
    ).engine_kwargs()
    assert engine["max_model_len"] == 512 and engine["swap_space"] == 0
    assert "limit_mm_per_prompt" not in engine


async def test_without_vllm_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    p = provider()
    with pytest.raises(ProviderError, match=r"vlpref\[vllm\]"):
        await complete_all(p, [request("a")])
    await p.aclose()


def test_messages_and_sampling_map_to_vllm() -> None:
    image = ImagePart(data=png())
    message = vo.message_to_vllm(Message.user(image, "what?"))
    assert message["role"] == "user"
    part, text = message["content"]
    assert part["type"] == "image_pil" and part["uuid"] == image.sha256
    assert part["image_pil"].size == (8, 8)
    assert text == {"type": "text", "text": "what?"}
    url = vo.message_to_vllm(Message.user(ImagePart(url="https://x/y.png"), "q"))
    assert url["content"][0] == {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
    assert vo.message_to_vllm(Message.system("be brief")) == {
        "role": "system",
        "content": "be brief",
    }

    kwargs = vo.sampling_kwargs(
        request("a", n=3, seed=5, max_tokens=7, logprobs=True, top_logprobs=4, stop=("x",)),
        {"temperature": 0.6, "top_k": 20},
    )
    assert kwargs == {
        "max_tokens": 7,
        "temperature": 0.6,  # the model's default, as vLLM's server applies it
        "top_k": 20,
        "n": 3,
        "seed": 5,
        "stop": ["x"],
        "logprobs": 4,
    }
    plain = vo.sampling_kwargs(request("b", temperature=0.0), {})
    assert plain == {"max_tokens": None, "n": 1, "temperature": 0.0, "logprobs": None}
    assert vo.sampling_kwargs(request("c", logprobs=True), {})["logprobs"] == 0


async def test_results_samples_usage_and_logprobs(fake_vllm: ModuleType) -> None:
    p = provider()
    wanted = request("lp", n=2, logprobs=True, top_logprobs=2)
    (result,) = await complete_all(p, [wanted])
    assert result.ok and result.request is wanted and result.attempts == 1
    assert [s.index for s in result.samples] == [0, 1]  # sorted, whatever vLLM's order
    assert [s.finish_reason for s in result.samples] == ["stop", "length"]
    assert result.usage.prompt_tokens == 7 and result.usage.completion_tokens == 6
    assert [s.completion_tokens for s in result.samples] == [3, 3]  # each choice's token ids
    first = result.samples[0].logprobs
    assert first is not None and len(first) == 3
    assert first[0].token == "t10" and first[0].logprob == -1.0
    assert first[0].top == (("<99>", -0.1), ("t10", -1.0))  # the 2 most likely, best first
    (plain,) = await complete_all(p, [request("plain")])
    assert plain.samples[0].logprobs is None
    await p.aclose()
    assert FakeLLM.alive == set()


async def test_a_failing_request_does_not_take_its_batch_down(fake_vllm: ModuleType) -> None:
    p = provider(batch_size=8)
    batch = [request("a"), request("bad", "BOOM"), request("c", n=2)]
    batch.append(ChatRequest("other", "another/model", (Message.user("hi"),)))
    results = {r.request.id: r for r in await complete_all(p, batch)}
    assert results["a"].ok and results["c"].ok and len(results["c"].samples) == 2
    bad = results["bad"].failure
    assert bad is not None and bad.kind == "engine" and "prompt too long" in bad.message
    other = results["other"].failure
    assert other is not None and other.kind == "bad_request" and MODEL in other.message
    await p.aclose()


async def test_batches_are_chunked_and_journaled(fake_vllm: ModuleType, tmp_path: Any) -> None:
    p = provider(batch_size=4)
    journal = Journal(str(tmp_path / "j"))
    batch = [request(f"r{i}", f"question {i}", n=2) for i in range(10)]
    stats = BatchStats()
    results = await run_all(p, batch, journal, stats)
    assert all(r.ok for r in results) and stats.sent == 10 and len(journal) == 20
    # Each sample's share of its call: 7 prompt tokens split 4 + 3, its own 3 tokens, exact.
    shares = [
        (s.usage.prompt_tokens, s.usage.completion_tokens, s.usage.exact)
        for s in results[0].samples
        if s.usage
    ]
    assert shares == [(4, 3, True), (3, 3, True)]
    assert p._llm is not None and p._llm.calls == [4, 4, 2]
    again = BatchStats()
    await run_all(p, batch, Journal(str(tmp_path / "j")), again)
    assert (again.sent, again.cached) == (0, 10)
    await p.aclose()


async def test_engines_take_turns_and_are_released(fake_vllm: ModuleType) -> None:
    import asyncio

    a, b = provider(seed=1), provider(seed=2)
    batch = [request(f"r{i}") for i in range(3)]
    await complete_all(a, batch)
    await a.aclose()
    assert not a.engine_loaded and FakeLLM.alive == set()
    await asyncio.gather(complete_all(a, batch), complete_all(b, batch))
    assert (a.engine_starts, b.engine_starts) == (2, 1)
    assert len(FakeLLM.alive) == 1  # a's engine was released before b's started

    resident_a, resident_b = provider(keep_resident=True), provider(keep_resident=True)
    await complete_all(resident_a, batch)
    await complete_all(resident_b, batch)
    assert resident_a.engine_loaded and resident_b.engine_loaded
    for p in (a, b, resident_a, resident_b):
        await p.aclose()
    assert FakeLLM.alive == set()


async def test_an_engine_that_cannot_start_is_a_provider_error(
    fake_vllm: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(**kwargs: Any) -> None:
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(fake_vllm, "LLM", broken)
    p = provider()
    with pytest.raises(ProviderError, match="did not start: RuntimeError: CUDA out of memory"):
        await complete_all(p, [request("a")])
    await p.aclose()


async def test_a_dead_engine_fails_its_chunk_and_the_next_chunk_starts_anew(
    fake_vllm: ModuleType,
) -> None:
    p = provider()
    first = await complete_all(p, [request("a"), request("dead", "DEAD")])
    assert all(r.failure is not None and r.failure.kind == "engine" for r in first)
    assert "EngineDeadError" in str(first[1].failure) and not p.engine_loaded
    (again,) = await complete_all(p, [request("b")])
    assert again.ok and p.engine_starts == 2
    await p.aclose()


# -- structured outputs ------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "helpfulness": {"type": "integer", "minimum": 1, "maximum": 5},
        "rationale": {"type": "string"},
    },
    "required": ["helpfulness", "rationale"],
}


def constrained(rid: str, constraint: OutputConstraint | None) -> ChatRequest:
    return ChatRequest(rid, MODEL, (Message.user("judge"),), constraint=constraint)


def test_constraints_map_to_structured_outputs_params() -> None:
    schema = OutputConstraint.json_schema("rating", SCHEMA)
    assert vo.structured_outputs_kwargs(schema) == {"json": SCHEMA}
    assert list(vo.structured_outputs_kwargs(schema)["json"]["properties"]) == [
        "helpfulness",
        "rationale",
    ]
    choice = OutputConstraint.choice("safe", "unsafe")
    assert vo.structured_outputs_kwargs(choice) == {"choice": ["safe", "unsafe"]}


async def test_a_constrained_request_reaches_the_engine_with_its_constraint(
    fake_vllm: ModuleType,
) -> None:
    p = provider(batch_size=8)
    batch = [
        constrained("schema", OutputConstraint.json_schema("rating", SCHEMA)),
        constrained("choice", OutputConstraint.choice("safe", "unsafe")),
        constrained("plain", None),
        constrained("unsupported", OutputConstraint.json_schema("x", {"type": "unsupported"})),
    ]
    results = {r.request.id: r for r in await complete_all(p, batch)}
    assert p._llm is not None
    schema, choice, plain = p._llm.params  # in batch order; the unsupported one never got there
    assert schema["structured_outputs"] == FakeStructuredOutputsParams(json=SCHEMA)
    assert choice["structured_outputs"] == FakeStructuredOutputsParams(choice=["safe", "unsafe"])
    assert "structured_outputs" not in plain
    assert all(results[rid].ok for rid in ("schema", "choice", "plain"))
    # A schema vLLM cannot compile fails its own request, as any request vLLM refuses.
    failure = results["unsupported"].failure
    assert failure is not None and failure.kind == "engine" and "not supported" in failure.message
    await p.aclose()


def test_a_logprob_of_minus_infinity_is_reported_as_the_server_does() -> None:
    """Under a grammar a forbidden token has logprob -inf; like vLLM's server, -9999.0."""
    step = {
        5: SimpleNamespace(logprob=-0.2, decoded_token="safe"),
        6: SimpleNamespace(logprob=-1.7, decoded_token="un"),
        7: SimpleNamespace(logprob=float("-inf"), decoded_token="hello"),
    }
    (token,) = vo.map_logprobs([5], [step], 3, None)
    assert token.token == "safe" and token.logprob == -0.2
    assert token.top == (("safe", -0.2), ("un", -1.7), ("hello", vo.LOGPROB_FLOOR))
    assert vo.LOGPROB_FLOOR == -9999.0
