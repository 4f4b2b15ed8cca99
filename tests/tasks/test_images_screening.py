"""The images stage's screening: near-duplicates in a branch, filters (built-in and a plug-in
found through its entry point), the `phash` and `filter_scores` columns, and the counts.

The plug-in is a real installed distribution as far as `importlib.metadata` is concerned (a
module plus a `.dist-info` with an `entry_points.txt` on `sys.path`), as tests/providers does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tasks.images import collect_images
from tests.images.drawn import EDITS, encode, scene
from tests.tasks.test_images import CYBER, ROOT, branch_dir, check_output
from vlpref.config import FolderSource, ImagesStage
from vlpref.images.dedupe import distance
from vlpref.retry import PERMANENT_KINDS, TRANSIENT_KINDS

PLUGIN = '''
from typing import Any, Mapping

from PIL import ImageChops

from vlpref.images.filters import FilterImage, ImageFilter, Verdict


class RedFilter(ImageFilter):
    """Share of strongly red pixels; rejects over `max_share`."""

    def __init__(self, max_share: float) -> None:
        self.max_share = max_share

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "RedFilter":
        unknown = set(options) - {"max_share"}
        if unknown:
            raise ValueError(f"unknown options {sorted(unknown)}")
        return cls(float(options.get("max_share", 0.5)))

    def check(self, image: FilterImage) -> Verdict:
        r, g, b = image.image.split()
        mask = ImageChops.multiply(
            r.point(lambda v: 255 if v > 180 else 0),
            ImageChops.multiply(
                g.point(lambda v: 255 if v < 90 else 0), b.point(lambda v: 255 if v < 90 else 0)
            ),
        )
        red = mask.histogram()[255] / (image.image.width * image.image.height)
        if red > self.max_share:
            return Verdict(round(red, 3), f"{red:.0%} red")
        return Verdict(round(red, 3))


class NotAFilter:
    pass
'''


@pytest.fixture
def plugin_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    (site / "red_filter_plugin.py").write_text(PLUGIN)
    info = site / "red_filter_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: red-filter-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[vlpref.image_filters]\n"
        "redness = red_filter_plugin:RedFilter\n"
        "broken = red_filter_plugin:NotAFilter\n"
    )
    monkeypatch.syspath_prepend(str(site))
    return site


def folder_stage(root: Path, **options: Any) -> ImagesStage:
    return ImagesStage.model_validate(
        {"source": FolderSource(kind="folder", path=str(root)).model_dump(), **options}
    )


def write(folder: Path, name: str, data: bytes) -> None:
    (folder / name).write_bytes(data)


def near_copies(folder: Path) -> None:
    """Two originals, copies of each (resized, re-encoded, cropped, colour-shifted) and two
    distinct scenes; file names sort originals first (a folder is listed in name order)."""
    for seed, prefix in ((1, "a"), (2, "b")):
        image = scene(seed)
        write(folder, f"{prefix}0_original.png", encode(image))
        for i, name in enumerate(("resize 0.5", "jpeg q30", "crop 2%", "tint +20 red")):
            edit, encoding = EDITS[name]
            ext = "jpg" if "jpeg" in name else "png"
            write(folder, f"{prefix}{i + 1}_copy.{ext}", encoding(edit(image)))
    write(folder, "c_distinct.png", encode(scene(3)))
    write(folder, "d_distinct.jpg", encode(scene(4), "JPEG", quality=90))


def test_near_duplicates_in_a_branch_fail_naming_the_kept_image(tmp_path: Path) -> None:
    near_copies(branch_dir(tmp_path, CYBER))
    out = collect_images(CYBER, folder_stage(tmp_path), base_dir=ROOT)
    rows = check_output(out, CYBER)
    kept = sorted(json.loads(r["source_meta"])["path"].rsplit("/", 1)[-1] for r in rows)
    assert kept == ["a0_original.png", "b0_original.png", "c_distinct.png", "d_distinct.jpg"]
    near = [f for f in out.failures if f.kind == "near_duplicate"]
    assert len(near) == 8 and len(out.failures) == 8
    for failure in near:
        original = failure.item_id.rsplit("/", 1)[-1][0] + "0_original.png"
        assert (
            f"near-duplicate of {failure.item_id.rsplit('/', 1)[0]}/{original}:" in failure.reason
        )
        assert "(near_duplicate_distance 10)" in failure.reason
    hashes = [r["phash"] for r in rows]
    assert all(len(h) == 16 for h in hashes)
    assert min(distance(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :]) > 10
    assert out.extra["near_duplicates"] == 8
    assert out.extra["by_source"] == {"folder": {"in": 12, "out": 4, "failed": 8}}
    assert out.extra["filtered"] == {}
    assert "near_duplicate" in PERMANENT_KINDS and "filter_error" in TRANSIENT_KINDS


def test_distance_zero_turns_the_check_off(tmp_path: Path) -> None:
    near_copies(branch_dir(tmp_path, CYBER))
    out = collect_images(CYBER, folder_stage(tmp_path, near_duplicate_distance=0), base_dir=ROOT)
    assert (out.n_out, out.n_failed) == (12, 0)
    assert all(r["phash"] for r in out.rows.to_pylist())  # hashed all the same


@pytest.mark.usefixtures("plugin_on_path")
def test_a_plugin_filter_screens_through_its_entry_point(tmp_path: Path) -> None:
    folder = branch_dir(tmp_path, CYBER)
    red = scene(5)
    red.paste((230, 20, 20), (0, 0, red.width, red.height * 3 // 4))
    write(folder, "a_red.png", encode(red))
    write(folder, "b_scene.png", encode(scene(6)))
    write(folder, "c_small.png", encode(scene(7).resize((160, 120))))
    write(folder, "d_wide.png", encode(scene(8).resize((1200, 300))))
    stage = folder_stage(
        tmp_path,
        filters=[
            {"name": "min_size", "min_side": 150},
            {"name": "aspect"},
            {"name": "redness", "max_share": 0.5},
        ],
    )
    out = collect_images(CYBER, stage, base_dir=ROOT)
    (row,) = check_output(out, CYBER)
    scores = json.loads(row["filter_scores"])
    assert scores["min_size"] == 360 and scores["aspect"] == pytest.approx(4 / 3, abs=1e-3)
    assert 0 <= scores["redness"] < 0.5 and "text_likeness" in scores  # measures stay
    by_item = {f.item_id.rsplit("/", 1)[-1]: f for f in out.failures}
    assert by_item["a_red.png"].kind == "filter_redness"
    assert by_item["a_red.png"].reason.startswith("redness: 7")
    assert by_item["c_small.png"].kind == "filter_min_size"
    assert by_item["d_wide.png"].kind == "filter_aspect"
    assert out.extra["filtered"] == {"aspect": 1, "min_size": 1, "redness": 1}
    assert out.extra["by_source"] == {"folder": {"in": 4, "out": 1, "failed": 3}}


@pytest.mark.usefixtures("plugin_on_path")
def test_plugin_options_and_classes_are_checked_when_the_config_loads() -> None:
    with pytest.raises(ValueError, match=r"unknown options \['max'\]"):
        ImagesStage.model_validate({"filters": [{"name": "redness", "max": 1}]})
    with pytest.raises(ValueError, match="not a subclass of vlpref's ImageFilter"):
        ImagesStage.model_validate({"filters": [{"name": "broken"}]})


def test_rejected_images_are_never_hashed_against(tmp_path: Path) -> None:
    # A filtered original does not make its copy a near-duplicate: only kept images count.
    folder = branch_dir(tmp_path, CYBER)
    image = scene(9)
    write(folder, "a_small.png", encode(image.resize((150, 112))))
    write(folder, "b_large.png", encode(image))
    stage = folder_stage(tmp_path, filters=[{"name": "min_size", "min_side": 200}])
    out = collect_images(CYBER, stage, base_dir=ROOT)
    assert [f.kind for f in out.failures] == ["filter_min_size"]
    assert out.n_out == 1


def test_typographic_variants_are_exempt(tmp_path: Path) -> None:
    out = collect_images(CYBER, ImagesStage(), base_dir=ROOT)
    assert out.n_failed == 0 and out.extra["by_source"] == {
        "typographic": {"in": 4, "out": 4, "failed": 0}
    }


def test_the_thumbnail_filters_see_is_bounded() -> None:
    from tasks.images import _thumbnail

    thumb = _thumbnail(encode(Image.new("RGB", (2000, 500), (10, 20, 30)), "JPEG"))
    assert thumb.mode == "RGB" and max(thumb.size) <= 512
