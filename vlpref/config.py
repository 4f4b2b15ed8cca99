"""The run configuration: one YAML file describes a run.

    name: demo
    taxonomy: taxonomy/demo.yaml          # paths are relative to this file; builtin:demo and
                                          # builtin:spa_vl name the taxonomies vlpref ships
    workspace: .vlpref/workspace          # journal and stage outputs (a path or an fsspec URI)
    store: .vlpref/store                  # dataset versions (a path or an fsspec URI)
    endpoints:
      openai:
        kind: openai
        base_url: https://api.openai.com/v1
        api_key_env: OPENAI_API_KEY       # the *name* of the variable, never the key
        concurrency: 32
        rpm: 500
    models:                               # response models
      - name: gpt-4o-mini
        endpoint: openai
        model: gpt-4o-mini
        sampling: {temperature: 0.7, max_tokens: 512, n: 1}
    generator: {name: gen, endpoint: openai, model: gpt-4o}          # captions + questions
    judges: [{name: judge, endpoint: openai, model: gpt-4o, sampling: {temperature: 0}}]
    stages: {...}                         # see StagesConfig

Errors name the file, the field and its line, and say what was expected. Secrets are refused:
an API key written into the file is an error that says to use `api_key_env` instead.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vlpref.chat import SamplingParams
from vlpref.errors import ConfigError, ProviderError
from vlpref.providers.registry import provider_class
from vlpref.resources import builtin_taxonomy, is_builtin
from vlpref.retry import RetryPolicy
from vlpref.yamlfile import Lines, format_loc, load_yaml

# Field names that would hold a secret. Refused anywhere in a config, whatever their value.
SECRET_FIELDS = frozenset(
    {"api_key", "apikey", "api-key", "token", "password", "secret", "access_key"}
)

Name = Annotated[
    str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@+-]*$")
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingConfig(_Strict):
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=128)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    stop: tuple[str, ...] = ()

    def to_params(self) -> SamplingParams:
        return SamplingParams(**self.model_dump())


class ModelEntry(_Strict):
    """A model as the dataset names it (`name`) and as its endpoint serves it (`model`)."""

    name: Name
    endpoint: Name
    model: str = Field(min_length=1)
    sampling: SamplingConfig = SamplingConfig()


Structured = Literal["auto", "json_schema", "choice", "off"]
JudgeProtocolName = Literal["vlpref", "llama-guard", "shieldgemma", "md-judge"]


class GeneratorEntry(ModelEntry):
    """The model that writes captions and questions. `structured` asks its endpoint to constrain
    the question set to a JSON schema (`auto`, `json_schema` or `choice` all mean that here;
    `off` sends no constraint)."""

    structured: Structured = "auto"


class JudgeEntry(ModelEntry):
    """A judge: which protocol it speaks, and how its answers are constrained.

    `protocol`: `vlpref` (ours: safety, 1-5 ratings, pairwise), or a guard model's own
    (`llama-guard`, `shieldgemma`, `md-judge`), which gives safety verdicts only (see
    vlpref/protocols.py). `structured`: `auto` picks by endpoint kind (an offline vLLM engine:
    `choice` for the one-word verdicts and a JSON schema for ratings; any other: a JSON schema
    for every call), `json_schema`, `choice` (a vLLM server or engine), or `off`. Guard
    protocols are never constrained: their answers carry category codes after the verdict.
    `policy`: the policy text a `shieldgemma` judge is asked about (one call per response)."""

    protocol: JudgeProtocolName = "vlpref"
    structured: Structured = "auto"
    policy: str | None = None


class TypographicSource(_Strict):
    kind: Literal["typographic"] = "typographic"
    per_branch: int = Field(default=4, ge=1)
    size: int = Field(default=512, ge=64, le=4096)


class FolderSource(_Strict):
    """Images under `path/<class1>/<class2>/<class3>/*` (or a flat folder for one branch)."""

    kind: Literal["folder"]
    path: str
    # auto: flat when an override names exactly this branch, the class tree otherwise.
    layout: Literal["auto", "tree", "flat"] = "auto"


class ManifestSource(_Strict):
    """CSV, JSONL or Parquet rows with `path` or `url` and `class1..3` columns."""

    kind: Literal["manifest"]
    path: str


ImageSource = Annotated[
    TypographicSource | FolderSource | ManifestSource, Field(discriminator="kind")
]


class ImagesStage(_Strict):
    source: ImageSource = TypographicSource()
    overrides: dict[str, ImageSource] = Field(
        default_factory=dict, description="taxonomy path prefix -> source for that branch"
    )
    max_side: int = Field(default=1024, ge=64)
    max_bytes: int = Field(default=20_000_000, ge=1024)
    download_timeout_s: float = Field(default=30.0, gt=0)
    # Read by the images stage (tasks/images.py, vlpref/images/).
    min_side: int = Field(default=32, ge=1, description="smallest side kept, after bounding")
    max_pixels: int = Field(
        default=64_000_000, ge=1, description="larger images are refused unread (bomb guard)"
    )
    encoding: Literal["auto", "png", "jpeg"] = "auto"  # auto: JPEG for lossy inputs, else PNG
    download_attempts: int = Field(default=3, ge=1)
    download_concurrency: int = Field(default=16, ge=1)


class QuestionsStage(_Strict):
    types: tuple[Literal["easy", "hardq", "hards"], ...] = ("easy", "hardq", "hards")
    max_attempts: int = Field(default=3, ge=1)


class JudgeStage(_Strict):
    safety: bool = True
    aspects: tuple[Literal["harmlessness", "helpfulness", "faithfulness"], ...] = (
        "harmlessness",
        "helpfulness",
        "faithfulness",
    )
    pairwise: bool = True
    max_pairs_per_question: int = Field(default=6, ge=0)
    max_attempts: int = Field(default=3, ge=1, description="asks per judgment when unparseable")


class PairsStage(_Strict):
    policy: Literal["spa-vl", "max-margin", "all-pairs"] = "spa-vl"
    min_margin: float = Field(default=0.5, ge=0)
    safety_groups: int = Field(default=5, ge=2)
    # overall = sum of weight * score over harmlessness, helpfulness, faithfulness (ratings 1-5)
    # and safety (1 - P(unsafe)); harmlessness-dominant, as SPA-VL ranks harmlessness first.
    # See vlpref/selection.py.
    weights: dict[str, float] = Field(
        default_factory=lambda: {
            "harmlessness": 1.0,
            "helpfulness": 0.2,
            "faithfulness": 0.04,
            "safety": 1.0,
        }
    )
    same_model_pairs: bool = True  # two samples of one model may form a pair (RLAIF-V)
    never_chosen: tuple[str, ...] = ("length", "content_filter")  # finish reasons never chosen
    drop_contradicted: bool = True  # drop a rating pair the both-orders verdict reverses
    seed: int = 0  # seeds spa-vl's choice of cross-group pairs

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        known = {"harmlessness", "helpfulness", "faithfulness", "safety"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown weight {unknown[0]!r} (known: {', '.join(sorted(known))})")
        if any(not 0 <= w < float("inf") for w in value.values()):
            raise ValueError("weights must be finite and non-negative")
        if not any(w > 0 for w in value.values()):
            raise ValueError("at least one weight must be positive")
        return value


class PublishStage(_Strict):
    splits: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.8, "validation": 0.1, "test": 0.1}
    )
    seed: int = 0

    @field_validator("splits")
    @classmethod
    def _fractions(cls, value: dict[str, float]) -> dict[str, float]:
        if not value or any(v < 0 for v in value.values()) or abs(sum(value.values()) - 1) > 1e-6:
            raise ValueError("split fractions must be non-negative and add up to 1")
        return value


class StagesConfig(_Strict):
    images: ImagesStage = ImagesStage()
    questions: QuestionsStage = QuestionsStage()
    judge: JudgeStage = JudgeStage()
    pairs: PairsStage = PairsStage()
    publish: PublishStage = PublishStage()


class RunConfig(_Strict):
    name: Name
    taxonomy: str
    workspace: str = ".vlpref/workspace"
    store: str = ".vlpref/store"
    endpoints: dict[Name, dict[str, Any]]
    models: tuple[ModelEntry, ...] = Field(min_length=1)
    generator: GeneratorEntry
    judges: tuple[JudgeEntry, ...] = Field(min_length=1)
    stages: StagesConfig = StagesConfig()
    prompts_dir: str | None = Field(
        default=None, description="folder of prompt templates; the shipped prompts/ by default"
    )
    only: tuple[str, ...] = ()
    # 4, not 8: in the 3,000-question scale run both gave 1,175 req/s, and 4 peaked at 575 MB
    # against 822 (bench/scale_run.py). One branch's judge stage alone keeps 256 requests busy.
    parallel_branches: int = Field(
        default=4, ge=1, description="branches in flight at once (bounds memory, not speed)"
    )
    # 8,000: at 30,000 questions x 12 models (7,400 samples per branch) one branch answering at a
    # time ran at 1,682 req/s with a 517 MB peak, two at 1,556 req/s and 600 MB (six branches,
    # bench/scale_run.py --branches 6); at 3,000 questions (740 per branch) four still answer.
    responses_in_flight: int = Field(
        default=8000,
        ge=1,
        description="response samples (questions x samples per question) that the branches "
        "answering at once may hold; a larger branch answers alone",
    )
    warn_failure_rate: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="a stage output (per branch) whose share of failed rows passes this is "
        "marked 'Completed with failures' in Prefect and named in the run summary",
    )
    retry_failed: RetryPolicy = Field(
        default="transient",
        description="which failures of a finished stage output a rerun asks for again "
        "(vlpref/retry.py has the table by failure kind)",
    )
    # Operational: neither enters the config's hash.
    preflight: bool = Field(
        default=True,
        description="check keys, endpoints and model ids before any stage runs "
        "(vlpref/preflight.py; `vlpref run --no-preflight` skips it for one run)",
    )
    early_stop_after: int = Field(
        default=8,
        ge=0,
        description="a batch (one stage's requests for one model) stops sending once its first "
        "this-many sent requests all failed alike for a reason retrying cannot heal; 0: never",
    )
    source_file: str | None = Field(default=None, exclude=True)

    @field_validator("taxonomy")
    @classmethod
    def _builtin_taxonomy(cls, value: str) -> str:
        if is_builtin(value):
            try:
                builtin_taxonomy(value)
            except ValueError as exc:
                raise _LocatedError(("taxonomy",), str(exc)) from None
        return value

    @model_validator(mode="after")
    def _references(self) -> RunConfig:
        names: set[str] = set()
        for i, entry in enumerate(self.models):
            if entry.name in names:
                raise _LocatedError(("models", i, "name"), f"duplicate model name {entry.name!r}")
            names.add(entry.name)
        refs: list[tuple[tuple[int | str, ...], ModelEntry]] = [
            *((("models", i), m) for i, m in enumerate(self.models)),
            (("generator",), self.generator),
            *((("judges", i), j) for i, j in enumerate(self.judges)),
        ]
        for loc, entry in refs:
            if entry.endpoint not in self.endpoints:
                known = ", ".join(sorted(self.endpoints)) or "none"
                raise _LocatedError(
                    (*loc, "endpoint"), f"unknown endpoint {entry.endpoint!r} (defined: {known})"
                )
        return self

    @property
    def samples_per_question(self) -> int:
        """Response samples each question gets: the sum of the response models' `n`."""
        return sum(m.sampling.n for m in self.models)

    def endpoint_kind(self, name: str) -> str:
        return str(self.endpoints[name].get("kind", "openai"))

    def content_hash(self) -> str:
        """Hash of everything that shapes the dataset (not where files live)."""
        payload = self.model_dump(
            mode="json",
            exclude={
                "workspace",
                "store",
                "only",
                "parallel_branches",
                "responses_in_flight",
                "preflight",
                "early_stop_after",
                "retry_failed",
                "warn_failure_rate",
                "source_file",
            },
        )
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


class _LocatedError(ValueError):
    def __init__(self, loc: tuple[int | str, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


def _find_secrets(data: Any, loc: tuple[int | str, ...] = ()) -> tuple[int | str, ...] | None:
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(key, str) and key.lower() in SECRET_FIELDS:
                return (*loc, key)
            found = _find_secrets(value, (*loc, key))
            if found:
                return found
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found = _find_secrets(value, (*loc, index))
            if found:
                return found
    return None


def _error(file: str, lines: Lines, loc: tuple[int | str, ...], message: str) -> ConfigError:
    line = lines.line(loc)
    where = f"line {line}: " if line else ""
    return ConfigError(f"{where}{message}", file=file, field=format_loc(loc))


def _resolve_path(base: Path, value: str) -> str:
    if "://" in value or Path(value).is_absolute():
        return value
    return str((base / value).resolve())


def _resolve_taxonomy(base: Path, value: str) -> str:
    """`builtin:<name>` is the taxonomy file vlpref ships (the name was checked on validation)."""
    return str(builtin_taxonomy(value)) if is_builtin(value) else _resolve_path(base, value)


def parse_config(
    data: Any, *, file: str = "<config>", lines: Lines | None = None, base_dir: Path | None = None
) -> RunConfig:
    """Validate an already-parsed config mapping."""
    lines = lines or Lines(None)
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping at the top level", file=file)
    secret = _find_secrets(data)
    if secret:
        raise _error(
            file,
            lines,
            secret,
            "secrets may not be written in a config file; put the key in an environment variable "
            "and give its name as api_key_env (or a Prefect Secret block name as api_key_secret)",
        )
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first["loc"])
        ctx_error = (first.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _LocatedError):
            loc = ctx_error.loc
        raise _error(file, lines, loc, _describe(first)) from None
    for name, options in config.endpoints.items():
        kind = str(options.get("kind", "openai"))
        try:
            cls = provider_class(kind)
            cls.validate_options(options)
        except ProviderError as exc:
            raise _error(file, lines, ("endpoints", name, "kind"), str(exc)) from None
        except ValidationError as exc:
            first = exc.errors()[0]
            raise _error(
                file, lines, ("endpoints", name, *first["loc"]), _describe(first)
            ) from None
    if base_dir is not None:
        config = config.model_copy(
            update={
                "taxonomy": _resolve_taxonomy(base_dir, config.taxonomy),
                "workspace": _resolve_path(base_dir, config.workspace),
                "store": _resolve_path(base_dir, config.store),
                "prompts_dir": (
                    _resolve_path(base_dir, config.prompts_dir) if config.prompts_dir else None
                ),
                "source_file": file,
            }
        )
    return config


def _describe(error: Any) -> str:
    ctx_error = (error.get("ctx") or {}).get("error")
    if isinstance(ctx_error, _LocatedError):
        return str(ctx_error)
    message = str(error["msg"])
    if error["type"] == "extra_forbidden":
        return "unknown field (check the spelling; see the README's config reference)"
    if error["type"] == "missing":
        return "required field is missing"
    got = error.get("input")
    if error["type"] not in ("missing",) and not isinstance(got, dict | list):
        message += f" (got {got!r})"
    return message


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a run config; relative paths inside it are resolved against its folder."""
    path = Path(path)
    data, lines = load_yaml(path)
    return parse_config(data, file=str(path), lines=lines, base_dir=path.resolve().parent)
