"""TRL's vision preference format (DPOTrainer with a vision-language model).

Each row is one pair, conversational, as TRL's docs ("Vision datasets") and its vision DPO
examples (HuggingFaceH4/rlaif-v_formatted) lay it out:

    images:   [<Image>]
    prompt:   [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q}]}]
    chosen:   [{"role": "assistant", "content": [{"type": "text", "text": C}]}]
    rejected: [{"role": "assistant", "content": [{"type": "text", "text": R}]}]

The `{"type": "image"}` part is the placeholder TRL fills with `images[0]`
(`trl.data_utils.prepare_multimodal_messages`); in Arrow every content part is a struct of
`type` and `text`, so the placeholder's `text` is null, as in rlaif-v_formatted. Ids, classes,
models, margin, confidence and consistency ride along for tracing a row back to the version.

Written: `dataset/` (`DatasetDict.save_to_disk`, one split per version split) and
`parquet/<split>.parquet` (with the `datasets` features, so `load_dataset("parquet", ...)` or
`trl dpo --dataset_name OUT/parquet` decode the images). The rows are streamed to an Arrow file per
split (`datasets`' own on-disk format), memory-mapped by `Dataset.from_file`, then saved both ways:
a split is never held in memory whole.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Final

import pyarrow as pa

from vlpref.export.core import Context, Written, relative_files, require_datasets
from vlpref.export.source import iter_pairs

__all__ = ["features", "rows", "write"]

META: Final = (
    "pair_id",
    "question_id",
    "image_id",
    "question_type",
    "class1",
    "class2",
    "class3",
    "chosen_model",
    "rejected_model",
)


def features() -> Any:
    """The `datasets.Features` of the export."""
    ds = require_datasets()
    text = ds.Value("string")
    message = ds.List({"role": text, "content": ds.List({"type": text, "text": text})})
    return ds.Features(
        {
            "images": ds.List(ds.Image()),
            "prompt": message,
            "chosen": message,
            "rejected": message,
            **{name: text for name in META},
            "margin": ds.Value("float64"),
            "confidence": ds.Value("float64"),
            "consistent": ds.Value("bool"),
        }
    )


def _text(text: str) -> list[dict[str, str | None]]:
    return [{"type": "text", "text": text}]


def rows(batch: pa.Table) -> dict[str, list[Any]]:
    """Quadruple rows (with `image`) -> the export's columns."""
    data = batch.to_pydict()
    return {
        "images": [[image] for image in data["image"]],
        "prompt": [
            [{"role": "user", "content": [{"type": "image", "text": None}, *_text(q)]}]
            for q in data["question"]
        ],
        "chosen": [[{"role": "assistant", "content": _text(c)}] for c in data["chosen"]],
        "rejected": [[{"role": "assistant", "content": _text(r)}] for r in data["rejected"]],
        **{name: data[name] for name in META},
        "margin": data["margin"],
        "confidence": data["confidence"],
        "consistent": data["consistent"],
    }


def _save(ds: Any, feats: Any, arrow_dir: Path, ctx: Context, names: list[str]) -> None:
    """The streamed Arrow files, memory-mapped, saved as Parquet and with `save_to_disk`."""
    parquet_dir = ctx.out / "parquet"
    parquet_dir.mkdir()
    splits = {}
    for split in names:
        dataset = ds.Dataset.from_file(
            str(arrow_dir / f"{split}.arrow"),
            info=ds.DatasetInfo(features=feats),
            split=ds.NamedSplit(split),
        )
        dataset.to_parquet(str(parquet_dir / f"{split}.parquet"))
        splits[split] = dataset
    if splits:
        ds.DatasetDict(splits).save_to_disk(str(ctx.out / "dataset"))


def write(ctx: Context) -> Written:
    ds = require_datasets()
    feats = features()
    schema = feats.arrow_schema
    arrow_dir = ctx.out / ".arrow"
    arrow_dir.mkdir()
    writers: dict[str, pa.RecordBatchStreamWriter] = {}
    sinks: list[pa.NativeFile] = []
    counts: dict[str, int] = {}
    try:
        for split, batch in iter_pairs(ctx.version, ctx.filters, ctx.tally, image=True):
            if split not in writers:
                sinks.append(pa.OSFile(str(arrow_dir / f"{split}.arrow"), "wb"))
                writers[split] = pa.ipc.new_stream(sinks[-1], schema)
            table = pa.Table.from_pydict(rows(batch), schema=schema)
            writers[split].write_table(table)
            counts[split] = counts.get(split, 0) + table.num_rows
            ctx.tally.written += table.num_rows
    finally:
        for writer in writers.values():
            writer.close()
        for sink in sinks:
            sink.close()
    # `datasets` draws a progress bar per split and save; the command prints one summary instead.
    bars_were_off = ds.utils.are_progress_bars_disabled()
    ds.utils.disable_progress_bars()
    try:
        _save(ds, feats, arrow_dir, ctx, list(writers))
    finally:
        if not bars_were_off:
            ds.utils.enable_progress_bars()
    shutil.rmtree(arrow_dir)
    notes = [
        "dataset/: datasets.load_from_disk(OUT/dataset); parquet/: datasets.load_dataset("
        "'parquet', data_dir=OUT/parquet) or trl dpo --dataset_name OUT/parquet",
        "conversational vision format: TRL fills the {'type': 'image'} placeholder with images[0]",
    ]
    if not counts:
        notes.append("no pair passed the filters: nothing to train on")
    return Written(
        files=relative_files(ctx.out),
        splits=counts,
        unit="pairs",
        command=(
            f"trl dpo --model_name_or_path MODEL --dataset_name {ctx.final / 'parquet'} "
            "--output_dir OUTPUT_DIR --no_remove_unused_columns"
        ),
        notes=notes,
    )
