"""The TRL export through TRL's own vision data path and one DPO step.

A real version is exported (`vlpref.export`, format trl), loaded with `datasets.load_from_disk`,
then given to TRL as a user would: TRL's format checks (`is_conversational`,
`prepare_multimodal_messages`), its vision preference collator (chat template, image placeholder
expansion, pixel values, completion mask) with the tiny Idefics3 processor of the vLLM tier, and
a `DPOTrainer` step on the tiny randomly initialised model (CPU, no download). The text it learns
from is real; the model is noise: the test asserts structure and a finite loss, never wording.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest

from tests_vllm import build_tiny_model
from vlpref.export import ExportSpec, export_version
from vlpref.store import Version


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The vLLM tier's tiny Idefics3 model: the one `make test-vllm` built (VLPREF_TINY_VLM), or
    built here (seconds; no download)."""
    built = Path(os.environ.get("VLPREF_TINY_VLM", ".cache/vlpref-tiny-vlm")).resolve()
    if build_tiny_model.is_built(built):
        return built
    model = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model.build(model)
    return model


@pytest.fixture(scope="module")
def trl_dataset(version: Version, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from datasets import load_from_disk

    out = tmp_path_factory.mktemp("trl") / "export"
    export_version(version, ExportSpec("trl"), out)
    return load_from_disk(str(out / "dataset"))


def test_trl_reads_the_rows_as_conversational_vision_preferences(trl_dataset: Any) -> None:
    from trl.data_utils import is_conversational, prepare_multimodal_messages

    row = trl_dataset["train"][0]
    assert is_conversational(row)
    prompt = prepare_multimodal_messages(row["prompt"], images=row["images"])
    image_part, text_part = prompt[0]["content"]
    assert image_part["type"] == "image" and image_part["image"] is row["images"][0]
    assert text_part == {"type": "text", "text": row["prompt"][0]["content"][1]["text"]}


def test_trl_vision_collator_batches_the_export(trl_dataset: Any, tiny_model: Path) -> None:
    from transformers import AutoProcessor
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    processor = AutoProcessor.from_pretrained(str(tiny_model))
    rows = [trl_dataset["train"][i] for i in range(2)]
    batch = DataCollatorForVisionPreference(processor)(rows)
    # chosen and rejected of each row: 2 x 2 sequences, one image each.
    assert batch["input_ids"].shape[0] == 4
    assert batch["completion_mask"].shape == batch["input_ids"].shape
    assert batch["completion_mask"].sum(dim=1).min() > 0  # every sequence has its completion
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    per_sequence = (batch["input_ids"] == image_token).sum(dim=1)
    assert (per_sequence > 0).all() and len(set(per_sequence.tolist())) == 1
    assert batch["pixel_values"].shape[0] == 4


def test_one_dpo_step_on_the_export(trl_dataset: Any, tiny_model: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(str(tiny_model))
    model = AutoModelForImageTextToText.from_pretrained(str(tiny_model))
    args = DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-4,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        max_length=None,
    )
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=trl_dataset["train"], processing_class=processor
    )
    result = trainer.train()
    assert result.global_step == 2
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses and all(math.isfinite(loss) for loss in losses)
