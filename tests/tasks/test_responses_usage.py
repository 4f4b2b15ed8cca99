"""The responses table's token columns against the simulated server's own bill: each row carries
its sample's share of the call that produced it, the same fresh or from the journal, so a column
sums to what was billed and a resumed or extended build equals a clean one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from tasks.images import collect_images
from tasks.responses import collect_responses
from vlpref.config import ImagesStage, RunConfig, TypographicSource, parse_config
from vlpref.journal import Journal
from vlpref.records import QUESTIONS, table
from vlpref.sim.testing import SimServer, sim_run_config
from vlpref.stage import StageOutput
from vlpref.taxonomy import Subcategory, load_taxonomy

REPO = Path(__file__).resolve().parents[2]
TAXONOMY = REPO / "taxonomy" / "demo.yaml"
BRANCH = "b"

SIM = {
    "models": {
        "sim-mixed": {"persona": "mixed"},
        "sim-refuser": {"persona": "refuser"},
        "sim-helpful": {"persona": "safe-helpful"},
        # A new answer for every call of the same request, as hosted APIs without a seed.
        "sim-fresh": {"persona": "mixed", "nondeterministic": True},
    }
}
MIXED = {"name": "mixed", "endpoint": "sim", "model": "sim-mixed", "sampling": {"n": 2}}
EXACT = {
    "name": "exact",
    "endpoint": "sim",
    "model": "sim-helpful",
    "sampling": {"n": 2, "temperature": 1.0, "logprobs": True},
}
FRESH = {"name": "fresh", "endpoint": "sim", "model": "sim-fresh", "sampling": {"n": 2}}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(SIM) as server:
        yield server


@pytest.fixture(scope="module")
def leaf() -> Subcategory:
    return load_taxonomy(TAXONOMY).leaves()[0]


@pytest.fixture(scope="module")
def images(leaf: Subcategory) -> pa.Table:
    out = collect_images(
        leaf, ImagesStage(source=TypographicSource(per_branch=2)), base_dir=Path(".")
    )
    return out.rows


def questions(images: pa.Table, *, repeat: bool = False) -> pa.Table:
    """Three questions per image; with `repeat`, a fourth that asks the first one again."""
    rows: list[dict[str, Any]] = []
    for i, image_id in enumerate(images.column("image_id").to_pylist()):
        texts = [f"What does sign {i} say?", f"How would one misuse sign {i}?", f"Explain {i}."]
        if repeat:
            texts.append(texts[0])
        for j, text in enumerate(texts):
            rows.append(
                {
                    "question_id": f"q{i}-{j}",
                    "image_id": image_id,
                    "type": "easy",
                    "text": text,
                    "caption": "",
                    "branch_id": BRANCH,
                    "class1": "a",
                    "class2": "b",
                    "class3": "c",
                    "generator": "test",
                    "prompt_hash": "p",
                }
            )
    return table(rows, QUESTIONS)


def config(sim: SimServer, tmp_path: Path, models: list[str | dict[str, Any]]) -> RunConfig:
    return parse_config(
        sim_run_config(
            sim.base_url,
            name="t",
            taxonomy=str(TAXONOMY),
            workspace=str(tmp_path / "ws"),
            store=str(tmp_path / "store"),
            endpoint={"max_attempts": 2, "backoff_initial_s": 0.01},
            models=models,
        )
    )


def build(
    sim: SimServer,
    tmp_path: Path,
    journal: str,
    images: pa.Table,
    models: list[str | dict[str, Any]],
    *,
    repeat: bool = False,
) -> StageOutput:
    cfg = config(sim, tmp_path, models)
    with Journal(str(tmp_path / journal)) as j:
        out = collect_responses(BRANCH, questions(images, repeat=repeat), images, cfg, j)
    assert out.n_failed == 0
    return out


def billed(sim: SimServer) -> dict[str, tuple[int, int]]:
    usage = sim.counters()["usage"]
    return {m: (u["prompt_tokens"], u["completion_tokens"]) for m, u in usage.items()}


def spent(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], model: str) -> Any:
    old = before.get(model, (0, 0))
    new = after.get(model, (0, 0))
    return (new[0] - old[0], new[1] - old[1])


def sums(rows: pa.Table, model: str) -> tuple[int, int]:
    mine = [r for r in rows.to_pylist() if r["model"] == model]
    return (sum(r["prompt_tokens"] for r in mine), sum(r["completion_tokens"] for r in mine))


def arrivals(sim: SimServer, model: str) -> int:
    return sum(sim.counters()["by_model"].get(model, {}).values())


def without(rows: pa.Table, *columns: str) -> list[dict[str, Any]]:
    kept: list[dict[str, Any]] = rows.drop_columns(list(columns)).to_pylist()
    return kept


def test_token_columns_sum_to_what_the_server_billed(
    sim: SimServer, tmp_path: Path, images: pa.Table
) -> None:
    before = billed(sim)
    out = build(sim, tmp_path, "j", images, [MIXED, EXACT, "refuser"])
    after = billed(sim)
    # n=2: each call's tokens are on its two rows once, not on each (the old double count).
    for name, model in (
        ("mixed", "sim-mixed"),
        ("exact", "sim-helpful"),
        ("refuser", "sim-refuser"),
    ):
        assert sums(out.rows, name) == spent(before, after, model), name
    rows = out.rows.to_pylist()
    by_call: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_call.setdefault(row["call_id"], []).append(row)
    for siblings in by_call.values():  # one call per (question, model): n rows
        assert len({(r["question_id"], r["model"]) for r in siblings}) == 1
        assert len(siblings) == (1 if siblings[0]["model"] == "refuser" else 2)
    # Token logprobs give every sample its own completion count; otherwise it is a split.
    assert all(r["usage_exact"] == (r["model"] == "exact") for r in rows)
    assert all(r["prompt_tokens"] > 0 and r["completion_tokens"] > 0 for r in rows)


def test_a_resumed_build_equals_a_clean_one(
    sim: SimServer, tmp_path: Path, images: pa.Table
) -> None:
    models: list[str | dict[str, Any]] = [MIXED, "refuser"]
    clean = build(sim, tmp_path, "clean", images, models)
    build(sim, tmp_path, "killed", images, models)
    # A kill loses the calls in flight: whole calls (a call's lines are written at once).
    root = tmp_path / "killed"
    lines = [ln for seg in sorted(root.glob("*.jsonl")) for ln in seg.read_text().splitlines()]
    calls = sorted({json.loads(ln)["c"] for ln in lines})
    lost = set(calls[::3])
    for segment in root.glob("*.jsonl"):
        segment.unlink()
    kept = [ln for ln in lines if json.loads(ln)["c"] not in lost]
    (root / "survivor.jsonl").write_text("".join(ln + "\n" for ln in kept))
    sent = arrivals(sim, "sim-mixed") + arrivals(sim, "sim-refuser")

    resumed = build(sim, tmp_path, "killed", images, models)
    assert arrivals(sim, "sim-mixed") + arrivals(sim, "sim-refuser") - sent == len(lost)
    cached = resumed.rows.column("cached").to_pylist()
    assert any(cached) and not all(cached)
    # Every column but the ones that say how this build got the answer, call ids included.
    assert without(resumed.rows, "latency_s", "cached") == without(
        clean.rows, "latency_s", "cached"
    )


def test_adding_a_model_leaves_the_old_models_rows_unchanged(
    sim: SimServer, tmp_path: Path, images: pa.Table
) -> None:
    first = build(sim, tmp_path, "j", images, [MIXED, "refuser"])
    sent = arrivals(sim, "sim-mixed") + arrivals(sim, "sim-refuser")
    second = build(sim, tmp_path, "j", images, [MIXED, "refuser", "helpful"])
    assert arrivals(sim, "sim-mixed") + arrivals(sim, "sim-refuser") == sent
    old = [r for r in without(second.rows, "latency_s", "cached") if r["model"] != "helpful"]
    assert old == without(first.rows, "latency_s", "cached")
    assert second.rows.num_rows == first.rows.num_rows + 6


def test_a_repeated_question_is_asked_once_and_its_rows_agree_with_the_journal(
    sim: SimServer, tmp_path: Path, images: pa.Table
) -> None:
    before, sent = billed(sim), arrivals(sim, "sim-fresh")
    out = build(sim, tmp_path, "j", images, [FRESH], repeat=True)
    assert arrivals(sim, "sim-fresh") - sent == 6  # 8 questions, 2 of them repeats
    assert out.extra["requests_deduplicated"] == 2 and out.extra["requests_sent"] == 6
    rows = {(r["question_id"], r["sample_idx"]): r for r in out.rows.to_pylist()}
    with Journal(str(tmp_path / "j")) as journal:
        keys = list(journal.keys())  # a Journal is not iterable
        entries = [journal.get(k) for k in keys]
    journaled = {(e.call_id, e.sample.index): e.sample.text for e in entries if e is not None}
    for i in range(2):
        for idx in range(2):
            first, repeat = rows[(f"q{i}-0", idx)], rows[(f"q{i}-3", idx)]
            assert first["text"] == repeat["text"] == journaled[(first["call_id"], idx)]
            assert repeat["call_id"] == first["call_id"]
            assert (repeat["prompt_tokens"], repeat["completion_tokens"]) == (0, 0)
            assert first["prompt_tokens"] > 0
    assert all(
        row["text"] == journaled[(row["call_id"], row["sample_idx"])] for row in rows.values()
    )
    assert sums(out.rows, "fresh") == spent(before, billed(sim), "sim-fresh")
    # The endpoint really answers afresh: another build (another journal) gets other answers.
    other = build(sim, tmp_path, "other", images, [FRESH], repeat=True)
    assert other.rows.column("text").to_pylist() != out.rows.column("text").to_pylist()
