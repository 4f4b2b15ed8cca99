"""The dataset card a published version carries (vlpref.publish.card.dataset_card):
`huggingface_hub`'s card parser accepts its metadata, `datasets.load_dataset(version folder)`
reads the configs it declares, and the body says what a hub reader needs (judging, measured
figures, limitations, the report, the upload command)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from vlpref.publish.card import dataset_card
from vlpref.store import Version

SAFETY_REPORT: dict[str, Any] = {  # the shape of `vlpref judge-eval`'s report.json
    "file": "/data/labelled/spa-vl-eval.parquet",
    "kind": "safety",
    "judges": ["judge-a", "judge-b"],
    "items": 200,
    "target_fpr": 0.05,
    "results": {
        "judge-a": {
            "overall": {
                "n": 200,
                "judged": 198,
                "unsafe": 90,
                "precision": 0.912,
                "recall": 0.877,
                "f1": 0.894,
                "auroc": 0.951,
                "ece": {"value": None, "reason": "no scores"},
            }
        },
        "judge-b": {
            "overall": {"n": 200, "judged": 200, "unsafe": 90, "precision": 0.8, "f1": 0.7}
        },
    },
    "judge_agreement": {"metric": "cohen_kappa", "value": 0.61},
}


def front_matter(card: str) -> dict[str, Any]:
    head, _, _ = card.removeprefix("---\n").partition("\n---\n")
    data = yaml.safe_load(head)
    assert isinstance(data, dict)
    return data


def test_the_hub_card_parser_accepts_the_published_card(version: Version) -> None:
    from huggingface_hub import DatasetCard
    from huggingface_hub.repocard_data import DatasetCardData

    readme = Path(version.path("README.md"))
    card = DatasetCard.load(readme)
    # Validated field by field: a size category or metadata the hub rejects raises here.
    data = DatasetCardData(**front_matter(readme.read_text()), ignore_metadata_errors=False)
    meta: dict[str, Any] = data.to_dict()  # type: ignore[no-untyped-call]  # extra keys kept
    assert data.license == card.data.license == "cc-by-4.0"
    assert data.size_categories == ["n<1K"]
    assert data.task_categories == ["visual-question-answering", "image-text-to-text"]
    assert {"safety", "preference", "dpo"} <= set(meta["tags"])
    assert data.language == ["en"]
    features = {f["name"]: f["dtype"] for f in meta["dataset_info"]["features"]}
    assert features["image"] == "image"
    assert features["question"] == features["chosen"] == "string"
    assert features["margin"] == "float64" and features["consistent"] == "bool"
    (config,) = meta["configs"]
    assert {f["split"]: f["path"] for f in config["data_files"]} == {
        s: f"data/{s}/*.parquet" for s in version.splits
    }
    splits = {s["name"]: s["num_examples"] for s in meta["dataset_info"]["splits"]}
    assert splits == {s: c["rows"] for s, c in version.manifest["splits"].items()}


def test_load_dataset_reads_the_version_folder_by_its_card(
    version: Version, tmp_path: Path
) -> None:
    from datasets import load_dataset

    loaded = load_dataset(version.path(""), cache_dir=str(tmp_path / "hf"))
    assert {s: len(d) for s, d in loaded.items()} == {
        s: c["rows"] for s, c in version.manifest["splits"].items()
    }
    row = loaded["train"][0]
    assert isinstance(row["image"], Image.Image)
    assert set(row) >= {"question", "chosen", "rejected", "margin", "consistent"}


def test_the_card_describes_judging_limitations_report_and_upload(version: Version) -> None:
    card = Path(version.path("README.md")).read_text()
    assert "## Judging method" in card
    assert "`judge` (sim-judge)" in card
    assert "both orders" in card and "policy `max-margin`" in card
    assert "## Known limitations" in card
    assert "The images are typographic" in card
    assert "No judge evaluation is attached" in card
    assert "[version report](report.html)" in card
    assert "hf upload --repo-type dataset OWNER/e2e path/to/this/folder ." in card
    assert "## Measured judge quality" not in card


def test_measured_judge_figures_are_shown_when_an_evaluation_is_attached(
    version: Version,
) -> None:
    manifest = {**version.manifest, "judge_eval": SAFETY_REPORT}
    card = dataset_card(manifest)
    assert "## Measured judge quality" in card
    assert "Safety judgments on `spa-vl-eval.parquet` (200 labelled items)" in card
    assert "| judge-a | 200 | 198 | 90 | 0.912 | 0.877 | 0.894 | 0.951 | n/a (no scores) |" in card
    assert "| judge-b | 200 | 200 | 90 | 0.800 | None | 0.700 | None | None |" in card
    assert "Agreement between judges (cohen_kappa): 0.610" in card
    assert "No judge evaluation is attached" not in card
    # A list of reports (several labelled sets) renders each.
    twice = dataset_card({**version.manifest, "judge_eval": [SAFETY_REPORT, SAFETY_REPORT]})
    assert twice.count("Safety judgments on `spa-vl-eval.parquet`") == 2
