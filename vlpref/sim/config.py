"""Configuration of the simulated OpenAI-compatible server.

Example (YAML)::

    seed: 0
    image_tokens: 85
    latency: {kind: constant, ms: 0}          # default for every model
    faults:                                   # default for every model
      rate_limit: {rate: 0.0, retry_after_s: 1.0}
    rate_limit: null                          # {rpm: N, tpm: M}: enforced, per model
    models:
      sim-refuser: {persona: refuser}
      sim-mixed: {persona: mixed, weights: {refuser: 1, safe-helpful: 2}}
      sim-filtered: {persona: filtered, filter_rate: 0.3}
      sim-judge:
        persona: judge
        malformed_rate: 0.05
        position_bias: 0.2
        prior_bias: 0.0                       # TASK: safety errors: logit shift to unsafe,
        image_dependence: 0.0                 #   weight of the image's cue,
        noise: 0.0                            #   std of a per-request logit noise
        nondeterministic: true                # no `seed`: a new answer per call
        latency: {kind: lognormal, mean_ms: 50, sigma: 0.5}
        faults:
          server_error: {rate: 0.1, max_per_request: 1}
          hang: {rate: 0.01, hang_s: 30}
        rate_limit: {rpm: 600, tpm: 200000}
      sim-judge-drift:                        # answers in real judges' formats
        persona: judge
        styles: {canonical: 1, prose: 1, bold_label: 1, json: 1, fenced_json: 1, think: 1}
        # or `styles: all`, or per kind: {pairwise: {brackets: 2, output: 1}, questions: all}
        drop_logprobs: true                   # `logprobs: null` even when asked
      sim-llama-guard: {persona: llama-guard} # also shieldgemma, md-judge
    batch:                                    # /v1/files + /v1/batches (see BatchSimConfig)
      completion_delay_s: 2.0
      fail_rate: 0.1
      expire_batches: 1

A model's own `latency`, `faults` and `rate_limit` replace the global ones when set. A global
`rate_limit` gives every model its own window with those limits (as OpenAI limits per model).
`styles` (judge only) is documented in `vlpref.sim.styles`; the guard personas in
`vlpref.sim.personas`; output constraints in `vlpref.sim.constraints`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from vlpref.errors import ConfigError
from vlpref.sim.styles import normalise_styles
from vlpref.yamlfile import loads_yaml, read_yaml_text, yaml_error

PersonaName = Literal[
    "refuser",
    "safe-helpful",
    "over-compliant",
    "jailbroken",
    "mixed",
    "filtered",
    "echo",
    "judge",
    "llama-guard",
    "shieldgemma",
    "md-judge",
]
StyleName = Literal["refuser", "safe-helpful", "over-compliant", "jailbroken"]
FaultKind = Literal["rate_limit", "server_error", "hang", "malformed"]

# Order in which fault kinds are drawn for one arrival; the first that fires wins.
FAULT_ORDER: tuple[FaultKind, ...] = ("rate_limit", "server_error", "malformed", "hang")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LatencyConfig(_Strict):
    """Delay before answering; `kind` picks which of the other fields are used."""

    kind: Literal["constant", "uniform", "exponential", "lognormal"] = "constant"
    ms: float = Field(default=0.0, ge=0)  # constant
    low_ms: float = Field(default=0.0, ge=0)  # uniform
    high_ms: float = Field(default=0.0, ge=0)  # uniform
    mean_ms: float = Field(default=0.0, ge=0)  # exponential, lognormal
    sigma: float = Field(default=0.5, ge=0)  # lognormal (of the underlying normal)

    @model_validator(mode="after")
    def _check_range(self) -> LatencyConfig:
        if self.kind == "uniform" and self.high_ms < self.low_ms:
            raise ValueError("high_ms must be >= low_ms")
        return self

    @property
    def is_zero(self) -> bool:
        """True when no request is ever delayed."""
        if self.kind == "constant":
            return self.ms == 0
        if self.kind == "uniform":
            return self.high_ms == 0
        return self.mean_ms == 0


class FaultSpec(_Strict):
    """One fault kind: how often it fires and at most how often per request body."""

    rate: float = Field(default=0.0, ge=0, le=1)
    max_per_request: int | None = Field(default=None, ge=0)
    retry_after_s: float = Field(default=1.0, ge=0)  # rate_limit only
    hang_s: float = Field(default=30.0, ge=0)  # hang only


class RateLimitConfig(_Strict):
    """Enforced limits over a sliding one-minute window; None means not enforced.

    A request is admitted on prompt tokens + max_tokens (OpenAI's estimate) and its window entry
    is then corrected to the tokens actually used. Over the limit: 429 with Retry-After.
    """

    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)


class ModelConfig(_Strict):
    """One served model name: its persona, persona parameters and overrides."""

    persona: PersonaName
    weights: dict[StyleName, float] = Field(default_factory=dict)  # mixed
    filter_rate: float = Field(default=0.5, ge=0, le=1)  # filtered
    malformed_rate: float = Field(default=0.0, ge=0, le=1)  # judge, TASK: questions
    position_bias: float = Field(default=0.0, ge=0, le=1)  # judge, TASK: pairwise
    # judge errors on TASK: safety (vlpref.sim.personas, "Judge errors"): a logit shift toward
    # `unsafe`, the weight of the image's cue, the std of a per-request logit noise
    prior_bias: float = Field(default=0.0, ge=-20, le=20)
    image_dependence: float = Field(default=0.0, ge=0, le=1)
    noise: float = Field(default=0.0, ge=0, le=20)
    # judge drift: `all`, a list of styles, style -> weight, or kind -> one of those
    styles: str | list[str] | dict[str, Any] | None = None
    # Answer `logprobs: null` even when the request asks for logprobs (many hosted APIs do).
    drop_logprobs: bool = False
    # judge drift: the share of corrective re-asks (the task, the answer, "answer again in this
    # format") answered in the canonical format; the others drift again like a first answer.
    follows_corrections: float = Field(default=0.9, ge=0, le=1)
    # A request without `seed` is answered with a seed drawn from its body and arrival count:
    # sending it again gives another answer (temperature > 0), as hosted APIs do.
    nondeterministic: bool = False
    latency: LatencyConfig | None = None
    faults: dict[FaultKind, FaultSpec] | None = None
    rate_limit: RateLimitConfig | None = None

    @model_validator(mode="after")
    def _check_weights(self) -> ModelConfig:
        if any(w < 0 for w in self.weights.values()):
            raise ValueError("weights must be >= 0")
        if self.weights and sum(self.weights.values()) <= 0:
            raise ValueError("weights must not all be zero")
        return self

    @field_validator("styles")
    @classmethod
    def _check_styles(cls, value: Any) -> Any:
        normalise_styles(value)  # raises ValueError naming the problem
        return value

    @model_validator(mode="after")
    def _check_styles_persona(self) -> ModelConfig:
        if self.styles is not None and self.persona != "judge":
            raise ValueError("styles apply to the judge persona only")
        return self


class BatchSimConfig(_Strict):
    """How the sim's batch API (`/v1/files`, `/v1/batches`) behaves; every outcome is a function
    of this config, the seed and the lines' bodies, never of timing or chance.

    A batch answers its lines as `/v1/chat/completions` would (the same answer path), all at once
    when `completion_delay_s` has passed since it was created; until then it is `in_progress`.
    `fail_rate`: the share of lines answered with status `fail_status` instead (drawn per body and
    per time the body arrived in a batch), at most `fail_max_per_request` times per body, so a
    resubmitted line can succeed. Failed lines go to the error file, as OpenAI puts
    them, or into the output file (`failed_lines_in`), as `vllm run-batch` does.
    `expire_batches`: the first N batches created (since the server started) expire instead of
    completing: the share `expire_done_rate` of their lines (drawn per body) is answered in the
    output file, the others are listed in the error file with code `batch_expired`."""

    completion_delay_s: float = Field(default=0.0, ge=0, le=86_400)
    fail_rate: float = Field(default=0.0, ge=0, le=1)
    fail_status: int = Field(default=500, ge=400, le=599)
    fail_max_per_request: int = Field(default=1, ge=1)
    failed_lines_in: Literal["error_file", "output_file"] = "error_file"
    expire_batches: int = Field(default=0, ge=0)
    expire_done_rate: float = Field(default=0.5, ge=0, le=1)
    max_requests: int = Field(default=50_000, ge=1)  # OpenAI's limit per batch


class SimConfig(_Strict):
    """The whole simulator configuration."""

    seed: int = 0
    image_tokens: int = Field(default=85, ge=0)
    # Set: /v1/chat/completions and /v1/models answer 401 unless the request carries
    # `Authorization: Bearer <this>` (a test double's key, not a secret).
    require_api_key: str | None = None
    request_log_size: int = Field(default=200_000, gt=0)
    latency: LatencyConfig = LatencyConfig()
    faults: dict[FaultKind, FaultSpec] = Field(default_factory=dict)
    rate_limit: RateLimitConfig | None = None
    batch: BatchSimConfig = BatchSimConfig()
    models: dict[str, ModelConfig] = Field(min_length=1)

    def latency_for(self, model: str) -> LatencyConfig:
        """The latency that applies to `model`."""
        own = self.models[model].latency
        return own if own is not None else self.latency

    def faults_for(self, model: str) -> dict[FaultKind, FaultSpec]:
        """The fault specs that apply to `model` (only those with rate > 0)."""
        own = self.models[model].faults
        specs = own if own is not None else self.faults
        return {k: specs[k] for k in FAULT_ORDER if k in specs and specs[k].rate > 0}

    def rate_limit_for(self, model: str) -> RateLimitConfig | None:
        """The enforced limits for `model`, or None."""
        own = self.models[model].rate_limit
        limit = own if own is not None else self.rate_limit
        if limit is None or (limit.rpm is None and limit.tpm is None):
            return None
        return limit


def load_config(source: SimConfig | Mapping[str, Any] | str | Path) -> SimConfig:
    """Build a SimConfig from a config, a dict, or a YAML/JSON file path.

    Raises ConfigError naming the file and the first invalid field.
    """
    if isinstance(source, SimConfig):
        return source
    file: str | None = None
    if isinstance(source, str | Path):
        file = str(source)
        text = read_yaml_text(source, "sim config")
        try:
            data, _ = loads_yaml(text)  # duplicate keys and alias bombs are refused
        except yaml.YAMLError as exc:
            raise yaml_error(exc, file) from exc
    else:
        data = dict(source)
    if not isinstance(data, Mapping):
        raise ConfigError("sim config must be a mapping", file=file)
    try:
        return SimConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or None
        raise ConfigError(err["msg"], file=file, field=field) from exc
