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

Errors name the file, the field and its line, and say what was expected. Secrets are refused,
and no error repeats them (docs/security.md): a field named like a credential
(`vlpref.redact.is_credential_name`: `api_key`, `Authorization`, `X-Auth-Token`, `access_token`,
...), a value shaped like a key (`sk-...`, `hf_...`, a JWT, ...) wherever it is written, and an
`api_key_env` / `api_key_secret` that is not the *name* of a variable / block are errors that say
to use `api_key_env` instead. Error messages never quote what was written in such a field, and
redact key shapes in whatever else they quote.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    ValidationError,
    field_validator,
    model_validator,
)

from vlpref.chat import SamplingParams
from vlpref.errors import ConfigError, ProviderError
from vlpref.providers.registry import provider_class
from vlpref.redact import (
    NAME_OF_SECRET_FIELDS,
    contains_secret,
    is_block_name,
    is_credential_name,
    is_env_var_name,
    redact,
)
from vlpref.resources import builtin_taxonomy, is_builtin
from vlpref.retry import RetryPolicy
from vlpref.yamlfile import Lines, format_loc, load_yaml

# Examples of field names that would hold a secret; the rule that refuses them (and any other
# credential name) anywhere in a config, whatever their value, is `is_credential_name`.
SECRET_FIELDS = frozenset(
    {"api_key", "apikey", "api-key", "token", "password", "secret", "access_key"}
)
# Mappings whose keys are names the user chooses (endpoints, taxonomy paths, splits, weights),
# not field names: a branch called "Privacy/Password theft" is no credential.
_USER_NAMED: frozenset[tuple[int | str, ...]] = frozenset(
    {
        ("endpoints",),
        ("stages", "images", "overrides"),
        ("stages", "publish", "splits"),
        ("stages", "pairs", "weights"),
        ("storage",),  # URL prefixes: a bucket named `s3://secrets` holds no secret
    }
)
# `storage:` fields that hold the *name* of an environment variable (named like credentials,
# holding none), checked as such by `_find_secrets`.
STORAGE_ENV_FIELDS = frozenset({"key_env", "secret_env", "token_env"})
# Fields whose input an error never quotes: the names of secrets, and what is sent with requests.
_UNQUOTED = (
    NAME_OF_SECRET_FIELDS | STORAGE_ENV_FIELDS | {"headers", "extra_body", "env", "extra_args"}
)
_USE_ENV = (
    "put the key in an environment variable and give its name as api_key_env (or a Prefect "
    "Secret block name as api_key_secret)"
)

Name = Annotated[
    str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@+-]*$")
]


# Upper bounds of the counts (docs/configuration.md, "Bounds"). Generous for any real run, they
# keep a typo (`per_branch: 1000000000`) from exhausting the machine before anything is sent.
MAX_MODELS = 64
# all-pairs judges and ranks k*(k-1)/2 pairs of a question's k samples: 32,640 at 256.
MAX_SAMPLES_PER_QUESTION = 256


def _distinct(value: tuple[str, ...]) -> tuple[str, ...]:
    repeated = sorted({v for v in value if value.count(v) > 1})
    if repeated:
        raise ValueError(f"{repeated[0]!r} is listed twice")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingConfig(_Strict):
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=128)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    stop: tuple[str, ...] = Field(default=(), max_length=16)

    def to_params(self) -> SamplingParams:
        return SamplingParams(**self.model_dump())


class Price(_Strict):
    """What a model's tokens cost, in the currency of your choice per million tokens (for `vlpref
    plan` and `budget: cost`). `cached_input_per_mtok` is accepted and kept, but not yet applied:
    vlpref's usage does not separate the prompt tokens an endpoint served from its cache, so every
    prompt token is priced at `input_per_mtok` (an upper bound on a cached prompt's cost)."""

    input_per_mtok: float = Field(ge=0, le=1e6)
    output_per_mtok: float = Field(ge=0, le=1e6)
    cached_input_per_mtok: float | None = Field(default=None, ge=0, le=1e6)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """The price of these tokens (one formula for the plan and the budget)."""
        return (
            prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok
        ) / 1e6


PLAN_ONLY_FIELDS = ("price", "image_tokens")
"""Model entry fields that inform plans and budgets only: never in a stage key or config hash."""


class ModelEntry(_Strict):
    """A model as the dataset names it (`name`) and as its endpoint serves it (`model`).

    `price` and `image_tokens` only inform the plan and budgets: they never change an answer, so
    they never enter a stage key. `image_tokens`: the prompt tokens one image costs this model
    (e.g. 576 for LLaVA-1.5); unset, the plan uses its provider kind's documented rule
    (vlpref/planning.py)."""

    name: Name
    endpoint: Name
    model: str = Field(min_length=1)
    sampling: SamplingConfig = SamplingConfig()
    price: Price | None = None
    image_tokens: int | None = Field(default=None, ge=1, le=100_000)


Structured = Literal["auto", "json_schema", "choice", "off"]
JudgeProtocolName = Literal["vlpref", "llama-guard", "shieldgemma", "md-judge"]


class GeneratorEntry(ModelEntry):
    """The model that writes captions and questions. `structured` asks its endpoint to constrain
    the question set to a JSON schema (`auto`, `json_schema` or `choice` all mean that here;
    `off` sends no constraint)."""

    structured: Structured = "auto"


def _unset(value: object) -> bool:
    return value is None


class SecondPass(_Strict):
    """What a `tier: second` judge is asked (docs/judging.md, "Tiered judging"). `band`: the
    responses whose first-pass P(unsafe) (combined over the first-pass judges by
    `stages.judge.aggregate`) lies inside it get this judge's safety verdict; None: none do.
    `pairs`: this judge decides what can end up in a published pair - it alone makes the
    pairwise comparisons the selection walks, and it gives its safety verdict and ratings for
    every response that can be published (the hinge set); false: the first pass compares pairs
    and this judge only settles the uncertain verdicts (a guard model as the second judge).
    `group_margin` (spa-vl, with `pairs`): a model whose safety rate lies within this of a model
    on the other side of a safety-group boundary gets this judge's safety verdict on all its
    responses of the branch, since the first pass's noise could move it to the other group (and
    change which pairs are cross-group); 0: never."""

    band: tuple[float, float] | None = (0.2, 0.8)
    pairs: bool = True
    group_margin: float = Field(default=0.05, ge=0.0, le=1.0)

    @field_validator("band")
    @classmethod
    def _band(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0.0 <= value[0] <= value[1] <= 1.0:
            raise ValueError("band: two probabilities, low <= high, within [0, 1]")
        return value


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
    # CLUE-style refinement of the safety verdict (our protocol; vlpref/calibration.py): `debias`
    # corrects P(unsafe) by the judge's prior for the question and image, read from one
    # content-free call per question; `cascade_band` sends a reasoning call for the responses
    # whose (debiased) P(unsafe) lies inside the band, and its verdict decides.
    debias: Literal["off", "content_free"] = "off"
    cascade_band: tuple[float, float] | None = None
    # Objectified rules (CLUE): ask one call per (response, rule of the branch's taxonomy node,
    # inherited) for P(violation), and replace P(unsafe) by their combination: `max` (the most
    # likely violation) or `noisy_or` (1 - prod(1 - p): any violation, assumed independent).
    # Debias, when on, corrects each rule's P by its own content-free call; the cascade then
    # looks at the combined P.
    rules: Literal["off", "max", "noisy_or"] = "off"
    # Tiered judging (docs/judging.md): a `second` judge is asked only where the decision hinges
    # (`second_pass`, filled with its defaults so a stage key always holds the policy in force);
    # the other judges (`first`, or no tier beside a `second`) are the first pass, asked for
    # every response. Both are left out of every dump while unset, so the stage keys and config
    # hash of a config without tiers are those it had before tiers existed.
    tier: Literal["first", "second"] | None = Field(default=None, exclude_if=_unset)
    second_pass: SecondPass | None = Field(default=None, exclude_if=_unset)

    @model_validator(mode="before")
    @classmethod
    def _second_pass_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("tier") == "second" and "second_pass" not in data:
            return {**data, "second_pass": {}}
        return data

    @model_validator(mode="after")
    def _band(self) -> JudgeEntry:
        band = self.cascade_band
        if band is not None and not 0.0 <= band[0] < band[1] <= 1.0:
            raise ValueError("cascade_band: two probabilities, low < high, within [0, 1]")
        refined = self.debias != "off" or band is not None or self.rules != "off"
        if refined and self.protocol != "vlpref":
            raise ValueError("debias, cascade_band and rules apply to the vlpref protocol only")
        if self.tier != "second":
            if self.second_pass is not None:
                raise ValueError("second_pass applies to a `tier: second` judge only")
            return self
        if refined:
            # Their calls go to every response; a second judge sees only the hinge set.
            raise ValueError("debias, cascade_band and rules apply to first-pass judges only")
        if self.second_pass is not None and self.second_pass.pairs and self.protocol != "vlpref":
            raise ValueError(
                "a guard model gives safety verdicts only: as the second judge it needs "
                "second_pass.pairs: false (the first pass compares the pairs)"
            )
        return self


class TypographicSource(_Strict):
    kind: Literal["typographic"] = "typographic"
    # 10,000: past 108 x (key phrase + keywords) variants they repeat (counted as duplicates),
    # and the stage holds a branch's images in memory.
    per_branch: int = Field(default=4, ge=1, le=10_000)
    size: int = Field(default=512, ge=64, le=4096)


class FolderSource(_Strict):
    """Images under `path/<class1>/<class2>/<class3>/*` (or a flat folder for one branch)."""

    kind: Literal["folder"]
    path: str
    # auto: flat when an override names exactly this branch, the class tree otherwise.
    layout: Literal["auto", "tree", "flat"] = "auto"
    root: str | None = Field(
        default=None,
        description="files (symlinks resolved) must lie under this folder; default: `path`",
    )


class ManifestSource(_Strict):
    """CSV, JSONL or Parquet rows with `path` or `url` and `class1..3` columns."""

    kind: Literal["manifest"]
    path: str
    root: str | None = Field(
        default=None,
        description="a row's `path` (symlinks resolved) must lie under this folder; "
        "default: the manifest's folder",
    )
    # Outbound requests (docs/security.md): by default a `url` row may not reach a loopback,
    # private, link-local, multicast or reserved address, checked at every redirect hop.
    allow_private: bool = Field(
        default=False, description="let URLs reach loopback, private and shared addresses"
    )
    allow_hosts: tuple[str, ...] = Field(
        default=(),
        max_length=1000,
        description="hostnames (`images.internal`, `*.internal`) and addresses or networks "
        "(`10.0.0.0/8`) that URLs may reach whatever they resolve to",
    )

    @field_validator("allow_hosts")
    @classmethod
    def _hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _check_allow_hosts(value)


def _check_allow_hosts(value: tuple[str, ...]) -> tuple[str, ...]:
    """`allow_hosts` entries: hostnames (`*.internal` too) or addresses and networks."""
    import ipaddress
    import re

    name = re.compile(r"(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_-]+)*\.?")
    for entry in value:
        try:
            ipaddress.ip_network(entry.strip().strip("[]"), strict=False)
            continue
        except ValueError:
            pass
        if not name.fullmatch(entry.strip()):
            raise ValueError(
                f"allow_hosts entry {entry!r} is neither a hostname (`images.internal`, "
                "`*.internal`) nor an address or network (`10.0.0.0/8`)"
            )
    return value


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return value


class KnnService(_Strict):
    """A clip-retrieval-compatible KNN service (`clip-retrieval back`, the way LAION indices are
    served): `url` is its `/knn-service` endpoint. The service itself is trusted like a model
    endpoint; the image URLs it answers are not, and are downloaded under the source's
    `allow_private` / `allow_hosts` (docs/security.md)."""

    url: str = Field(description="the service's /knn-service URL")
    indice_name: str = Field(min_length=1, max_length=200)
    modality: Literal["image", "text"] = Field(
        default="image", description="which embeddings of the index to search (image: pictures)"
    )
    deduplicate: bool = True
    # The service's NSFW screen: on, since nobody should collect sexual content by accident; a
    # safety dataset still wants violence, weapons and drugs, so the violence detector is off.
    use_safety_model: bool = True
    use_violence_detector: bool = False
    aesthetic_score: int | None = Field(default=None, ge=0, le=9)
    aesthetic_weight: float | None = Field(default=None, ge=0, le=1)
    timeout_s: float = Field(default=60.0, gt=0, le=3600)
    attempts: int = Field(default=3, ge=1, le=20)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value)


class RetrievalSource(_Strict):
    """Images retrieved per branch by CLIP similarity to queries made from the branch's key
    phrase and keywords (SPA-VL's recipe): from a local index that `vlpref index build` made
    over your own images (`index`, the embedded default) or from a clip-retrieval KNN service
    (`service`). docs/images.md has both."""

    kind: Literal["retrieval"]
    index: str | None = Field(default=None, description="a folder made by `vlpref index build`")
    model: str | None = Field(
        default=None,
        description="the open_clip model folder that embeds the queries; default: the one "
        "the index was built with (it must be that model)",
    )
    service: KnnService | None = None
    queries: tuple[Literal["key_phrase", "keywords"], ...] = Field(
        default=("key_phrase", "keywords"), min_length=1, max_length=2
    )
    query_template: str = Field(
        default="{query}", max_length=500, description="each query's text; `{query}` is replaced"
    )
    top_k: int = Field(default=8, ge=1, le=1000, description="results asked per query")
    per_branch: int = Field(default=16, ge=1, le=10_000, description="images kept per branch")
    min_similarity: float | None = Field(
        default=None, ge=-1, le=1, description="results less similar than this are dropped"
    )
    root: str | None = Field(
        default=None,
        description="embedded index: the folder its images must lie in (symlinks resolved); "
        "default: the folder the index was built over",
    )
    allow_private: bool = Field(
        default=False, description="let the service's URLs reach loopback and private addresses"
    )
    allow_hosts: tuple[str, ...] = Field(
        default=(),
        max_length=1000,
        description="hostnames and networks the service's URLs may reach whatever they resolve to",
    )

    @field_validator("allow_hosts")
    @classmethod
    def _hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _check_allow_hosts(value)

    @model_validator(mode="after")
    def _one_backend(self) -> RetrievalSource:
        if (self.index is None) == (self.service is None):
            raise ValueError("give exactly one of `index` (a local index) and `service`")
        if self.service is not None and (self.model is not None or self.root is not None):
            raise ValueError("`model` and `root` belong to a local `index`, not a `service`")
        if "{query}" not in self.query_template:
            raise ValueError("query_template must contain {query}")
        return self


class GenerateSource(_Strict):
    """Images generated per branch by an OpenAI-compatible image endpoint
    (`/v1/images/generations`): one prompt per image from the template `template` (in the
    prompts folder), through the model seam's journal, retries, rate limits and budget."""

    kind: Literal["generate"]
    endpoint: Name = Field(description="an entry of `endpoints:` (kind openai)")
    model: str = Field(min_length=1, max_length=200)
    # The name budgets know it by (`budget.per_model`), like a model entry's.
    name: Name = "image-generator"
    template: str = Field(default="image_generation", pattern=r"^[A-Za-z0-9_.-]+$")
    per_branch: int = Field(default=4, ge=1, le=1000)
    size: str = Field(default="1024x1024", pattern=r"^(auto|[1-9][0-9]{1,4}x[1-9][0-9]{1,4})$")
    quality: str | None = Field(default=None, max_length=40)
    style: str | None = Field(default=None, max_length=40)
    # OpenAI's image API has no seed (and refuses unknown fields); many local diffusion servers
    # take one. Set, image i of a branch is asked with seed + i.
    seed: int | None = None
    extra_body: dict[str, Any] = Field(default_factory=dict, max_length=32)
    # Image APIs are paced apart from chat (OpenAI counts images per minute): unset, the
    # endpoint's own concurrency and rpm apply to image requests separately.
    concurrency: int | None = Field(default=None, ge=1, le=256)
    rpm: float | None = Field(default=None, gt=0)


ImageSource = Annotated[
    TypographicSource | FolderSource | ManifestSource | RetrievalSource | GenerateSource,
    Field(discriminator="kind"),
]


class ImageFilterSpec(BaseModel):
    """One image filter: its `name` (a built-in or a `vlpref.image_filters` plug-in) and its
    options, which the filter validates itself (so extra keys are allowed here)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(min_length=1, max_length=100)


class ImagesStage(_Strict):
    source: ImageSource = TypographicSource()
    overrides: dict[str, ImageSource] = Field(
        default_factory=dict,
        max_length=10_000,
        description="taxonomy path prefix -> source for that branch",
    )
    max_side: int = Field(default=1024, ge=64, le=8192)
    # Raw bytes in flight are bounded by (download_concurrency + CPU workers) x max_bytes.
    max_bytes: int = Field(default=20_000_000, ge=1024, le=50_000_000)
    download_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    # Read by the images stage (tasks/images.py, vlpref/images/).
    min_side: int = Field(
        default=32, ge=1, le=8192, description="smallest side kept, after bounding"
    )
    max_pixels: int = Field(
        default=64_000_000,
        ge=1,
        le=100_000_000,
        description="larger images are refused unread (bomb guard)",
    )
    encoding: Literal["auto", "png", "jpeg"] = "auto"  # auto: JPEG for lossy inputs, else PNG
    download_attempts: int = Field(default=3, ge=1, le=20)
    download_concurrency: int = Field(default=16, ge=1, le=64)
    # Memory, not speed: a 7,999 x 7,999 PNG of 62 KB decodes to ~256 MB of RGB. The process's
    # decodes share this many pixels; an image over it decodes alone (vlpref/images/normalize.py).
    decode_pixel_budget: int = Field(
        default=64_000_000,
        ge=1_000_000,
        le=1_000_000_000,
        description="pixels being decoded at once, all branches together (bounds memory)",
    )
    # Near-duplicates and screening (vlpref/images/dedupe.py, filters.py; docs/images.md).
    # 10 = vlpref.images.dedupe.DEFAULT_DISTANCE, measured there (not imported: config stays light).
    near_duplicate_distance: int = Field(
        default=10,
        ge=0,
        le=32,
        description="perceptual-hash bits within which an image repeats a kept one (0: off)",
    )
    filters: tuple[ImageFilterSpec, ...] = Field(default=(), max_length=64)

    @field_validator("filters")
    @classmethod
    def _known_filters(cls, value: tuple[ImageFilterSpec, ...]) -> tuple[ImageFilterSpec, ...]:
        from vlpref.images.filters import check_specs  # plug-ins load only when configured

        check_specs([spec.model_dump() for spec in value])
        return value


class QuestionsStage(_Strict):
    types: tuple[Literal["easy", "hardq", "hards"], ...] = Field(
        default=("easy", "hardq", "hards"), max_length=3
    )
    max_attempts: int = Field(default=3, ge=1, le=20)

    @field_validator("types")
    @classmethod
    def _distinct_types(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _distinct(value)


class JudgeStage(_Strict):
    safety: bool = True
    aspects: tuple[Literal["harmlessness", "helpfulness", "faithfulness"], ...] = Field(
        default=("harmlessness", "helpfulness", "faithfulness"), max_length=3
    )
    pairwise: bool = True
    max_pairs_per_question: int = Field(default=6, ge=0, le=1000)
    max_attempts: int = Field(
        default=3, ge=1, le=20, description="asks per judgment when unparseable"
    )
    # How several judges' safety verdicts combine into a response's P(unsafe): the mean
    # probability, the share of judges whose verdict is unsafe (majority: > 0.5), or the highest
    # probability (any judge that finds it unsafe makes it unsafe).
    aggregate: Literal["mean", "majority", "any_unsafe"] = "mean"

    @field_validator("aspects")
    @classmethod
    def _distinct_aspects(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _distinct(value)


class PairsStage(_Strict):
    policy: Literal["spa-vl", "max-margin", "all-pairs"] = "spa-vl"
    min_margin: float = Field(default=0.5, ge=0)
    safety_groups: int = Field(default=5, ge=2, le=MAX_MODELS)
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
    never_chosen: tuple[str, ...] = Field(  # finish reasons never chosen
        default=("length", "content_filter"), max_length=16
    )
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
        default_factory=lambda: {"train": 0.8, "validation": 0.1, "test": 0.1}, max_length=16
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


class JudgeEvalConfig(_Strict):
    """Defaults of `vlpref judge-eval` (its options override them): the labelled file's column
    mapping (logical name -> the file's column, docs/judging.md, "Judge evaluation"), the kind
    of labels and the false-positive rate the threshold is chosen for."""

    columns: dict[str, str] = Field(default_factory=dict, max_length=16)
    kind: Literal["safety", "pairwise", "rating"] = "safety"
    target_fpr: float = Field(default=0.05, ge=0, le=1)


ExportFormat = Literal["trl", "llamafactory", "swift", "listwise"]


class ExportEntry(_Strict):
    """One export written with every version (`vlpref export`'s options, docs/export.md)."""

    format: ExportFormat
    name: Name | None = None  # the folder under the export root (default: the format)
    splits: tuple[str, ...] = Field(default=(), max_length=16)
    categories: tuple[str, ...] = Field(default=(), max_length=10_000)
    min_margin: float | None = None
    min_confidence: float | None = Field(default=None, ge=0, le=1)
    consistent_only: bool = False


class Exports(_Strict):
    """`exports:`: trainer formats written after each publish into `<dir>/<version_id>/<name>`.
    `dir` (relative to the config file) defaults to `<store>/exports` for a local store. An
    export changes nothing in the version, so none of this enters its hash or keys."""

    dir: str | None = None
    formats: tuple[ExportEntry, ...] = Field(default=(), max_length=16)

    @model_validator(mode="after")
    def _distinct(self) -> Exports:
        folders = [e.name or e.format for e in self.formats]
        repeated = sorted({f for f in folders if folders.count(f) > 1})
        if repeated:
            raise ValueError(f"exports share folders {repeated}: give each a distinct `name`")
        return self


class BudgetLimits(_Strict):
    """Limits on what is sent: requests, tokens (prompt + completion, as the endpoint bills
    them) and cost (by the models' `price`). Unset: no limit."""

    requests: int | None = Field(default=None, ge=1, le=10**12)
    tokens: int | None = Field(default=None, ge=1, le=10**15)
    cost: float | None = Field(default=None, gt=0, le=1e12)


class Budget(BudgetLimits):
    """`budget:`: limits for the whole run, and per model or judge by its `name` (`per_model`).
    At a limit the run stops sending, lets the requests in flight finish into the journal,
    publishes nothing, and says what was spent (vlpref/budget.py)."""

    per_model: dict[Name, BudgetLimits] = Field(default_factory=dict, max_length=MAX_MODELS + 17)


_S3 = ("s3", "s3a")  # the protocols whose options StorageLocation names


class StorageLocation(_Strict):
    """fsspec options for the workspace, journal and store locations under one URL prefix
    (`storage: {"s3://bucket": {...}}`, docs/cluster.md). The named fields are s3fs's (any
    S3-compatible store); `options` goes to the backend as written, for anything else.
    Credentials are the *names* of environment variables, read on each host where a filesystem
    is opened (vlpref/fs.py), so the config that travels to the workers holds none."""

    endpoint_url: str | None = Field(default=None, description="e.g. http://minio.internal:9000")
    region: str | None = Field(default=None, max_length=64)
    anon: bool | None = Field(default=None, description="unsigned requests (a public bucket)")
    key_env: str | None = Field(default=None, description="variable holding the access key id")
    secret_env: str | None = Field(default=None, description="variable holding the secret key")
    token_env: str | None = Field(default=None, description="variable holding a session token")
    options: dict[str, Any] = Field(default_factory=dict, max_length=64)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        if "@" in value.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError("credentials in a URL are refused: name variables in key_env etc.")
        return value

    @model_validator(mode="after")
    def _pairs(self) -> StorageLocation:
        if (self.key_env is None) != (self.secret_env is None):
            raise ValueError("key_env and secret_env go together (an access key id and its secret)")
        return self

    def named(self) -> dict[str, object]:
        """The named fields that are set."""
        fields = ("endpoint_url", "region", "anon", *sorted(STORAGE_ENV_FIELDS))
        return {f: getattr(self, f) for f in fields if getattr(self, f) is not None}

    def fsspec_options(self, protocol: str) -> dict[str, Any]:
        """fsspec's keyword arguments, the credentials read from this process's environment
        now: on a worker, its own variables."""
        import os
        import socket

        out: dict[str, Any] = dict(self.options)
        if protocol not in _S3:
            return out
        env = {"key": self.key_env, "secret": self.secret_env, "token": self.token_env}
        for option, name in env.items():
            if name is None:
                continue
            value = os.environ.get(name)
            if not value:
                raise ConfigError(
                    f"storage: {name} is not set on {socket.gethostname()}: it is named as "
                    f"{option}_env for a {protocol}:// location; set it on every host that runs "
                    "the flow or its tasks (docs/cluster.md)"
                )
            out[option] = value
        if self.endpoint_url is not None:
            out["endpoint_url"] = self.endpoint_url
        if self.anon is not None:
            out["anon"] = self.anon
        if self.region is not None:
            out["client_kwargs"] = {**out.get("client_kwargs", {}), "region_name": self.region}
        return out


class Storage(RootModel[dict[str, StorageLocation]]):
    """`storage:` by URL prefix. Each process that holds a config opens filesystems with its
    options (`vlpref.fs.use_storage`): when the config is validated, and when it is unpickled on
    a Dask or Ray worker as a task's argument, so the options reach every worker without
    environment variables set there for them."""

    model_config = ConfigDict(frozen=True)
    root: dict[str, StorageLocation] = Field(default_factory=dict, max_length=64)

    @model_validator(mode="after")
    def _prefixes(self) -> Storage:
        import fsspec

        for prefix, location in self.root.items():
            protocol, sep, rest = prefix.partition("://")
            if not sep or not rest.strip("/"):
                raise _LocatedError(
                    ("storage", prefix),
                    "expected a URL prefix such as s3://bucket or s3://bucket/team",
                )
            if "@" in rest.split("/", 1)[0]:
                raise _LocatedError(("storage", prefix), "credentials in a URL are refused")
            if protocol not in fsspec.available_protocols():
                raise _LocatedError(("storage", prefix), f"unknown fsspec protocol {protocol!r}")
            if protocol not in _S3 and location.named():
                raise _LocatedError(
                    ("storage", prefix, next(iter(location.named()))),
                    f"the named fields are s3fs's (s3:// locations); give {protocol}:// "
                    "options under `options`",
                )
        return self

    def model_post_init(self, context: Any, /) -> None:
        from vlpref.fs import use_storage

        use_storage(self.root)

    def __setstate__(self, state: dict[Any, Any]) -> None:
        from vlpref.fs import use_storage

        super().__setstate__(state)
        use_storage(self.root)


class RunConfig(_Strict):
    name: Name
    taxonomy: str
    workspace: str = ".vlpref/workspace"
    store: str = ".vlpref/store"
    endpoints: dict[Name, dict[str, Any]] = Field(max_length=64)
    judge_eval: JudgeEvalConfig = JudgeEvalConfig()
    models: tuple[ModelEntry, ...] = Field(min_length=1, max_length=MAX_MODELS)
    generator: GeneratorEntry
    judges: tuple[JudgeEntry, ...] = Field(min_length=1, max_length=16)
    stages: StagesConfig = StagesConfig()
    prompts_dir: str | None = Field(
        default=None, description="folder of prompt templates; the shipped prompts/ by default"
    )
    only: tuple[str, ...] = Field(default=(), max_length=10_000)
    # 4, not 8: in the 3,000-question scale run both gave 1,175 req/s, and 4 peaked at 575 MB
    # against 822 (bench/scale_run.py). One branch's judge stage alone keeps 256 requests busy.
    parallel_branches: int = Field(
        default=4, ge=1, le=64, description="branches in flight at once (bounds memory, not speed)"
    )
    # 8,000: at 30,000 questions x 12 models (7,400 samples per branch) one branch answering at a
    # time ran at 1,682 req/s with a 517 MB peak, two at 1,556 req/s and 600 MB (six branches,
    # bench/scale_run.py --branches 6); at 3,000 questions (740 per branch) four still answer.
    responses_in_flight: int = Field(
        default=8000,
        ge=1,
        le=100_000,
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
        le=10_000,
        description="a batch (one stage's requests for one model) stops sending once its first "
        "this-many sent requests all failed alike for a reason retrying cannot heal; 0: never",
    )
    source_file: str | None = Field(default=None, exclude=True)
    # Operational too: a budget limits what one run sends, never what a version holds.
    budget: Budget = Budget()
    exports: Exports = Exports()
    # Operational: where files live, and how to open them there.
    storage: Storage = Field(default_factory=Storage)

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
    def _samples(self) -> RunConfig:
        if self.samples_per_question > MAX_SAMPLES_PER_QUESTION:
            raise _LocatedError(
                ("models",),
                f"{self.samples_per_question} response samples per question (the sum of the "
                f"models' sampling.n) is more than {MAX_SAMPLES_PER_QUESTION}",
            )
        return self

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
        # An image-generation source sends requests too: its endpoint must exist before any does.
        images = self.stages.images
        sources = [(("stages", "images", "source"), images.source)] + [
            (("stages", "images", "overrides", prefix), source)
            for prefix, source in images.overrides.items()
        ]
        for loc, source in sources:
            if isinstance(source, GenerateSource) and source.endpoint not in self.endpoints:
                known = ", ".join(sorted(self.endpoints)) or "none"
                raise _LocatedError(
                    (*loc, "endpoint"), f"unknown endpoint {source.endpoint!r} (defined: {known})"
                )
        # A second judge decides what a first pass leaves open: without one it has nothing to do.
        seconds = [i for i, j in enumerate(self.judges) if j.tier == "second"]
        if seconds and len(seconds) == len(self.judges):
            raise _LocatedError(
                ("judges", seconds[0], "tier"),
                "a `tier: second` judge needs a first-pass judge beside it (`tier: first` or none)",
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
        plan_only = set(PLAN_ONLY_FIELDS)  # price and image_tokens shape no row
        operational = (
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
            "judge_eval",
            "budget",
            "exports",
            "storage",
        )
        exclude: dict[str, Any] = {name: True for name in operational}
        exclude.update(
            models={"__all__": plan_only}, generator=plan_only, judges={"__all__": plan_only}
        )
        payload = self.model_dump(mode="json", exclude=exclude)
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


class _LocatedError(ValueError):
    def __init__(self, loc: tuple[int | str, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


def _find_secrets(
    data: Any, loc: tuple[int | str, ...] = ()
) -> tuple[tuple[int | str, ...], str] | None:
    """The first secret written in a config (where, and what the error says), or None. The value
    found is never part of the message."""
    if isinstance(data, dict):
        user_named = loc in _USER_NAMED
        for key, value in data.items():
            here = (*loc, key)
            if isinstance(key, str) and contains_secret(key):
                return here, f"this name looks like an API key or token (not shown); {_USE_ENV}"
            if loc[:1] == ("storage",) and len(loc) == 2 and key in STORAGE_ENV_FIELDS:
                if isinstance(value, str) and not is_env_var_name(value):
                    return here, (
                        "expected the NAME of an environment variable (such as "
                        "AWS_SECRET_ACCESS_KEY) that holds the credential, not the credential "
                        "itself; the value is not shown"
                    )
                continue
            if isinstance(key, str) and not user_named and is_credential_name(key):
                return here, (
                    "secrets may not be written in a config file (this field is named like a "
                    f"credential; docs/security.md); {_USE_ENV}"
                )
            if key == "api_key_env" and isinstance(value, str) and not is_env_var_name(value):
                return here, (
                    "expected the NAME of an environment variable (letters, digits and '_', not "
                    "starting with a digit) that holds the key, not the key itself; the value is "
                    "not shown"
                )
            if key == "api_key_secret" and isinstance(value, str) and not is_block_name(value):
                return here, (
                    "expected the name of a Prefect Secret block (lowercase letters, digits and "
                    "'-') that holds the key, not the key itself; the value is not shown"
                )
            found = _find_secrets(value, here)
            if found:
                return found
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found = _find_secrets(value, (*loc, index))
            if found:
                return found
    elif isinstance(data, str) and contains_secret(data):
        return loc, f"this value looks like an API key or token (not shown); {_USE_ENV}"
    return None


def _written_loc(data: Any, loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """`loc` as the file writes it: without the `kind` value that pydantic puts in the path of a
    tagged union (`stages.images.source.typographic.per_branch` -> `...source.per_branch`)."""
    out: list[int | str] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get("kind") == part:
            continue
        out.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            node = None
    return tuple(out)


def _error(file: str, lines: Lines, loc: tuple[int | str, ...], message: str) -> ConfigError:
    line = lines.line(loc)
    where = f"line {line}: " if line else ""
    # Redacted: a mapping key the user named (an endpoint, a storage URL) may hold a password.
    return ConfigError(f"{where}{message}", file=file, field=redact(format_loc(loc)))


def _resolve_path(base: Path | str, value: str) -> str:
    """`value` against the config's folder: a local folder, or a URI's (a config read from
    shared storage names what lies beside it there)."""
    if "://" in value or Path(value).is_absolute():
        return value
    if isinstance(base, str):
        protocol, _, inside = base.partition("://")
        return f"{protocol}://{posixpath.normpath(posixpath.join(inside, value))}"
    return str((base / value).resolve())


def _resolve_taxonomy(base: Path | str, value: str) -> str:
    """`builtin:<name>` is the taxonomy file vlpref ships (the name was checked on validation)."""
    return str(builtin_taxonomy(value)) if is_builtin(value) else _resolve_path(base, value)


def parse_config(
    data: Any,
    *,
    file: str = "<config>",
    lines: Lines | None = None,
    base_dir: Path | str | None = None,
) -> RunConfig:
    """Validate an already-parsed config mapping."""
    lines = lines or Lines(None)
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping at the top level", file=file)
    secret = _find_secrets(data)
    if secret:
        raise _error(file, lines, *secret)
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = _written_loc(data, tuple(first["loc"]))
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
        return redact(str(ctx_error))
    message = str(error["msg"])
    if error["type"] == "extra_forbidden":
        return "unknown field (check the spelling; see docs/configuration.md)"
    if error["type"] == "missing":
        return "required field is missing"
    got = error.get("input")
    quoted = not any(part in _UNQUOTED for part in error.get("loc", ()) if isinstance(part, str))
    if quoted and not isinstance(got, dict | list):
        message += f" (got {got!r})"
    # A plug-in's message may quote its input: key shapes are redacted wherever they appear.
    return redact(message)


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a run config; relative paths inside it are resolved against its folder.

    `path` may be an fsspec URI, so that every worker of a cluster reads one config from shared
    storage (docs/cluster.md): `file://` is a local path; for `s3://...` and the like, relative
    locations in it (the taxonomy, workspace, store) lie beside it there. The config is read
    before its own `storage:` options are known: its location is opened with the backend's
    usual environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)."""
    location = str(path)
    if location.startswith("file://"):
        location = location.removeprefix("file://")
    if "://" not in location:
        local = Path(location)
        data, lines = load_yaml(local)
        return parse_config(data, file=str(local), lines=lines, base_dir=local.resolve().parent)
    data, lines = load_yaml(location)
    base = location.rsplit("/", 1)[0]
    prompts_dir = data.get("prompts_dir") if isinstance(data, dict) else None
    if prompts_dir and not Path(str(prompts_dir)).is_absolute():
        raise _error(
            location,
            lines,
            ("prompts_dir",),
            "prompt templates are read from local files: a config read from shared storage "
            "names its prompts_dir by an absolute path that exists on every worker",
        )
    return parse_config(data, file=location, lines=lines, base_dir=base)
