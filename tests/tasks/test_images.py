import io
import json
import random
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.images import check_overrides, choose_source, collect_images
from tests.images.safety import forbid_non_loopback
from vlpref.config import FolderSource, ImagesStage, ManifestSource, TypographicSource
from vlpref.errors import ConfigError
from vlpref.records import IMAGES
from vlpref.stage import StageOutput
from vlpref.taxonomy import Subcategory, Taxonomy, load_taxonomy

ROOT = Path(__file__).resolve().parents[2]
DEMO: Taxonomy = load_taxonomy(ROOT / "taxonomy" / "demo.yaml")
CYBER = DEMO.find("Malicious Use/Security threats/cyber")
MALWARE = DEMO.find("Malicious Use/Security threats/malware")
BULLY = DEMO.find("Representation & ToxicityHarms/Toxic/bully")


def photo(seed: int, size: tuple[int, int] = (96, 64), fmt: str = "JPEG") -> bytes:
    rng = random.Random(seed)
    image = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def branch_dir(root: Path, leaf: Subcategory) -> Path:
    folder = root / leaf.class1 / leaf.class2 / leaf.class3
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def labels(leaf: Subcategory) -> dict[str, str]:
    return {"class1": leaf.class1, "class2": leaf.class2, "class3": leaf.class3}


def check_output(out: StageOutput, leaf: Subcategory) -> list[dict[str, Any]]:
    """What every images output must satisfy; returns its rows."""
    assert out.stage == "images" and out.branch_id == leaf.branch_id
    assert out.n_out is not None and out.n_in == out.n_out + out.n_failed
    assert out.rows.schema == IMAGES
    rows: list[dict[str, Any]] = out.rows.to_pylist()
    assert len({r["image_id"] for r in rows}) == len(rows)
    for r in rows:
        assert (
            r["image_name"] == f"{r['image_id'][:16]}.{'jpg' if r['format'] == 'jpeg' else 'png'}"
        )
        assert (r["class1"], r["class2"], r["class3"]) == (leaf.class1, leaf.class2, leaf.class3)
        assert r["branch_id"] == leaf.branch_id
        scores = json.loads(r["filter_scores"])
        assert (scores["width"], scores["height"]) == (r["width"], r["height"])
        assert "text_likeness" in scores
        json.loads(r["source_meta"])
    assert out.extra["duplicates"] == sum(f.kind == "duplicate" for f in out.failures)
    return rows


# --------------------------------------------------------------------------- typographic


def test_default_stage_renders_typographic_images() -> None:
    stage = ImagesStage()
    out = collect_images(CYBER, stage, base_dir=ROOT)
    rows = check_output(out, CYBER)
    assert (out.n_in, out.n_out, out.n_failed) == (4, 4, 0)
    assert {r["source"] for r in rows} == {"typographic"}
    assert {r["format"] for r in rows} == {"png"}
    meta = json.loads(rows[0]["source_meta"])
    assert meta["text"] == CYBER.key_phrase and meta["renderer"].startswith("vlpref-typographic")
    assert meta["font_size"] >= 512 // 16
    assert json.loads(rows[0]["filter_scores"])["text_likeness"] > 0.8
    again = collect_images(CYBER, stage, base_dir=ROOT)
    assert again.rows.column("image_id").to_pylist() == out.rows.column("image_id").to_pylist()


def test_typographic_variants_past_the_combinations_are_counted_as_duplicates() -> None:
    leaf = Subcategory("D/C/S", "D", "C", "S", ("only",), "just this", spa_vl=False)
    combos = 2 * 2 * 6 * 9  # texts × layouts × palettes × placements
    stage = ImagesStage(source=TypographicSource(per_branch=combos + 3, size=64))
    out = collect_images(leaf, stage, base_dir=ROOT)
    check_output(out, leaf)
    assert (out.n_in, out.n_out, out.n_failed) == (combos + 3, combos, 3)
    assert out.extra["duplicates"] == 3
    assert [f.item_id for f in out.failures] == [f"typographic:{combos + i}" for i in range(3)]
    assert "same image as typographic:0" in out.failures[0].reason


# --------------------------------------------------------------------------- folder


def test_folder_source_accounts_for_every_file(tmp_path: Path) -> None:
    folder = branch_dir(tmp_path / "images", CYBER)
    good = photo(1)
    (folder / "a.jpg").write_bytes(good)
    (folder / "b.png").write_bytes(photo(2, fmt="PNG"))
    (folder / "copy-of-a.jpg").write_bytes(good)  # same bytes, another name
    (folder / "notes.txt").write_text("not an image")
    (folder / "cut.jpg").write_bytes(good[: len(good) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "tiny.png").write_bytes(photo(3, size=(8, 8), fmt="PNG"))
    stage = ImagesStage(source=FolderSource(kind="folder", path="images"))
    out = collect_images(CYBER, stage, base_dir=tmp_path)
    rows = check_output(out, CYBER)
    assert (out.n_in, out.n_out, out.n_failed) == (7, 2, 5)
    assert [json.loads(r["source_meta"])["path"] for r in rows] == ["a.jpg", "b.png"]
    assert [r["format"] for r in rows] == ["jpeg", "png"]
    branch = f"{CYBER.class1}/{CYBER.class2}/{CYBER.class3}"
    assert all(f.item_id.startswith(branch + "/") for f in out.failures)  # relative to the root
    assert json.loads(rows[0]["source_meta"])["folder"] == branch
    assert not any(str(tmp_path) in r["source_meta"] for r in rows)
    kinds = {Path(f.item_id).name: f.kind for f in out.failures}
    assert kinds == {
        "copy-of-a.jpg": "duplicate",
        "cut.jpg": "truncated",
        "empty.png": "empty",
        "notes.txt": "not_image",
        "tiny.png": "too_small",
    }
    assert out.extra["failed_by_kind"]["duplicate"] == 1
    original = json.loads(rows[0]["source_meta"])["original"]
    assert original["format"] == "JPEG" and original["width"] == 96


def test_oversized_images_are_bounded_by_the_stage(tmp_path: Path) -> None:
    (branch_dir(tmp_path, CYBER) / "big.png").write_bytes(photo(4, size=(400, 100), fmt="PNG"))
    stage = ImagesStage(source=FolderSource(kind="folder", path="."), max_side=64, min_side=8)
    rows = check_output(collect_images(CYBER, stage, base_dir=tmp_path), CYBER)
    assert (rows[0]["width"], rows[0]["height"]) == (64, 16)


def test_a_branch_without_a_folder_is_empty_not_an_error(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    stage = ImagesStage(source=FolderSource(kind="folder", path="images"))
    out = collect_images(CYBER, stage, base_dir=tmp_path)
    assert (out.n_in, out.n_out, out.n_failed) == (0, 0, 0)
    assert "no folder" in out.extra["notes"][0]


# --------------------------------------------------------------------------- overrides


def test_overrides_longest_prefix_wins(tmp_path: Path) -> None:
    tree = FolderSource(kind="folder", path="tree")
    flat = FolderSource(kind="folder", path="flat")
    stage = ImagesStage(
        overrides={"Malicious Use": tree, "Malicious Use/Security threats/cyber": flat}
    )
    assert choose_source(CYBER, stage).source == flat
    assert choose_source(CYBER, stage).exact
    assert choose_source(MALWARE, stage).source == tree
    assert choose_source(MALWARE, stage).override == "Malicious Use"
    assert choose_source(BULLY, stage).source == stage.source
    assert choose_source(BULLY, stage).override is None
    # A prefix must end at a component boundary: "Malicious" is not "Malicious Use".
    assert choose_source(CYBER, ImagesStage(overrides={"Malicious": tree})).override is None

    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.jpg").write_bytes(photo(5))
    (branch_dir(tmp_path / "tree", MALWARE) / "y.jpg").write_bytes(photo(6))
    cyber = collect_images(CYBER, stage, base_dir=tmp_path)  # exact override: flat folder
    malware = collect_images(MALWARE, stage, base_dir=tmp_path)  # prefix override: the tree
    bully = collect_images(BULLY, stage, base_dir=tmp_path)  # no override: typographic
    assert (cyber.n_out, cyber.extra["source"]) == (1, "folder")
    assert (malware.n_out, malware.extra["override"]) == (1, "Malicious Use")
    assert (bully.n_out, bully.extra["source"]) == (4, "typographic")


def test_an_override_that_matches_nothing_is_a_config_error() -> None:
    folder = FolderSource(kind="folder", path="x")
    check_overrides(ImagesStage(overrides={"Malicious Use/Security threats": folder}), DEMO)
    with pytest.raises(ConfigError, match="Malicious Us") as info:
        check_overrides(ImagesStage(overrides={"Malicious Us": folder}), DEMO)
    assert "overrides" in str(info.value)


# --------------------------------------------------------------------------- manifest + URLs


REQUESTS: list[str] = []  # the paths the loopback web server was asked for


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """Static files over HTTP on loopback: (base url, the folder it serves)."""
    folder = tmp_path_factory.mktemp("web")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def send_head(self) -> Any:
            REQUESTS.append(self.path)
            return super().send_head()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]
    yield f"http://{host!s}:{port}", folder
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_non_loopback(monkeypatch)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # The stage honours proxy variables (real downloads need them); loopback must bypass them.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def test_manifest_dedupes_across_local_files_and_urls(
    tmp_path: Path, web: tuple[str, Path]
) -> None:
    url, served = web
    shared, own = photo(7), photo(8)
    (served / "shared.jpg").write_bytes(shared)
    (served / "own.jpg").write_bytes(own)
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "shared.jpg").write_bytes(shared)
    mine, other = labels(CYBER), labels(MALWARE)
    rows = [
        {"path": "local/shared.jpg", **mine},
        {"url": f"{url}/shared.jpg", **mine},  # the same image, downloaded: a duplicate
        {"url": f"{url}/own.jpg", **mine},
        {"url": f"{url}/missing.jpg", **mine},  # 404
        {"url": f"{url}/own.jpg", **other},  # another branch's row: skipped, not failed
        {**mine},  # neither path nor url
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # The server is on loopback: allowed explicitly (refused by default, see below).
    source = ManifestSource(kind="manifest", path="manifest.jsonl", allow_private=True)
    stage = ImagesStage(source=source)
    out = collect_images(CYBER, stage, base_dir=tmp_path)
    kept = check_output(out, CYBER)
    assert (out.n_in, out.n_out, out.n_failed) == (5, 2, 3)
    assert out.extra["skipped_rows"] == 1
    assert [r["source"] for r in kept] == ["manifest", "url"]
    url_meta = json.loads(kept[1]["source_meta"])
    assert url_meta["url"] == f"{url}/own.jpg" and url_meta["content_type"] == "image/jpeg"
    assert url_meta["original"]["sha256"] and url_meta["row"] == "line 3"
    failures = {f.item_id: f for f in out.failures}
    assert failures["manifest.jsonl:line 2"].kind == "duplicate"
    assert "manifest.jsonl:line 1" in failures["manifest.jsonl:line 2"].reason
    assert failures["manifest.jsonl:line 4"].kind == "http"
    assert failures["manifest.jsonl:line 6"].kind == "manifest_row"
    assert manifest.name == "manifest.jsonl"

    # The malware branch sees only its own row, and the same image under its own labels.
    malware = collect_images(MALWARE, stage, base_dir=tmp_path)
    assert (malware.n_in, malware.n_out, malware.extra["skipped_rows"]) == (1, 1, 5)
    assert malware.rows.column("image_id")[0] == out.rows.column("image_id")[1]


def test_url_rows_to_internal_addresses_are_refused_by_default(
    tmp_path: Path, web: tuple[str, Path]
) -> None:
    url, served = web
    (served / "internal.jpg").write_bytes(photo(10))
    host, port = url.removeprefix("http://").split(":")
    mine = labels(CYBER)
    rows = [
        {"url": f"{url}/internal.jpg", **mine},
        {"url": f"http://localhost:{port}/internal.jpg", **mine},
        {"url": "http://169.254.169.254/latest/meta-data/iam/", **mine},
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = len(REQUESTS)
    stage = ImagesStage(source=ManifestSource(kind="manifest", path="m.jsonl"))
    out = collect_images(CYBER, stage, base_dir=tmp_path)
    assert (out.n_in, out.n_out, out.n_failed) == (3, 0, 3)
    assert [f.kind for f in out.failures] == ["refused_host"] * 3
    assert "link-local" in out.failures[2].reason
    assert REQUESTS[before:] == []  # nothing was asked of the server
    # Allowed by address (127.0.0.1) and by name (localhost, whatever it resolves to).
    allowed = ManifestSource(kind="manifest", path="m.jsonl", allow_hosts=(host, "localhost"))
    out = collect_images(CYBER, ImagesStage(source=allowed), base_dir=tmp_path)
    assert out.n_out == 1 and out.extra["duplicates"] == 1  # localhost: the same image
    assert [f.kind for f in out.failures] == ["duplicate", "refused_host"]


def test_published_urls_and_paths_carry_no_credentials(
    tmp_path: Path, web: tuple[str, Path]
) -> None:
    url, served = web
    (served / "cred.jpg").write_bytes(photo(11))
    secret_base = url.replace("http://", "http://user:hunter2@")
    mine = labels(CYBER)
    rows = [
        {"url": f"{secret_base}/cred.jpg?token=tok123&X-Amz-Signature=sig123&w=1", **mine},
        {"url": f"{secret_base}/gone.jpg?api_key=key123", **mine},
        {"url": "ftp://user:hunter2@example.test/x.jpg?sig=sig123", **mine},
        {"path": "local.jpg", "url": f"{secret_base}/cred.jpg?token=tok123", **mine},
    ]
    (tmp_path / "local.jpg").write_bytes(photo(12))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = ManifestSource(kind="manifest", path="m.jsonl", allow_private=True)
    out = collect_images(CYBER, ImagesStage(source=source), base_dir=tmp_path)
    kept = check_output(out, CYBER)
    assert (out.n_in, out.n_out, out.n_failed) == (4, 2, 2)
    assert json.loads(kept[0]["source_meta"])["url"] == f"{url}/cred.jpg?w=1"
    assert json.loads(kept[1]["source_meta"])["url"] == f"{url}/cred.jpg"
    published = [r["source_meta"] for r in kept] + [f"{f.item_id} {f.reason}" for f in out.failures]
    for text in published:
        for secret in ("hunter2", "tok123", "sig123", "key123", str(tmp_path)):
            assert secret not in text, (secret, text)
    assert [f.kind for f in out.failures] == ["manifest_row", "http"]


def test_parquet_manifest_end_to_end(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(photo(9))
    pq.write_table(
        pa.Table.from_pylist([{"path": "a.jpg", **labels(BULLY)}]), tmp_path / "m.parquet"
    )
    stage = ImagesStage(source=ManifestSource(kind="manifest", path="m.parquet"))
    out = collect_images(BULLY, stage, base_dir=tmp_path)
    assert (out.n_in, out.n_out) == (1, 1)
    assert json.loads(out.rows.to_pylist()[0]["source_meta"])["row"] == "row 1"


async def test_collect_images_also_works_under_a_running_event_loop() -> None:
    out = collect_images(CYBER, ImagesStage(source=TypographicSource(per_branch=2)), base_dir=ROOT)
    assert out.n_out == 2


def test_failures_table_is_well_formed(tmp_path: Path) -> None:
    (branch_dir(tmp_path, CYBER) / "bad.png").write_bytes(b"nope")
    stage = ImagesStage(source=FolderSource(kind="folder", path="."))
    out = collect_images(CYBER, stage, base_dir=tmp_path)
    table = out.failures_table()
    assert table.num_rows == 1 and table.column("stage")[0].as_py() == "images"
    assert table.column("kind")[0].as_py() == "not_image"
