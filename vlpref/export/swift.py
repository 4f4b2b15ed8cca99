"""ms-swift's RLHF format (DPO, ORPO, CPO, SimPO, RM), with images as files.

As ms-swift's "Custom Dataset" docs give it (standard format, RLHF, plus the multimodal keys): a
JSON Lines file per split, each line

    {"messages": [{"role": "user", "content": "<image>QUESTION"},
                  {"role": "assistant", "content": CHOSEN}],
     "rejected_response": REJECTED,
     "images": ["/abs/path/images/<image_id>.png"]}

`<image>` marks where the image goes. The docs ask for image paths "preferably absolute", so the
paths are absolute, to where the export lies when written: a moved export needs its paths
rewritten (or the images kept where they were).
"""

from __future__ import annotations

from typing import IO

from vlpref.export.core import Context, Written, json_line, relative_files
from vlpref.export.source import ImageFiles, iter_pairs

__all__ = ["write"]

IMAGE_TOKEN = "<image>"


def write(ctx: Context) -> Written:
    images = ImageFiles(ctx.out)
    files: dict[str, IO[str]] = {}
    counts: dict[str, int] = {}
    try:
        for split, batch in iter_pairs(ctx.version, ctx.filters, ctx.tally, image=True):
            f = files.get(split)
            if f is None:
                f = files[split] = (ctx.out / f"{split}.jsonl").open("w", encoding="utf-8")
            for row in batch.to_pylist():
                rel = images.add(row["image_id"], row["image"])
                line = {
                    "messages": [
                        {"role": "user", "content": IMAGE_TOKEN + row["question"]},
                        {"role": "assistant", "content": row["chosen"]},
                    ],
                    "rejected_response": row["rejected"],
                    "images": [str(ctx.final / rel)],
                }
                f.write(json_line(line) + "\n")
                counts[split] = counts.get(split, 0) + 1
                ctx.tally.written += 1
    finally:
        for f in files.values():
            f.close()
    val = f" --val_dataset {ctx.final / 'validation.jsonl'}" if "validation" in counts else ""
    return Written(
        files=relative_files(ctx.out),
        splits=counts,
        unit="pairs",
        command=(
            f"swift rlhf --rlhf_type dpo --model MODEL --dataset {ctx.final / 'train.jsonl'}{val}"
        ),
        notes=["image paths are absolute, to where the export was written"],
    )
