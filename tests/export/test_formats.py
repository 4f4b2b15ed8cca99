"""Each export format, written from a real version and read back with its consumer's loader where
it installs here, else checked against the consumer's documented schema.

- trl: `datasets.load_from_disk` and `datasets.load_dataset("parquet", ...)`, the two ways TRL's
  DPOTrainer gets a dataset; the rows are checked against TRL's conversational vision layout.
  (TRL's own data path runs on the export in tests_trainers/, which needs torch.)
- llamafactory: LLaMA-Factory does not install here (it pins torch, transformers, peft and more),
  so the files are checked against its data/README.md: the `dataset_info.json` entry (sharegpt,
  ranking, columns, tags), one `<image>` token per image, human/gpt roles, and image paths
  relative to `dataset_dir`; the JSON is read with `datasets`' json builder, which is what
  LLaMA-Factory's loader calls for a local file.
- swift: ms-swift does not install here either (it pins its own transformers, peft, modelscope);
  the lines are checked against its "Custom Dataset" docs (RLHF: `messages` ending with the
  chosen assistant turn, `rejected_response`, `images`, `<image>` tags) and read with `datasets`'
  json builder, as ms-swift reads a local JSONL.
- listwise: our own format, read with `datasets.load_dataset("parquet", ...)` and checked against
  the version's rankings table.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pytest
from PIL import Image

from vlpref.export import EXPORT_JSON, ExportSpec, Filters, export_version
from vlpref.store import Version


def quadruples(version: Version) -> dict[str, dict[str, Any]]:
    """pair_id -> quadruple row (without the image), every split."""
    out: dict[str, dict[str, Any]] = {}
    for split in version.splits:
        table = version.split(split).drop(["image"])
        for row in table.to_pylist():
            out[row["pair_id"]] = {**row, "split": split}
    return out


def export_json(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / EXPORT_JSON).read_text())
    return data


def check_accounting(out: Path, version: Version, unit_rows: int) -> dict[str, Any]:
    info = export_json(out)
    assert info["version_id"] == version.version_id
    assert info["rows_in"] == unit_rows
    assert info["rows_written"] + sum(info["rows_filtered"].values()) == info["rows_in"]
    assert sum(info["splits"].values()) == info["rows_written"]
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert info["files"] == on_disk
    assert info["command"]
    return info


# --- trl ------------------------------------------------------------------------------------------


def test_trl_loads_from_disk_and_from_parquet_in_trl_vision_layout(
    version: Version, out: Path, tmp_path: Path
) -> None:
    from datasets import load_dataset, load_from_disk

    result = export_version(version, ExportSpec("trl"), out)
    expected = quadruples(version)
    info = check_accounting(out, version, len(expected))
    assert result.rows_written == len(expected) == info["rows_written"]

    saved = load_from_disk(str(out / "dataset"))
    assert sorted(saved) == sorted(version.splits)
    for split, ds in saved.items():
        assert len(ds) == info["splits"][split]
        for row in ds:
            want = expected[row["pair_id"]]
            assert want["split"] == split
            (image,) = row["images"]
            assert isinstance(image, Image.Image) and image.size == (512, 512)
            assert row["prompt"] == [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "text": None},
                        {"type": "text", "text": want["question"]},
                    ],
                }
            ]
            for side in ("chosen", "rejected"):
                assert row[side] == [
                    {"role": "assistant", "content": [{"type": "text", "text": want[side]}]}
                ]
            assert row["margin"] == want["margin"] and row["consistent"] == want["consistent"]

    parquet = load_dataset(
        "parquet", data_dir=str(out / "parquet"), cache_dir=str(tmp_path / "hf-cache")
    )
    assert {s: len(d) for s, d in parquet.items()} == info["splits"]
    first = parquet["train"][0]
    assert isinstance(first["images"][0], Image.Image)
    assert first == {**saved["train"][0], "images": first["images"]}


# --- llamafactory ---------------------------------------------------------------------------------


def test_llamafactory_follows_its_documented_sharegpt_preference_schema(
    version: Version, out: Path, tmp_path: Path
) -> None:
    from datasets import load_dataset

    export_version(version, ExportSpec("llamafactory"), out)
    expected = quadruples(version)
    info = check_accounting(out, version, len(expected))
    dataset_info = json.loads((out / "dataset_info.json").read_text())
    name = "e2e"  # the run config's name
    assert sorted(dataset_info) == sorted(f"{name}_{s}" for s in info["splits"])
    by_question = Counter((r["question"], r["chosen"], r["rejected"]) for r in expected.values())
    seen: Counter[tuple[str, str, str]] = Counter()
    for dataset, entry in dataset_info.items():
        assert entry["formatting"] == "sharegpt" and entry["ranking"] is True
        assert entry["columns"] == {
            "messages": "conversations",
            "chosen": "chosen",
            "rejected": "rejected",
            "images": "images",
        }
        assert entry["tags"]["role_tag"] == "from" and entry["tags"]["user_tag"] == "human"
        path = out / entry["file_name"]
        rows = json.loads(path.read_text())  # a JSON array, as documented
        loaded = load_dataset(
            "json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf")
        )
        assert len(loaded) == len(rows) == info["splits"][dataset.removeprefix(f"{name}_")]
        for row in rows:
            (turn,) = row["conversations"]
            assert turn["from"] == "human" and turn["value"].startswith("<image>")
            assert turn["value"].count("<image>") == len(row["images"]) == 1
            assert row["chosen"]["from"] == row["rejected"]["from"] == "gpt"
            (image,) = row["images"]
            assert not Path(image).is_absolute()
            with Image.open(
                out / image
            ) as img:  # relative to dataset_dir, LLaMA-Factory's media_dir
                assert img.size == (512, 512)
            question = turn["value"].removeprefix("<image>")
            seen[(question, row["chosen"]["value"], row["rejected"]["value"])] += 1
    assert seen == by_question


# --- swift ----------------------------------------------------------------------------------------


def test_swift_follows_its_documented_rlhf_schema(
    version: Version, out: Path, tmp_path: Path
) -> None:
    from datasets import load_dataset

    export_version(version, ExportSpec("swift"), out)
    expected = quadruples(version)
    info = check_accounting(out, version, len(expected))
    assert f"--dataset {out / 'train.jsonl'}" in info["command"]
    seen: Counter[tuple[str, str, str]] = Counter()
    for split, count in info["splits"].items():
        path = out / f"{split}.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        loaded = load_dataset(
            "json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf")
        )
        assert len(loaded) == len(lines) == count
        for line in lines:
            assert set(line) == {"messages", "rejected_response", "images"}
            user, assistant = line["messages"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
            assert user["content"].count("<image>") == len(line["images"]) == 1
            (image,) = line["images"]
            assert Path(image).is_absolute() and Path(image).is_relative_to(out)
            assert Image.open(image).size == (512, 512)
            question = user["content"].removeprefix("<image>")
            seen[(question, assistant["content"], line["rejected_response"])] += 1
    assert seen == Counter((r["question"], r["chosen"], r["rejected"]) for r in expected.values())


# --- listwise -------------------------------------------------------------------------------------


def test_listwise_has_every_ranked_response_in_rank_order(
    version: Version, out: Path, tmp_path: Path
) -> None:
    from datasets import load_dataset

    export_version(version, ExportSpec("listwise"), out)
    questions = version.table("questions")
    info = check_accounting(out, version, questions.num_rows)
    assert info["unit"] == "questions"
    rankings = version.table("rankings")
    ranked = rankings.filter(pc.is_valid(rankings["rank"])).to_pylist()
    by_question: dict[str, list[dict[str, Any]]] = {}
    for r in ranked:
        by_question.setdefault(r["question_id"], []).append(r)
    texts = dict(
        zip(
            *(version.table("responses")[c].to_pylist() for c in ("response_id", "text")),
            strict=True,
        )
    )
    data = load_dataset(
        "parquet",
        data_files={s: str(out / f"{s}.parquet") for s in info["splits"]},
        cache_dir=str(tmp_path / "hf"),
    )
    pair_split = {r["question_id"]: r["split"] for r in quadruples(version).values()}
    written = 0
    for split, ds in data.items():
        for row in ds:
            written += 1
            qid = row["question_id"]
            assert pair_split.get(qid, split) == split
            assert isinstance(row["image"], Image.Image)
            ranks = [r["rank"] for r in row["responses"]]
            assert ranks == sorted(ranks) and len(ranks) >= 2
            want = sorted(by_question[qid], key=lambda r: (r["rank"], r["response_id"]))
            assert [r["response_id"] for r in row["responses"]] == [r["response_id"] for r in want]
            for got, r in zip(row["responses"], want, strict=True):
                assert got["text"] == texts[r["response_id"]]
                assert got["overall"] == r["overall"] and got["p_unsafe"] == r["p_unsafe"]
    assert written == info["rows_written"] > 0
    assert info["rows_filtered"] == {
        **({"unranked": questions.num_rows - written} if written < questions.num_rows else {})
    }


# --- images written once --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["llamafactory", "swift"])
def test_each_image_is_one_file(version: Version, out: Path, fmt: str) -> None:
    export_version(version, ExportSpec(fmt), out)
    image_ids = {r["image_id"] for r in quadruples(version).values()}
    files = sorted((out / "images").iterdir())
    assert sorted(p.stem for p in files) == sorted(image_ids)
    for path in files:
        with Image.open(io.BytesIO(path.read_bytes())) as img:
            assert (img.format or "").lower() == path.suffix.lstrip(".").replace("jpg", "jpeg")


def test_filters_apply_to_every_pair_format_alike(version: Version, tmp_path: Path) -> None:
    filters = Filters.of(splits=["train"], consistent_only=True, min_margin=0.2)
    counts = []
    for fmt in ("trl", "llamafactory", "swift"):
        result = export_version(version, ExportSpec(fmt, filters), tmp_path / fmt)
        counts.append((result.rows_in, result.rows_written, result.rows_filtered, result.splits))
    assert counts[0] == counts[1] == counts[2]
