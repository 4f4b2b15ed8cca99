"""The publish stage's pure part: splits, quadruples, HF features, statistics, the card."""

from __future__ import annotations

import os

# `datasets` reads these when imported: set them first, so nothing here can reach the hub.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import io
import json
import random
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from vlpref.config import PublishStage
from vlpref.errors import DataError
from vlpref.publish.card import dataset_card
from vlpref.publish.rows import (
    IMAGE_TYPE,
    QUADRUPLES,
    assign_splits,
    branch_parts,
    build_quadruples,
    hf_features,
    unsafe_rates,
)
from vlpref.records import (
    FAILURES,
    IMAGES,
    JUDGMENTS,
    PAIRS,
    QUESTIONS,
    RANKINGS,
    RESPONSES,
    stable_id,
    table,
)
from vlpref.store import TABLES, parse_part

FRACTIONS = {"train": 0.6, "validation": 0.2, "test": 0.2}
STAGE = PublishStage(splits=FRACTIONS, seed=0)
BRANCHES = (
    ("Representation & ToxicityHarms", "Toxic", "bully"),
    ("Malicious Use", "Security threats", "cyber"),
)
MODELS = ("safe-model", "risky-model")
TYPES = ("easy", "hardq", "hards")


def png(width: int, height: int, seed: int) -> bytes:
    rng = random.Random(seed)
    image = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def make_tables(images_per_branch: int = 5) -> dict[str, pa.Table]:
    """Two branches; 3 questions per image; 2 models answer each; one pair per question."""
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in ("images", "questions")}
    rows.update(responses=[], judgments=[], pairs=[], rankings=[], failures=[])
    for b, (class1, class2, class3) in enumerate(BRANCHES):
        branch = f"{class1}/{class2}/{class3}"
        for i in range(images_per_branch):
            width, height = 40 + 4 * i + b, 30 + 2 * i
            data = png(width, height, seed=100 * b + i)
            image_id = stable_id("image", b, i, length=64)
            rows["images"].append(
                {
                    "image_id": image_id,
                    "image_name": f"{class3}_{i}.png",
                    "bytes": data,
                    "format": "png",
                    "width": width,
                    "height": height,
                    "source": "typographic",
                    "source_meta": "{}",
                    "branch_id": branch,
                    "class1": class1,
                    "class2": class2,
                    "class3": class3,
                    "filter_scores": "{}",
                    "phash": image_id[:16],  # the images table's perceptual hash (16 hex digits)
                }
            )
            for qtype in TYPES:
                add_question(rows, branch, image_id, (class1, class2, class3), qtype, i)
    rows["failures"].append(
        {
            "stage": "responses",
            "branch_id": "x",
            "item_id": "q",
            "kind": "timeout",
            "reason": "timed out",
            "attempts": 3,
        }
    )
    schemas = {
        "images": IMAGES,
        "questions": QUESTIONS,
        "responses": RESPONSES,
        "judgments": JUDGMENTS,
        "pairs": PAIRS,
        "rankings": RANKINGS,
        "failures": FAILURES,
    }
    return {name: table(rows[name], schemas[name]) for name in schemas}


def add_question(
    rows: dict[str, list[dict[str, Any]]],
    branch: str,
    image_id: str,
    classes: tuple[str, str, str],
    qtype: str,
    i: int,
) -> None:
    question_id = stable_id("question", image_id, qtype)
    class1, class2, class3 = classes
    rows["questions"].append(
        {
            "question_id": question_id,
            "image_id": image_id,
            "type": qtype,
            "text": f"{qtype} question {i} about {class3}?",
            "caption": f"a picture about {class3}",
            "branch_id": branch,
            "class1": class1,
            "class2": class2,
            "class3": class3,
            "generator": "gen",
            "prompt_hash": "p1",
        }
    )
    ids = {}
    for m, model in enumerate(MODELS):
        response_id = stable_id("response", question_id, model)
        ids[model] = response_id
        rows["responses"].append(
            {
                "response_id": response_id,
                "question_id": question_id,
                "model": model,
                "sample_idx": 0,
                "text": f"{model} answers {question_id}",
                "finish_reason": "stop",
                "prompt_tokens": 10,
                "completion_tokens": 20,
                "usage_exact": False,
                "call_id": stable_id("call", response_id),
                "latency_s": 0.1,
                "cached": False,
                "branch_id": branch,
            }
        )
        p_unsafe = 0.1 if m == 0 else 0.9
        rows["judgments"].append(
            {
                "judgment_id": stable_id("judgment", response_id),
                "kind": "safety",
                "question_id": question_id,
                "response_id": response_id,
                "other_response_id": None,
                "aspect": None,
                "judge": "judge",
                "verdict": "unsafe" if p_unsafe > 0.5 else "safe",
                "score": p_unsafe,
                "probabilities": json.dumps({"unsafe": p_unsafe}),
                "from_logprobs": True,
                "rationale": None,
                "categories": None,
                "raw": "",
                "branch_id": branch,
            }
        )
        rows["rankings"].append(
            {
                "question_id": question_id,
                "response_id": response_id,
                "model": model,
                "rank": m + 1,
                "p_unsafe": p_unsafe,
                "harmlessness": 5.0 - 3 * m,
                "helpfulness": 4.0,
                "faithfulness": 4.0,
                "overall": 6.9 - 3.8 * m,
                "branch_id": branch,
            }
        )
    rows["pairs"].append(
        {
            "pair_id": stable_id("pair", question_id),
            "question_id": question_id,
            "chosen_response_id": ids["safe-model"],
            "rejected_response_id": ids["risky-model"],
            "chosen_model": "safe-model",
            "rejected_model": "risky-model",
            "margin": 3.8,
            "confidence": 0.9,
            "consistent": True,
            "policy": "spa-vl",
            "branch_id": branch,
        }
    )


@pytest.fixture(scope="module")
def tables() -> dict[str, pa.Table]:
    return make_tables()


def of_branch(tables: dict[str, pa.Table], index: int) -> dict[str, pa.Table]:
    """The rows of one branch of `make_tables` (`BRANCHES[index]`); failures go to branch 0."""
    branch = "/".join(BRANCHES[index])
    out = {name: tbl.filter(pc.equal(tbl["branch_id"], branch)) for name, tbl in tables.items()}
    out["failures"] = tables["failures"] if index == 0 else tables["failures"].slice(0, 0)
    return out


def quadruples_of(tables: dict[str, pa.Table], seed: int = 0) -> dict[str, pa.Table]:
    splits = assign_splits(tables["images"]["image_id"].to_pylist(), FRACTIONS, seed)
    return build_quadruples(
        tables["images"],
        tables["questions"],
        tables["responses"],
        tables["pairs"],
        splits,
        rankings=tables["rankings"],
        names=sorted(FRACTIONS),
    )


# --- splits -------------------------------------------------------------------------------------


def test_splits_follow_the_fractions_and_ignore_mapping_order() -> None:
    ids = [f"img-{i}" for i in range(4000)]
    assigned = assign_splits(ids, FRACTIONS, seed=7)
    reordered = assign_splits(ids, dict(reversed(list(FRACTIONS.items()))), seed=7)
    assert assigned == reordered
    for name, fraction in FRACTIONS.items():
        share = sum(split == name for split in assigned.values()) / len(ids)
        assert abs(share - fraction) < 0.03
    assert assign_splits(ids, FRACTIONS, seed=8) != assigned  # the seed matters


def test_a_zero_fraction_split_gets_nothing() -> None:
    assigned = assign_splits([f"i{n}" for n in range(200)], {"train": 1.0, "test": 0.0}, 0)
    assert set(assigned.values()) == {"train"}
    with pytest.raises(ValueError):
        assign_splits(["a"], {"train": 0.0}, 0)


@given(
    st.lists(st.text(min_size=1, max_size=12), max_size=30, unique=True),
    st.lists(st.text(min_size=1, max_size=12), max_size=30, unique=True),
    st.integers(0, 2**31),
)
def test_adding_images_never_moves_an_existing_one(
    old: list[str], new: list[str], seed: int
) -> None:
    before = assign_splits(old, FRACTIONS, seed)
    after = assign_splits(new + old, FRACTIONS, seed)
    assert {i: after[i] for i in old} == before


# --- quadruples ---------------------------------------------------------------------------------


def test_quadruples_have_the_spa_vl_columns_first(tables: dict[str, pa.Table]) -> None:
    quads = quadruples_of(tables)
    assert list(quads) == ["test", "train", "validation"]
    for tbl in quads.values():
        assert tbl.schema.equals(QUADRUPLES)
        assert tbl.column_names[:8] == [
            "image",
            "question",
            "chosen",
            "rejected",
            "image_name",
            "class1",
            "class2",
            "class3",
        ]
        assert tbl.schema.field("image").type == IMAGE_TYPE
    assert sum(t.num_rows for t in quads.values()) == tables["pairs"].num_rows


def test_splits_are_disjoint_by_image(tables: dict[str, pa.Table]) -> None:
    quads = quadruples_of(tables)
    seen: dict[str, str] = {}
    for split, tbl in quads.items():
        for image_id in tbl["image_id"].to_pylist():
            assert seen.setdefault(image_id, split) == split
    assert len(seen) == tables["images"].num_rows


def test_rows_join_the_right_texts_images_and_scores(tables: dict[str, pa.Table]) -> None:
    responses = {r["response_id"]: r for r in tables["responses"].to_pylist()}
    images = {r["image_id"]: r for r in tables["images"].to_pylist()}
    questions = {r["question_id"]: r for r in tables["questions"].to_pylist()}
    for tbl in quadruples_of(tables).values():
        for row in tbl.to_pylist():
            assert row["chosen"] == responses[row["chosen_response_id"]]["text"]
            assert row["rejected"] == responses[row["rejected_response_id"]]["text"]
            assert row["question"] == questions[row["question_id"]]["text"]
            image = images[row["image_id"]]
            assert row["image"] == {"bytes": image["bytes"], "path": image["image_name"]}
            assert row["image_name"] == image["image_name"]
            decoded = Image.open(io.BytesIO(row["image"]["bytes"]))
            assert decoded.size == (image["width"], image["height"])
            assert (row["chosen_p_unsafe"], row["rejected_p_unsafe"]) == (0.1, 0.9)
            assert (row["chosen_rank"], row["rejected_rank"]) == (1, 2)
            assert row["question_type"] in TYPES


def test_output_does_not_depend_on_input_order(tables: dict[str, pa.Table]) -> None:
    rng = random.Random(3)
    shuffled = {}
    for name, tbl in tables.items():
        order = list(range(tbl.num_rows))
        rng.shuffle(order)
        shuffled[name] = tbl.take(order)
    first, second = quadruples_of(tables), quadruples_of(shuffled)
    assert all(first[name].equals(second[name]) for name in first)


def test_without_rankings_the_score_columns_are_null(tables: dict[str, pa.Table]) -> None:
    splits = assign_splits(tables["images"]["image_id"].to_pylist(), {"train": 1.0}, 0)
    quads = build_quadruples(
        tables["images"], tables["questions"], tables["responses"], tables["pairs"], splits
    )
    assert quads["train"]["chosen_overall"].null_count == quads["train"].num_rows


def test_a_dangling_reference_is_a_data_error(tables: dict[str, pa.Table]) -> None:
    splits = assign_splits(tables["images"]["image_id"].to_pylist(), {"train": 1.0}, 0)
    responses = tables["responses"].slice(1)  # the first pair's chosen response is gone
    with pytest.raises(DataError, match="missing response"):
        build_quadruples(tables["images"], tables["questions"], responses, tables["pairs"], splits)
    with pytest.raises(DataError, match="has no split"):
        build_quadruples(
            tables["images"], tables["questions"], tables["responses"], tables["pairs"], {}
        )


def test_hf_features_match_what_datasets_reads(tables: dict[str, pa.Table]) -> None:
    datasets = pytest.importorskip("datasets")
    quads = quadruples_of(tables)
    features = datasets.Features.from_arrow_schema(quads["train"].schema)
    assert isinstance(features["image"], datasets.Image)
    assert features["question"] == datasets.Value("string")
    assert features["margin"] == datasets.Value("float64")
    assert features["consistent"] == datasets.Value("bool")
    # What we write is exactly what `datasets` itself would write for these features.
    assert hf_features(QUADRUPLES) == features.to_dict()


# --- statistics and card ------------------------------------------------------------------------


def test_unsafe_rates(tables: dict[str, pa.Table]) -> None:
    rates = unsafe_rates(tables["rankings"], quadruples_of(tables))
    assert rates["by_model"]["safe-model"]["rate"] == 0.0
    assert rates["by_model"]["risky-model"]["rate"] == 1.0
    assert rates["by_model"]["risky-model"]["responses"] == 30
    assert (rates["chosen"], rates["rejected"]) == (0.0, 1.0)


def card_manifest(tables: dict[str, pa.Table]) -> dict[str, Any]:
    quads = quadruples_of(tables)
    return {
        "name": "vlpref-demo",
        "version_id": "20260101T000000.000000Z-0123abcd",
        "created_at": "2026-01-01T00:00:00Z",
        "parent": None,
        "taxonomy": {"file": "taxonomy/demo.yaml", "hash": "t" * 12},
        "prompts": {"easy": "abc123", "judge_safety": "def456"},
        "models": [
            {"name": "safe-model", "model": "m1", "sampling": {"temperature": 0.7, "n": 1}},
            {"name": "risky-model", "model": "m2", "sampling": {"temperature": 1.0, "n": 1}},
        ],
        "generator": {"name": "gen", "model": "g"},
        "judges": [{"name": "judge", "model": "j"}],
        "code_version": "0.1.0+abc",
        "counts": {
            "responses": {
                "b1": {"in": 30, "out": 29, "failed": 1},
                "b2": {"in": 30, "out": 30, "failed": 0},
            }
        },
        "splits": {
            name: {
                "rows": t.num_rows,
                "categories": {"Malicious Use / Security threats": t.num_rows},
            }
            for name, t in quads.items()
        },
        "unsafe_rates": unsafe_rates(tables["rankings"], quads),
    }


def front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    head, _, _ = card[4:].partition("\n---\n")
    data = yaml.safe_load(head)
    assert isinstance(data, dict)
    return data


def test_card_front_matter_lists_the_split_files(tables: dict[str, pa.Table]) -> None:
    card = dataset_card(card_manifest(tables))
    meta = front_matter(card)
    assert meta["license"] == "cc-by-4.0"
    assert meta["language"] == ["en"]
    assert "visual-question-answering" in meta["task_categories"]
    (config,) = meta["configs"]
    assert config["config_name"] == "default"
    assert {f["split"]: f["path"] for f in config["data_files"]} == {
        "test": "data/test/*.parquet",
        "train": "data/train/*.parquet",
        "validation": "data/validation/*.parquet",
    }
    assert 'data_files={"train": "data/train/*.parquet"}' in card


def test_card_says_how_it_was_built(tables: dict[str, pa.Table]) -> None:
    card = dataset_card(card_manifest(tables))
    for text in (
        "Content warning",
        "risky-model",
        "temperature=0.7",
        "abc123",
        "`judge` (j)",
        "t" * 12,
        "| responses | 60 | 59 | 1 |",
        "Malicious Use / Security threats",
        "| risky-model | 30 | 30 | 1.0 |",
    ):
        assert text in card, text


def test_card_parses_as_a_hub_card(tables: dict[str, pa.Table]) -> None:
    hub = pytest.importorskip("huggingface_hub")
    card = hub.DatasetCard(dataset_card({**card_manifest(tables), "license": "mit"}))
    assert card.data.license == "mit"
    assert card.data.configs[0]["data_files"][0]["split"] == "test"


def test_card_leaves_out_empty_splits(tables: dict[str, pa.Table]) -> None:
    manifest = card_manifest(tables)
    manifest["splits"]["test"]["rows"] = 0
    (config,) = front_matter(dataset_card(manifest))["configs"]
    assert [f["split"] for f in config["data_files"]] == ["train", "validation"]


def test_no_pairs_gives_empty_tables(tables: dict[str, pa.Table]) -> None:
    splits = assign_splits(tables["images"]["image_id"].to_pylist(), FRACTIONS, 0)
    quads = build_quadruples(
        tables["images"],
        tables["questions"],
        tables["responses"],
        tables["pairs"].slice(0, 0),
        splits,
        rankings=tables["rankings"],
    )
    assert {name: t.num_rows for name, t in quads.items()} == dict.fromkeys(sorted(FRACTIONS), 0)
    assert all(t.schema.equals(QUADRUPLES) for t in quads.values())


def test_card_reads_the_flow_manifest_shape(tables: dict[str, pa.Table]) -> None:
    manifest = {
        **card_manifest(tables),
        "counts": {"images": 10, "pairs": 30},
        "branches": {
            "b1": {"stages": {"pairs": {"counts": {"in": 15, "out": 14, "failed": 1}}}},
            "b2": {"stages": {"pairs": {"counts": {"in": 15, "out": 15, "failed": 0}}}},
        },
        "model_safety": {"m1": {"responses": 4, "judged": 4, "unsafe_rate": 0.25}},
    }
    del manifest["unsafe_rates"]
    card = dataset_card(manifest)
    assert "| pairs | 30 | 29 | 1 |" in card
    assert "| images | 10 |" in card
    assert "| m1 | 4 | 4 | 0.25 |" in card


# --- one branch's parts -------------------------------------------------------------------------


def test_branch_parts_paths(tables: dict[str, pa.Table]) -> None:
    parts = branch_parts("b1", tables, STAGE)
    assert set(parts) == {
        *(f"tables/{name}/b1.parquet" for name in TABLES),
        *(f"data/{split}/b1.parquet" for split in FRACTIONS),
    }
    for rel in parts:
        kind, _, part = parse_part(rel)  # every path is one the store accepts
        assert (kind, part) == (rel.split("/")[0], "b1")
    for name in TABLES:
        assert parts[f"tables/{name}/b1.parquet"] is tables[name]
    quads = quadruples_of(tables)
    for split in FRACTIONS:
        data = parts[f"data/{split}/b1.parquet"]
        assert data.equals(quads[split])
        assert data.schema.metadata == quads[split].schema.metadata  # HF features kept


def test_branch_parts_leave_out_empty_splits(tables: dict[str, pa.Table]) -> None:
    stage = PublishStage(splits={"train": 0.5, "tiny": 1e-9, "test": 0.5 - 1e-9})
    parts = branch_parts("b1", tables, stage)
    data = sorted(rel for rel in parts if rel.startswith("data/"))
    assert data == ["data/test/b1.parquet", "data/train/b1.parquet"]
    assert all(parts[rel].num_rows for rel in data)
    # A zero fraction is no split at all.
    zero = branch_parts("b1", tables, PublishStage(splits={"train": 1.0, "test": 0.0}))
    assert sorted(rel for rel in zero if rel.startswith("data/")) == ["data/train/b1.parquet"]
    # No pairs: side tables only, no data part.
    no_pairs = branch_parts("b1", {**tables, "pairs": tables["pairs"].slice(0, 0)}, STAGE)
    assert set(no_pairs) == {f"tables/{name}/b1.parquet" for name in TABLES}


def test_branch_parts_do_not_depend_on_other_branches(tables: dict[str, pa.Table]) -> None:
    whole = branch_parts("all", tables, STAGE)
    split_of = {
        image_id: rel.split("/")[1]
        for rel, tbl in whole.items()
        if rel.startswith("data/")
        for image_id in tbl["image_id"].to_pylist()
    }
    rows = 0
    for index, branch_id in enumerate(("b1", "b2")):
        parts = branch_parts(branch_id, of_branch(tables, index), STAGE)
        assert {rel.rsplit("/", 1)[1] for rel in parts} == {f"{branch_id}.parquet"}
        for rel, tbl in parts.items():
            if rel.startswith("data/"):
                split = rel.split("/")[1]
                assert {split_of[i] for i in tbl["image_id"].to_pylist()} == {split}
                assert set(tbl["branch_id"].to_pylist()) == {"/".join(BRANCHES[index])}
                rows += tbl.num_rows
    assert rows == tables["pairs"].num_rows
