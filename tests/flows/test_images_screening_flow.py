"""Near-duplicates and filters through a real flow run: a folder source whose two branches share
a picture (resized in the second), a filter that refuses one image, and a near-copy inside a
branch. The version's images table carries `phash` and the filters' scores, the manifest the
per-source and per-filter counts, and the report lists the cross-branch pair without removing
either image (docs/images.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import yaml

from flows.build import build_dataset
from tests.images.drawn import EDITS, encode, scene
from vlpref.report_html import REPORT_NAME
from vlpref.sim.testing import SimServer, sim_run_config
from vlpref.store import Store

REPO = Path(__file__).resolve().parents[2]
BRANCHES = ("Malicious Use/Security threats/cyber", "Malicious Use/Security threats/malware")


def test_screening_across_a_build(tmp_path: Path, prefect_server: str) -> None:
    pool = tmp_path / "pool"
    cyber = pool / BRANCHES[0]
    malware = pool / BRANCHES[1]
    cyber.mkdir(parents=True)
    malware.mkdir(parents=True)
    (cyber / "a.png").write_bytes(encode(scene(1)))
    (cyber / "b.png").write_bytes(encode(scene(2)))
    resize, png = EDITS["resize 0.75"]
    (cyber / "c_copy.png").write_bytes(png(resize(scene(2))))  # near-copy in the branch
    (malware / "a_same_picture.jpg").write_bytes(encode(scene(1).resize((400, 300)), "JPEG"))
    (malware / "b.png").write_bytes(encode(scene(3)))
    (malware / "c_tiny.png").write_bytes(encode(scene(4).resize((120, 90))))

    sim_models = {
        "sim-refuser": {"persona": "refuser"},
        "sim-jailbroken": {"persona": "jailbroken"},
        "sim-judge": {"persona": "judge"},
    }
    with SimServer({"models": sim_models}) as sim:
        data = sim_run_config(
            sim.base_url,
            taxonomy=str(REPO / "taxonomy" / "demo.yaml"),
            workspace=str(tmp_path / "ws"),
            store=str(tmp_path / "store"),
            models=["refuser", "jailbroken"],
            stages={
                "images": {
                    "source": {"kind": "folder", "path": str(pool)},
                    "filters": [{"name": "min_size", "min_side": 200}, {"name": "near_blank"}],
                }
            },
        )
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        version = Store(str(tmp_path / "store")).open(
            build_dataset(str(config), ["Malicious Use/Security threats"])
        )

    images = version.table("images")
    assert images.num_rows == 4  # a, b | a_same_picture, b: both copies of scene 1 published
    assert all(len(h) == 16 for h in images["phash"].to_pylist())
    scores = [json.loads(s) for s in images["filter_scores"].to_pylist()]
    assert all({"min_size", "near_blank", "text_likeness"} <= set(s) for s in scores)

    counts = {
        info["path"]: info["stages"]["images"]["counts"]
        for info in version.manifest["branches"].values()
    }
    assert counts[BRANCHES[0]]["near_duplicates"] == 1
    assert counts[BRANCHES[0]]["by_source"] == {"folder": {"in": 3, "out": 2, "failed": 1}}
    assert counts[BRANCHES[1]]["filtered"] == {"min_size": 1}
    assert counts[BRANCHES[1]]["by_source"] == {"folder": {"in": 3, "out": 2, "failed": 1}}
    failures = version.table("failures")
    kinds = failures.filter(pc.equal(failures["stage"], "images"))["kind"].to_pylist()
    assert sorted(kinds) == ["filter_min_size", "near_duplicate"]

    report = Path(version.path(REPORT_NAME)).read_text()
    assert "Images: sources, filters, near-duplicates" in report
    assert "Across branches: 1 images are within 10 bits" in report  # malware/a_same_picture
    report_rows = report.split("looks like (branch)")[1]
    assert BRANCHES[1] in report_rows and BRANCHES[0] in report_rows
