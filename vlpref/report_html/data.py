"""What the report shows, computed from a version's tables and manifest.

`read_version` is the only function here that reads files: it reads the columns the figures need
(never image bytes, response texts or the judges' raw answers, which are most of a version's
bytes) into a `VersionData`. Everything else is a pure function of Arrow tables or the manifest,
tested against hand-computed values.

Definitions (the report states them beside each figure):

- category: `class1 / class2`, as the store's split counts name it (SPA-VL's harm domain and
  category; class3, the subcategory, is one taxonomy branch);
- unsafe rate: safety judgments with verdict `unsafe` over all safety judgments of the model's
  responses, every judge counted, as the manifest's `model_safety` counts them;
- win rate of model A over model B: pairs with A chosen and B rejected over all pairs between the
  two, either way round; a same-model pair (two samples of one model) is counted on the diagonal
  and has no rate;
- pairwise consistency (per judge): of the response pairs the judge compared in both orders, the
  share where both orders prefer the same response (`vlpref.judging.combine_orders`);
  position-bias rate: the share where both orders prefer the same *slot* (A both times or B both
  times), i.e. the verdict followed the position, not the response; a 0.5 answer is a tie and
  neither; first-slot rate: the share of single pairwise verdicts that pick A (0.5 unbiased).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import pyarrow as pa
import pyarrow.compute as pc

from vlpref.judging import combine_orders
from vlpref.run_summary import RunSummary, summarize

if TYPE_CHECKING:
    from vlpref.store import Version

__all__ = [
    "GALLERY_MAX",
    "GALLERY_PER_CATEGORY",
    "RATING_LEVELS",
    "BranchStages",
    "Distribution",
    "JudgeConsistency",
    "Matrix",
    "ModelUsage",
    "VersionData",
    "category",
    "chosen_rejected",
    "distribution",
    "gallery_sample",
    "judge_consistency",
    "judge_usage",
    "rating_counts",
    "read_version",
    "run_summary",
    "stage_rows",
    "unsafe_matrix",
    "usage_by_model",
    "win_matrix",
]

# The gallery shows at most GALLERY_PER_CATEGORY quadruples of a category and GALLERY_MAX in all
# (fewer per category when a taxonomy has many): SPA-VL's 13 categories give 104 thumbnails,
# whatever the version's size, and the page stays a few MB.
GALLERY_PER_CATEGORY: Final = 8
GALLERY_MAX: Final = 160
RATING_LEVELS: Final = ("1", "2", "3", "4", "5")
OTHER_RATING: Final = "no rating"  # a rating judgment whose verdict is not 1..5 (unparsed)
STAGES: Final = ("images", "questions", "responses", "judge", "pairs")

QUESTION_COLUMNS: Final = ["question_id", "class1", "class2"]
RESPONSE_COLUMNS: Final = [
    "response_id",
    "question_id",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "cached",
    "call_id",
]
JUDGMENT_COLUMNS: Final = [
    "kind",
    "response_id",
    "other_response_id",
    "aspect",
    "judge",
    "verdict",
    "score",
]
PAIR_COLUMNS: Final = [
    "pair_id",
    "chosen_model",
    "rejected_model",
    "margin",
    "confidence",
    "consistent",
]
# The quadruples without `image` (the bytes are read for the gallery's sample only).
QUADRUPLE_COLUMNS: Final = [
    "question",
    "chosen",
    "rejected",
    "class1",
    "class2",
    "class3",
    "question_type",
    "question_id",
    "image_id",
    "branch_id",
    "pair_id",
    "chosen_model",
    "rejected_model",
    "chosen_response_id",
    "rejected_response_id",
    "margin",
    "confidence",
    "consistent",
    "chosen_p_unsafe",
    "rejected_p_unsafe",
    "chosen_overall",
    "rejected_overall",
    "chosen_harmlessness",
    "rejected_harmlessness",
    "chosen_helpfulness",
    "rejected_helpfulness",
]


@dataclass(frozen=True)
class Matrix:
    """A table of numbers with named rows and columns; `None` where there is no data.
    `counts[i][j]` is how many items `values[i][j]` was computed from."""

    rows: tuple[str, ...]
    columns: tuple[str, ...]
    values: tuple[tuple[float | None, ...], ...]
    counts: tuple[tuple[int, ...], ...]

    def value(self, row: str, column: str) -> float | None:
        return self.values[self.rows.index(row)][self.columns.index(column)]

    def count(self, row: str, column: str) -> int:
        return self.counts[self.rows.index(row)][self.columns.index(column)]


@dataclass(frozen=True)
class Distribution:
    """The finite values of a column, and how many rows had none (null or NaN)."""

    values: tuple[float, ...]
    missing: int

    @property
    def mean(self) -> float | None:
        return sum(self.values) / len(self.values) if self.values else None

    @property
    def median(self) -> float | None:
        if not self.values:
            return None
        ordered = sorted(self.values)
        mid = len(ordered) // 2
        return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


@dataclass(frozen=True)
class JudgeConsistency:
    judge: str
    verdicts: int  # pairwise verdicts with a probability
    first_slot: int  # of those, how many preferred the response shown first (A)
    both_orders: int  # response pairs compared in both orders
    consistent: int
    same_slot: int  # both orders preferred the same position
    ties: int  # one order answered exactly 0.5

    @property
    def first_slot_rate(self) -> float | None:
        return self.first_slot / self.verdicts if self.verdicts else None

    @property
    def consistency_rate(self) -> float | None:
        return self.consistent / self.both_orders if self.both_orders else None

    @property
    def position_bias_rate(self) -> float | None:
        return self.same_slot / self.both_orders if self.both_orders else None


@dataclass(frozen=True)
class ModelUsage:
    """A response model's calls: requests sent to the endpoint and answered from the journal
    (distinct `call_id`s: n > 1 samples share one call), and their tokens."""

    model: str
    samples: int
    requests_sent: int
    requests_journal: int
    prompt_tokens_sent: int
    completion_tokens_sent: int
    prompt_tokens_journal: int
    completion_tokens_journal: int


@dataclass(frozen=True)
class BranchStages:
    """One branch's row: its taxonomy path, publish status and each stage's counts."""

    path: str
    status: str
    stages: dict[str, dict[str, Any]]


@dataclass
class VersionData:
    """The columns the report reads, for the whole version (see `read_version`)."""

    manifest: dict[str, Any]
    questions: pa.Table
    responses: pa.Table
    judgments: pa.Table
    pairs: pa.Table
    failures: pa.Table
    quadruples: pa.Table  # every split's quadruples without `image`, plus a `split` column
    parent_manifest: dict[str, Any] | None = None
    parent_error: str | None = None  # why the parent's manifest could not be read
    notes: list[str] = field(default_factory=list)


def category(class1: str | None, class2: str | None) -> str:
    return f"{class1} / {class2}"


def _category_column(tbl: pa.Table) -> pa.Array | pa.ChunkedArray:
    return pc.binary_join_element_wise(
        pc.fill_null(tbl["class1"], "None"), pc.fill_null(tbl["class2"], "None"), " / "
    )


def read_version(version: Version) -> VersionData:
    """A version's tables, the columns the report needs only, with the parent's manifest when
    the version has a parent in the same store."""
    splits = []
    for name in version.splits:
        tbl = version.split(name, QUADRUPLE_COLUMNS)
        splits.append(tbl.append_column("split", pa.array([name] * tbl.num_rows, pa.string())))
    quadruples = pa.concat_tables(splits) if splits else _empty_quadruples()
    data = VersionData(
        manifest=version.manifest,
        questions=version.table("questions", QUESTION_COLUMNS),
        responses=version.table("responses", RESPONSE_COLUMNS),
        judgments=version.table("judgments", JUDGMENT_COLUMNS),
        pairs=version.table("pairs", PAIR_COLUMNS),
        failures=version.table("failures"),
        quadruples=quadruples,
    )
    parent = version.manifest.get("parent")
    if parent:
        from vlpref.errors import StoreError

        try:
            data.parent_manifest = version.store.open(parent).manifest
        except (StoreError, OSError) as exc:
            data.parent_error = str(exc)
    return data


def _empty_quadruples() -> pa.Table:
    from vlpref.publish.rows import QUADRUPLES

    fields = [QUADRUPLES.field(name) for name in QUADRUPLE_COLUMNS]
    return pa.schema([*fields, pa.field("split", pa.string())]).empty_table()


# --- safety -------------------------------------------------------------------------------------


def _ordered(found: Iterable[str], preferred: Sequence[str]) -> tuple[str, ...]:
    """`found` in the order of `preferred` (the config's), anything else after it, sorted."""
    have = set(found)
    first = [name for name in preferred if name in have]
    return (*first, *sorted(have - set(first)))


def unsafe_matrix(
    responses: pa.Table,
    questions: pa.Table,
    judgments: pa.Table,
    models: Sequence[str] = (),
) -> Matrix:
    """Unsafe rate per response model (rows, in `models`' order) and category (columns, every
    category that has a question); None where a model has no safety judgment in a category."""
    categories = sorted(set(_category_column(questions).to_pylist())) if questions.num_rows else []
    safety = judgments.filter(pc.equal(judgments["kind"], "safety")).select(
        ["response_id", "verdict"]
    )
    joined = safety.join(
        responses.select(["response_id", "question_id", "model"]), "response_id", join_type="inner"
    ).join(questions.select(["question_id", "class1", "class2"]), "question_id", join_type="inner")
    unsafe = pc.cast(pc.fill_null(pc.equal(joined["verdict"], "unsafe"), False), pa.int64())
    grouped = (
        pa.table({"model": joined["model"], "category": _category_column(joined), "u": unsafe})
        .group_by(["model", "category"])
        .aggregate([("u", "sum"), ("u", "count")])
        .to_pylist()
    )
    cells = {(g["model"], g["category"]): (g["u_sum"], g["u_count"]) for g in grouped}
    rows = _ordered(responses["model"].to_pylist(), models)
    values, counts = [], []
    for model in rows:
        row_values: list[float | None] = []
        row_counts: list[int] = []
        for cat in categories:
            n_unsafe, n = cells.get((model, cat), (0, 0))
            row_values.append(n_unsafe / n if n else None)
            row_counts.append(n)
        values.append(tuple(row_values))
        counts.append(tuple(row_counts))
    return Matrix(tuple(rows), tuple(categories), tuple(values), tuple(counts))


# --- pairs --------------------------------------------------------------------------------------


def win_matrix(pairs: pa.Table, models: Sequence[str] = ()) -> Matrix:
    """Win rate of the row model over the column model (see the module docstring); `counts`
    holds the pairs between the two (either way round; on the diagonal, same-model pairs)."""
    wins: Counter[tuple[str, str]] = Counter(
        zip(pairs["chosen_model"].to_pylist(), pairs["rejected_model"].to_pylist(), strict=True)
    )
    names = _ordered({m for pair in wins for m in pair}, models)
    values, counts = [], []
    for a in names:
        row_values: list[float | None] = []
        row_counts: list[int] = []
        for b in names:
            if a == b:
                row_values.append(None)
                row_counts.append(wins[(a, a)])
                continue
            n = wins[(a, b)] + wins[(b, a)]
            row_values.append(wins[(a, b)] / n if n else None)
            row_counts.append(n)
        values.append(tuple(row_values))
        counts.append(tuple(row_counts))
    return Matrix(names, names, tuple(values), tuple(counts))


def chosen_rejected(pairs: pa.Table, models: Sequence[str] = ()) -> list[tuple[str, int, int]]:
    """(model, times chosen, times rejected) for every model in a pair, in `models`' order."""
    chosen = Counter(pairs["chosen_model"].to_pylist())
    rejected = Counter(pairs["rejected_model"].to_pylist())
    return [(m, chosen[m], rejected[m]) for m in _ordered({*chosen, *rejected}, models)]


def distribution(column: pa.ChunkedArray | pa.Array) -> Distribution:
    values = [float(v) for v in column.to_pylist() if v is not None and math.isfinite(v)]
    return Distribution(tuple(values), len(column) - len(values))


# --- judgments ----------------------------------------------------------------------------------


def rating_counts(judgments: pa.Table) -> dict[str, dict[str, int]]:
    """aspect -> {"1".."5": rating judgments with that verdict, OTHER_RATING: the rest}."""
    ratings = judgments.filter(pc.equal(judgments["kind"], "rating"))
    out: dict[str, dict[str, int]] = {}
    grouped = ratings.group_by(["aspect", "verdict"], use_threads=False).aggregate(
        [("kind", "count")]
    )
    for row in sorted(grouped.to_pylist(), key=lambda r: (str(r["aspect"]), str(r["verdict"]))):
        counts = out.setdefault(
            str(row["aspect"]), dict.fromkeys((*RATING_LEVELS, OTHER_RATING), 0)
        )
        level = row["verdict"] if row["verdict"] in RATING_LEVELS else OTHER_RATING
        counts[level] += row["kind_count"]
    return out


def _slot(p: float) -> int:
    """+1 the first shown response preferred, -1 the second, 0 a tie."""
    return (p > 0.5) - (p < 0.5)


def judge_consistency(judgments: pa.Table) -> list[JudgeConsistency]:
    """Per judge, the pairwise verdicts' first-slot rate, consistency and position-bias rates
    (module docstring), from the judgments of kind `pairwise`."""
    pairwise = judgments.filter(pc.equal(judgments["kind"], "pairwise"))
    by_order: dict[str, dict[tuple[str, str], float]] = defaultdict(dict)
    for judge, first, second, score in zip(
        pairwise["judge"].to_pylist(),
        pairwise["response_id"].to_pylist(),
        pairwise["other_response_id"].to_pylist(),
        pairwise["score"].to_pylist(),
        strict=True,
    ):
        if score is not None and math.isfinite(score) and 0.0 <= score <= 1.0:
            by_order[judge][(first, second)] = score
    out = []
    for judge in sorted(by_order):
        orders = by_order[judge]
        both = consistent = same = ties = 0
        for (first, second), p1 in orders.items():
            p2 = orders.get((second, first))
            if p2 is None or not first < second:
                continue  # one order only, or the pair's other order (counted once)
            both += 1
            consistent += combine_orders(p1, p2).consistent
            s1, s2 = _slot(p1), _slot(p2)
            ties += s1 == 0 or s2 == 0
            same += s1 != 0 and s1 == s2
        first_slot = sum(_slot(p) > 0 for p in orders.values())
        out.append(JudgeConsistency(judge, len(orders), first_slot, both, consistent, same, ties))
    return out


def judge_usage(judgments: pa.Table) -> dict[str, dict[str, int]]:
    """judge -> kind -> judgments (one judgment per verdict; the judge stage's requests are
    counted per stage in the manifest)."""
    out: dict[str, dict[str, int]] = {}
    grouped = judgments.group_by(["judge", "kind"], use_threads=False).aggregate(
        [("kind", "count")]
    )
    for row in sorted(grouped.to_pylist(), key=lambda r: (str(r["judge"]), str(r["kind"]))):
        out.setdefault(str(row["judge"]), {})[str(row["kind"])] = row["kind_count"]
    return out


# --- requests and counts ------------------------------------------------------------------------


def usage_by_model(responses: pa.Table, models: Sequence[str] = ()) -> list[ModelUsage]:
    """Per response model: samples, requests and tokens sent vs answered from the journal."""
    grouped = responses.group_by(["model", "cached"], use_threads=False).aggregate(
        [
            ("response_id", "count"),
            ("call_id", "count_distinct"),
            ("prompt_tokens", "sum"),
            ("completion_tokens", "sum"),
        ]
    )
    acc: dict[str, Counter[str]] = defaultdict(Counter)
    for row in grouped.to_pylist():
        side = "journal" if row["cached"] else "sent"
        c = acc[row["model"]]
        c["samples"] += row["response_id_count"]
        c[f"requests_{side}"] += row["call_id_count_distinct"]
        c[f"prompt_{side}"] += row["prompt_tokens_sum"] or 0
        c[f"completion_{side}"] += row["completion_tokens_sum"] or 0
    return [
        ModelUsage(
            model,
            acc[model]["samples"],
            acc[model]["requests_sent"],
            acc[model]["requests_journal"],
            acc[model]["prompt_sent"],
            acc[model]["completion_sent"],
            acc[model]["prompt_journal"],
            acc[model]["completion_journal"],
        )
        for model in _ordered(acc, models)
    ]


def stage_rows(manifest: Mapping[str, Any]) -> list[BranchStages]:
    """Per branch (by taxonomy path): status and each stage's counts, as the manifest has them."""
    rows = [
        BranchStages(
            str(branch.get("path", branch_id)),
            str(branch.get("status", "built")),
            {stage: dict(info.get("counts", {})) for stage, info in branch["stages"].items()},
        )
        for branch_id, branch in manifest.get("branches", {}).items()
        if isinstance(branch.get("stages"), Mapping)
    ]
    return sorted(rows, key=lambda r: r.path)


def run_summary(manifest: Mapping[str, Any], failures: pa.Table) -> RunSummary:
    """The version's stage totals (in / out / failed, requests sent / from the journal) and its
    failures by kind with the most common reason and an example item (`vlpref.run_summary`)."""
    counts = (
        (stage, branch_id, info.get("counts", {}))
        for branch_id, branch in manifest.get("branches", {}).items()
        for stage, info in branch.get("stages", {}).items()
    )
    # No alerts here (threshold 1: never passed); the report shows every stage's failure rate.
    return summarize(counts, [failures], threshold=1.0, top=50)


# --- gallery ------------------------------------------------------------------------------------


def _draw(pair_id: str) -> str:
    return hashlib.sha256(f"vlpref-report\x1f{pair_id}".encode()).hexdigest()


def gallery_sample(
    quadruples: pa.Table,
    per_category: int = GALLERY_PER_CATEGORY,
    max_items: int = GALLERY_MAX,
) -> list[dict[str, Any]]:
    """A sample of quadruples per category: at most `per_category` each, fewer when the
    categories times `per_category` pass `max_items` (at least one each). The draw is a hash of
    the pair id: the same version always shows the same sample, and a category's sample does
    not depend on the other categories. Rows come as dicts, by category then draw."""
    if quadruples.num_rows == 0:
        return []
    cats = _category_column(quadruples).to_pylist()
    ids = quadruples["pair_id"].to_pylist()
    by_category: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for index, (cat, pair_id) in enumerate(zip(cats, ids, strict=True)):
        by_category[cat].append((_draw(pair_id), index))
    cap = max(1, min(per_category, max_items // len(by_category)))
    chosen = [index for cat in sorted(by_category) for _, index in sorted(by_category[cat])[:cap]]
    rows: list[dict[str, Any]] = quadruples.take(pa.array(chosen, pa.int64())).to_pylist()
    for row in rows:
        row["category"] = category(row["class1"], row["class2"])
    return rows
