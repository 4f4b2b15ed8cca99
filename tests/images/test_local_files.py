"""Local files stay local to the data: the root, regular files only, reads capped (issue 14.2)."""

import json
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.images import collect_images
from tests.images.safety import opened_paths
from vlpref.config import FolderSource, ImagesStage, ManifestSource
from vlpref.errors import ConfigError
from vlpref.images.normalize import ImageRejected
from vlpref.images.sources import LocalRoot, list_folder, list_manifest, read_local

from .test_sources import CLASSES, CYBER, PNG

LABELS = dict(zip(("class1", "class2", "class3"), CLASSES, strict=True))
SECRET = b"vlpref-test-secret-content"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A file outside every root the tests use, holding a recognisable secret."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "secret.png").write_bytes(SECRET)
    return folder / "secret.png"


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "data" / "pipe.png"
    path.parent.mkdir(exist_ok=True)
    os.mkfifo(path)
    yield path


def rejected(path: Path, root: Path, max_bytes: int = 100_000) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        read_local(path, max_bytes, root=LocalRoot.of(root))
    return info.value


# --------------------------------------------------------------------------- read_local


def test_paths_out_of_the_root_are_refused_unopened(
    tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "link.png").symlink_to(outside)
    (data / "sub").mkdir()
    (data / "sub" / "dirlink").symlink_to(outside.parent, target_is_directory=True)
    cases = [
        data / ".." / "elsewhere" / "secret.png",  # ../ climbing out
        outside,  # absolute, outside
        data / "link.png",  # a symlink pointing out
        data / "sub" / "dirlink" / "secret.png",  # through a symlinked folder
        Path("/proc/self/environ"),
        Path("/etc/passwd"),
        Path("~/.bashrc").expanduser(),
    ]
    with opened_paths(monkeypatch) as opened:
        for path in cases:
            error = rejected(path, data)
            assert error.kind == "outside_root", path
            assert "outside the image root" in error.reason
            assert str(tmp_path) not in error.reason and "/etc" not in error.reason
    assert opened == []  # refused on the resolved path, before any open


def test_inside_symlinks_are_fine(tmp_path: Path) -> None:
    (tmp_path / "real.png").write_bytes(PNG)
    (tmp_path / "alias.png").symlink_to(tmp_path / "real.png")
    assert read_local(tmp_path / "alias.png", 10_000, root=LocalRoot.of(tmp_path)) == PNG


def test_a_root_reached_through_a_symlink_still_holds(tmp_path: Path, outside: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.png").write_bytes(PNG)
    (tmp_path / "via").symlink_to(tmp_path / "real", target_is_directory=True)
    root = LocalRoot.of(tmp_path / "via")
    assert read_local(tmp_path / "via" / "a.png", 10_000, root=root) == PNG
    assert rejected(outside, tmp_path / "via").kind == "outside_root"


@pytest.mark.timeout(10)
def test_a_fifo_is_refused_without_hanging(fifo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started = time.monotonic()
    with opened_paths(monkeypatch) as opened:
        error = rejected(fifo, fifo.parent)
    assert error.kind == "not_regular" and "FIFO" in error.reason
    assert opened == []  # refused on stat, never opened
    assert time.monotonic() - started < 2


@pytest.mark.timeout(10)
def test_o_nonblock_guards_a_fifo_that_passes_the_stat_check(
    fifo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if the file had been swapped for a FIFO between stat and open: the open does not
    # block (O_NONBLOCK), and fstat of what was opened refuses it.
    real_is_reg, calls = stat.S_ISREG, []

    def first_lies(mode: int) -> bool:
        calls.append(mode)
        return True if len(calls) == 1 else real_is_reg(mode)

    monkeypatch.setattr(stat, "S_ISREG", first_lies)  # the module read_local uses
    started = time.monotonic()
    error = rejected(fifo, fifo.parent)
    assert error.kind == "not_regular" and len(calls) == 2
    assert time.monotonic() - started < 2


def test_devices_and_sockets_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with opened_paths(monkeypatch) as opened:
        zero = rejected(Path("/dev/zero"), Path("/dev"))
        null = rejected(Path("/dev/null"), Path("/"))
    assert zero.kind == null.kind == "not_regular"
    assert "character device" in zero.reason and zero.reason.startswith("zero: ")
    assert opened == []
    with socket.socket(socket.AF_UNIX) as server:
        path = tmp_path / "s.png"
        server.bind(str(path))
        error = rejected(path, tmp_path)
    assert error.kind == "not_regular" and "socket" in error.reason


def test_reads_are_capped_whatever_stat_says(monkeypatch: pytest.MonkeyPatch) -> None:
    # /dev/zero passed off as a regular file of size 0 (stat says 0; reads never end): at most
    # max_bytes + 1 bytes are read. (The RSS bound is measured in test_memory.py.)
    monkeypatch.setattr(stat, "S_ISREG", lambda mode: True)
    started = time.monotonic()
    error = rejected(Path("/dev/zero"), Path("/dev"), max_bytes=1_000_000)
    assert error.kind == "too_large" and "stopped reading" in error.reason
    assert time.monotonic() - started < 2


def test_proc_files_read_as_size_zero_are_capped_too(tmp_path: Path) -> None:
    # Inside a root that holds it, /proc/self/environ is a "regular" file of size 0.
    error = rejected(Path("/proc/self/environ"), Path("/proc"), max_bytes=16)
    assert error.kind == "too_large"
    assert os.environ.get("PATH", "x") not in error.reason


# --------------------------------------------------------------------------- folder source


def test_folder_symlinks_out_of_the_root_are_counted_failures(
    tmp_path: Path, outside: Path, fifo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flat = fifo.parent  # tmp/data, holding pipe.png already
    (flat / "good.png").write_bytes(PNG)
    (flat / "escape.png").symlink_to(outside)
    (flat / "etc").symlink_to("/etc", target_is_directory=True)  # a folder link out: one item
    (flat / "zero.png").symlink_to("/dev/zero")
    (flat / "loop").symlink_to(flat, target_is_directory=True)  # inside, already seen: skipped
    source = FolderSource(kind="folder", path=str(flat))
    listing = list_folder(source, CYBER, base_dir=tmp_path, flat=True)
    assert [i.item_id for i in listing.items] == [
        "escape.png",
        "etc",
        "good.png",
        "pipe.png",
        "zero.png",
    ]
    stage_source = FolderSource(kind="folder", path=str(flat), layout="flat")
    with opened_paths(monkeypatch) as opened:
        out = collect_images(CYBER, ImagesStage(source=stage_source), base_dir=tmp_path)
    kinds = {f.item_id: f.kind for f in out.failures}
    assert kinds == {
        "escape.png": "outside_root",
        "etc": "outside_root",
        "pipe.png": "not_regular",
        "zero.png": "outside_root",
    }
    assert (out.n_in, out.n_out, out.n_failed) == (5, 1, 4)
    assert opened == [os.path.realpath(flat / "good.png")]  # the one file inside, regular
    for failure in out.failures:
        assert str(tmp_path) not in failure.reason and SECRET.decode() not in failure.reason


def test_a_folder_root_can_widen_what_symlinks_may_reach(tmp_path: Path) -> None:
    data, shared = tmp_path / "data", tmp_path / "shared"
    data.mkdir()
    shared.mkdir()
    (shared / "a.png").write_bytes(PNG)
    (data / "a.png").symlink_to(shared / "a.png")
    narrow = FolderSource(kind="folder", path=str(data))
    wide = FolderSource(kind="folder", path=str(data), root=str(tmp_path))
    n = list_folder(narrow, CYBER, base_dir=tmp_path, flat=True)
    w = list_folder(wide, CYBER, base_dir=tmp_path, flat=True)
    assert n.root is not None and w.root is not None
    with pytest.raises(ImageRejected, match="outside the image root"):
        read_local(n.items[0].path or Path(), 10_000, root=n.root)
    assert read_local(w.items[0].path or Path(), 10_000, root=w.root) == PNG
    assert w.items[0].item_id == "data/a.png"  # relative to the configured root
    with pytest.raises(ConfigError, match="outside its root"):
        list_folder(
            FolderSource(kind="folder", path=str(data), root=str(shared)),
            CYBER,
            base_dir=tmp_path,
            flat=True,
        )


# --------------------------------------------------------------------------- manifest source


def test_manifest_paths_out_of_the_root_are_counted_failures(
    tmp_path: Path, outside: Path, fifo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = fifo.parent
    (data / "good.png").write_bytes(PNG)
    (data / "escape.png").symlink_to(outside)
    rows = [
        "good.png",
        "../elsewhere/secret.png",
        "../../../../../../../../etc/passwd",
        str(outside),
        "~/.bashrc",
        "/proc/self/environ",
        "/dev/zero",
        "pipe.png",
        "escape.png",
    ]
    manifest = data / "m.jsonl"
    manifest.write_text("".join(json.dumps({"path": p, **LABELS}) + "\n" for p in rows))
    stage = ImagesStage(source=ManifestSource(kind="manifest", path=str(manifest)))
    with opened_paths(monkeypatch) as opened:
        out = collect_images(CYBER, stage, base_dir=tmp_path)
    assert (out.n_in, out.n_out, out.n_failed) == (9, 1, 8)
    kinds = [(f.item_id, f.kind) for f in out.failures]
    assert kinds == [
        ("m.jsonl:line 2", "outside_root"),
        ("m.jsonl:line 3", "outside_root"),
        ("m.jsonl:line 4", "outside_root"),
        ("m.jsonl:line 5", "outside_root"),
        ("m.jsonl:line 6", "outside_root"),
        ("m.jsonl:line 7", "outside_root"),
        ("m.jsonl:line 8", "not_regular"),
        ("m.jsonl:line 9", "outside_root"),
    ]
    assert opened == [os.path.realpath(data / "good.png")]
    for failure in out.failures:
        assert failure.reason and str(tmp_path) not in failure.reason
        assert "/etc" not in failure.reason and SECRET.decode() not in failure.reason
    meta = json.loads(out.rows.to_pylist()[0]["source_meta"])
    assert (meta["manifest"], meta["path"]) == ("m.jsonl", "good.png")


def test_a_manifest_root_allows_files_beside_the_manifest_folder(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "lists").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(PNG)
    manifest = tmp_path / "lists" / "m.jsonl"
    manifest.write_text(json.dumps({"path": "../images/a.png", **LABELS}) + "\n")
    default = ManifestSource(kind="manifest", path="lists/m.jsonl")
    widened = ManifestSource(kind="manifest", path="lists/m.jsonl", root=".")
    refused = list_manifest(default, CYBER, base_dir=tmp_path)
    assert refused.root is not None
    with pytest.raises(ImageRejected, match="outside the image root"):
        read_local(refused.items[0].path or Path(), 10_000, root=refused.root)
    listing = list_manifest(widened, CYBER, base_dir=tmp_path)
    assert listing.root is not None
    assert read_local(listing.items[0].path or Path(), 10_000, root=listing.root) == PNG
    item = listing.items[0]
    assert item.item_id == "lists/m.jsonl:line 1"
    assert item.meta == {"manifest": "lists/m.jsonl", "row": "line 1", "path": "images/a.png"}
    with pytest.raises(ConfigError, match="root"):
        list_manifest(
            ManifestSource(kind="manifest", path="lists/m.jsonl", root="nope"),
            CYBER,
            base_dir=tmp_path,
        )


def test_show_never_gives_an_absolute_path(tmp_path: Path) -> None:
    root = LocalRoot.of(tmp_path / "r")
    assert root.show(tmp_path / "r" / "a" / "b.png") == "a/b.png"
    assert root.show(tmp_path / "r") == "."
    assert root.show(Path("/etc/passwd")) == "passwd"
    assert root.show(tmp_path / "r" / ".." / "x.png") == "x.png"
