"""LLaMA-Factory's sharegpt preference format, with images as files.

As LLaMA-Factory's `data/README.md` documents it (sharegpt "Preference Dataset" plus "Multimodal
Image Dataset"): a JSON array per split, each row

    {"conversations": [{"from": "human", "value": "<image>QUESTION"}],
     "chosen": {"from": "gpt", "value": CHOSEN},
     "rejected": {"from": "gpt", "value": REJECTED},
     "images": ["images/<image_id>.png"]}

one `<image>` token per image. `dataset_info.json` describes each split as a dataset
(`<name>_<split>`) with `formatting: sharegpt`, `ranking: true` and the columns, so
`dataset_dir: OUT` and `dataset: <name>_train` train on it. Image paths are relative to the
folder: LLaMA-Factory joins them to `media_dir`, which defaults to `dataset_dir`.
"""

from __future__ import annotations

import json
import re
from typing import IO, Any

from vlpref.export.core import Context, Written, json_line, relative_files
from vlpref.export.source import ImageFiles, iter_pairs

__all__ = ["dataset_info", "dataset_name", "write"]

IMAGE_TOKEN = "<image>"


def dataset_name(ctx: Context) -> str:
    """The datasets' name prefix: the version's name, made a plain identifier."""
    name = str(ctx.version.manifest.get("name") or "vlpref")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "vlpref"


def dataset_info(name: str, splits: list[str]) -> dict[str, Any]:
    """The `dataset_info.json` entries, one per split file."""
    return {
        f"{name}_{split}": {
            "file_name": f"{name}_{split}.json",
            "formatting": "sharegpt",
            "ranking": True,
            "columns": {
                "messages": "conversations",
                "chosen": "chosen",
                "rejected": "rejected",
                "images": "images",
            },
            "tags": {
                "role_tag": "from",
                "content_tag": "value",
                "user_tag": "human",
                "assistant_tag": "gpt",
            },
        }
        for split in splits
    }


def write(ctx: Context) -> Written:
    name = dataset_name(ctx)
    images = ImageFiles(ctx.out)
    files: dict[str, IO[str]] = {}
    counts: dict[str, int] = {}
    try:
        for split, batch in iter_pairs(ctx.version, ctx.filters, ctx.tally, image=True):
            f = files.get(split)
            if f is None:
                f = files[split] = (ctx.out / f"{name}_{split}.json").open("w", encoding="utf-8")
                f.write("[\n")  # a JSON array, written a row at a time
            for row in batch.to_pylist():
                row_json = {
                    "conversations": [{"from": "human", "value": IMAGE_TOKEN + row["question"]}],
                    "chosen": {"from": "gpt", "value": row["chosen"]},
                    "rejected": {"from": "gpt", "value": row["rejected"]},
                    "images": [images.add(row["image_id"], row["image"])],
                }
                f.write(("" if counts.get(split) is None else ",\n") + json_line(row_json))
                counts[split] = counts.get(split, 0) + 1
                ctx.tally.written += 1
    finally:
        for f in files.values():
            f.write("\n]\n")
            f.close()
    info = dataset_info(name, list(counts))
    (ctx.out / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    train = f"{name}_train" if "train" in counts else next(iter(info), f"{name}_train")
    return Written(
        files=relative_files(ctx.out),
        splits=counts,
        unit="pairs",
        command=(
            "llamafactory-cli train CONFIG.yaml  # with stage: dpo, "
            f"dataset_dir: {ctx.final}, dataset: {train}"
        ),
        notes=[
            f"datasets in dataset_info.json: {', '.join(info) or 'none'}",
            "image paths are relative to dataset_dir (LLaMA-Factory's media_dir default)",
        ],
    )
