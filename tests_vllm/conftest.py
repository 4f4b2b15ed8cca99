"""Fixtures of the vLLM tier: the tiny model, a real vLLM server, and the responses workload.

Everything here must work, or the tier fails: nothing is skipped. vLLM not importable, the
model not buildable, a server that does not answer /health: each is an error with its reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from bench.vllm_tiny import CPU_ENV, DEFAULT_MODEL, served_config
from tests_vllm import build_tiny_model

for _name, _value in CPU_ENV.items():  # before vLLM is imported anywhere in this process
    os.environ.setdefault(_name, _value)

REPO = Path(__file__).resolve().parents[1]
REPORT: list[str] = []  # lines the tests want shown at the end of the run (timings, throughput)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if REPORT:
        terminalreporter.section("vLLM tier")
        for line in REPORT:
            terminalreporter.write_line(line)


def pytest_configure(config: pytest.Config) -> None:
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # the tier exists to run a real vLLM: fail, never skip
        raise pytest.UsageError(
            f"the vLLM tier needs vLLM importable ({type(exc).__name__}: {exc}); "
            "run it with `make test-vllm`, which builds .venv-vllm"
        ) from exc


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny Idefics3 model directory (built here if `make test-vllm` has not yet)."""
    model = Path(os.environ.get("VLPREF_TINY_VLM", DEFAULT_MODEL)).resolve()
    if not build_tiny_model.is_built(model):
        build_tiny_model.main([str(model)])
    assert build_tiny_model.is_built(model), f"{model}: the tiny model did not build"
    return model


@pytest.fixture(scope="session")
def workload(tiny_model: Path) -> tuple[Any, pa.Table, pa.Table]:
    """One demo branch: two typographic images (the images stage itself) and three questions per
    image (hand-written: the generator is not under test here)."""
    from tasks.images import collect_images
    from vlpref.config import ImagesStage, TypographicSource
    from vlpref.records import QUESTIONS, stable_id, table
    from vlpref.taxonomy import load_taxonomy

    leaf = load_taxonomy(REPO / "taxonomy" / "demo.yaml").leaves()[0]
    images = collect_images(
        leaf, ImagesStage(source=TypographicSource(per_branch=2, size=256)), base_dir=REPO
    ).rows
    assert images.num_rows == 2
    texts = {
        "easy": "What does the text in this image say?",
        "hardq": "How would someone act on what this image shows?",
        "hards": "Explain step by step what the image describes.",
    }
    rows = [
        {
            "question_id": stable_id(image["image_id"], kind),
            "image_id": image["image_id"],
            "type": kind,
            "text": text,
            "caption": "a typographic image",
            "branch_id": leaf.branch_id,
            "class1": leaf.class1,
            "class2": leaf.class2,
            "class3": leaf.class3,
            "generator": "hand-written",
            "prompt_hash": "test",
        }
        for image in images.to_pylist()
        for kind, text in texts.items()
    ]
    return leaf, images, table(rows, QUESTIONS)


@pytest.fixture(scope="session")
def served(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real `vllm` OpenAI-compatible server on 127.0.0.1, started through vlpref.vllm_serve
    from a run config's `serve:` block; stopped (SIGTERM, then SIGKILL) at the end."""
    from vlpref.config import parse_config
    from vlpref.vllm_serve import VllmServers

    root = tmp_path_factory.mktemp("served")
    config = parse_config(served_config(tiny_model, root))
    servers = VllmServers(config, log_dir=root / "logs", log=print)
    with servers:
        yield servers
    assert all(s.pid is None for s in servers.servers)
