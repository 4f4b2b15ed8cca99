"""The embedded retrieval index with real torch, open_clip and FAISS (CPU), on the tiny random
CLIP of `tiny_clip` (built here; no download): `vlpref index build` over a folder and a
manifest, searching it, the images stage through it, and the demo variant: a version built by a
Prefect flow run from a local image pool through the retrieval source and the index.

The model is noise, so nothing here asserts which image a query finds: only the structure
(counts, provenance, scores in range, determinism) that the real code path must produce."""

from __future__ import annotations

import io
import itertools
import json
import random
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests_trainers.tiny_clip import build as build_tiny_clip
from tests_trainers.tiny_clip import ensure_torchvision

ensure_torchvision()

from flows.build import build_dataset  # noqa: E402
from tasks.images import collect_images  # noqa: E402
from vlpref.config import ImagesStage, RetrievalSource  # noqa: E402
from vlpref.errors import ConfigError  # noqa: E402
from vlpref.images.index import build_index, open_index  # noqa: E402
from vlpref.index_cli import index_app  # noqa: E402
from vlpref.sim.testing import SimServer, sim_run_config  # noqa: E402
from vlpref.store import Store  # noqa: E402
from vlpref.taxonomy import load_taxonomy  # noqa: E402

POOL_SIZE = 40
CYBER = load_taxonomy("builtin:demo").find("Malicious Use/Security threats/cyber")


def _picture(seed: int) -> bytes:
    rng = random.Random(seed)
    w, h = rng.randint(48, 160), rng.randint(48, 160)
    image = Image.frombytes("RGB", (w, h), rng.randbytes(w * h * 3))
    out = io.BytesIO()
    image.save(out, "JPEG" if seed % 2 else "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pool") / "images"
    (folder / "sub").mkdir(parents=True)
    for seed in range(POOL_SIZE):
        where = folder / "sub" if seed % 5 == 0 else folder
        (where / f"img{seed:03d}.{'jpg' if seed % 2 else 'png'}").write_bytes(_picture(seed))
    (folder / "notes.txt").write_text("not an image")  # left out, with its reason
    (folder / ".hidden.png").write_bytes(_picture(999))  # hidden: not even listed
    return folder


@pytest.fixture(scope="module")
def index(pool: Path, model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("index") / "pool-index"
    report = build_index(pool, model, out, batch_size=8)
    assert report.indexed == POOL_SIZE and list(report.skipped) == ["notes.txt"]
    return out


def test_the_index_records_its_pool_model_and_items(index: Path, pool: Path, model: Path) -> None:
    meta = json.loads((index / "index.json").read_text())
    assert meta["format"] == "vlpref-index/1" and meta["count"] == POOL_SIZE and meta["dim"] == 32
    assert meta["root"] == str(pool.resolve()) and meta["model"]["path"] == str(model.resolve())
    assert list(meta["skipped"]) == ["notes.txt"]  # with the normaliser's reason
    opened = open_index(index)
    paths = [row["path"] for row in opened.rows]
    assert "sub/img000.png" in paths and len(set(paths)) == POOL_SIZE
    found = opened.search(["hack a network", "phishing"], 5)
    assert [len(hits) for hits in found] == [5, 5]
    scores = [score for hits in found for _, score in hits]
    assert all(-1.0001 <= s <= 1.0001 for s in scores)
    assert all(a >= b for hits in found for (_, a), (_, b) in itertools.pairwise(hits))
    alone = opened.search(["hack a network"], 5)[0]  # deterministic (to float rounding)
    assert [r["path"] for r, _ in alone] == [r["path"] for r, _ in found[0]]
    assert [s for _, s in alone] == pytest.approx([s for _, s in found[0]], abs=1e-5)


def test_the_cli_builds_from_a_manifest_and_the_model_must_match(
    pool: Path, model: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    manifest = pool / "pool.csv"  # its paths are relative to it, inside its folder
    manifest.write_text("path,label\nimg001.jpg,a\nsub/img005.jpg,b\n,c\nmissing.png,d\n")
    out = tmp_path / "from-manifest"
    try:
        result = CliRunner().invoke(
            index_app, ["build", str(manifest), "--model", str(model), "--out", str(out)]
        )
    finally:
        manifest.unlink()
    assert result.exit_code == 0, result.output
    assert "indexed 2 image(s)" in result.output
    meta = json.loads((out / "index.json").read_text())
    assert meta["count"] == 2 and set(meta["skipped"]) == {"missing.png", "pool.csv:line 4"}

    other = build_tiny_clip(tmp_path / "other-clip")  # same architecture, new weights file
    import torch

    state = torch.load(other / "open_clip_pytorch_model.bin")
    state["logit_scale"] = state["logit_scale"] + 1.0
    torch.save(state, other / "open_clip_pytorch_model.bin")
    with pytest.raises(ConfigError, match="queries must be embedded by the index's own model"):
        open_index(out, other)


def test_the_images_stage_reads_what_the_index_finds(index: Path, pool: Path) -> None:
    source = RetrievalSource.model_validate(
        {"kind": "retrieval", "index": str(index), "top_k": 4, "per_branch": 6}
    )
    out = collect_images(CYBER, ImagesStage(source=source), base_dir=Path("."))
    assert out.n_out == 6 and not out.failures
    metas = [json.loads(m) for m in out.rows.column("source_meta").to_pylist()]
    assert {m["retrieval"] for m in metas} == {"index"}
    assert {m["query"] for m in metas} <= {"hack a network", "hacking", "cyber attack", "phishing"}
    assert all((pool / m["path"]).is_file() and -1 <= m["score"] <= 1 for m in metas)
    assert len({m["path"] for m in metas}) == 6  # an image several queries found, once

    # The pool said to be elsewhere (moved): its files are looked for there, and missing.
    elsewhere = source.model_copy(update={"root": str(index)})
    refused = collect_images(CYBER, ImagesStage(source=elsewhere), base_dir=Path("."))
    assert refused.n_out == 0 and {f.kind for f in refused.failures} == {"missing"}


SIM = {
    "models": {
        "sim-refuser": {"persona": "refuser"},
        "sim-jailbroken": {"persona": "jailbroken"},
        "sim-judge": {"persona": "judge"},
    }
}


def test_demo_variant_builds_a_version_from_a_local_pool_through_the_index(
    pool: Path, model: Path, tmp_path: Path, prefect_server: str
) -> None:
    """The demo's run, with images retrieved from a local pool by the embedded index."""
    started = time.perf_counter()
    build_index(pool, model, tmp_path / "index")  # the config names it: index
    index_s = time.perf_counter() - started
    with SimServer(SIM) as sim:
        data = sim_run_config(
            sim.base_url,
            name="retrieval-demo",
            taxonomy="builtin:demo",
            workspace=str(tmp_path / "ws"),
            store=str(tmp_path / "store"),
            models=["refuser", "jailbroken"],
            stages={
                "images": {
                    "source": {"kind": "retrieval", "index": "index", "top_k": 3, "per_branch": 3}
                }
            },
        )
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        started = time.perf_counter()
        version = Store(str(tmp_path / "store")).open(build_dataset(str(config)))
        build_s = time.perf_counter() - started
    images = version.table("images")
    assert images.num_rows > 0 and set(images.column("source").to_pylist()) == {"retrieval"}
    metas = [json.loads(m) for m in images.column("source_meta").to_pylist()]
    assert all((pool / m["path"]).is_file() for m in metas)
    assert version.table("pairs").num_rows > 0
    print(f"\nretrieval demo: index of {POOL_SIZE} images {index_s:.1f} s, build {build_s:.1f} s")
