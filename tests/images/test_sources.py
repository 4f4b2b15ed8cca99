import contextlib
import io
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlpref.config import FolderSource, ManifestSource
from vlpref.errors import ConfigError, DataError
from vlpref.images.normalize import ImageRejected
from vlpref.images.sources import (
    Fetched,
    fetch_url,
    list_folder,
    list_manifest,
    make_client,
    read_local,
    read_manifest,
)
from vlpref.taxonomy import Subcategory

CYBER = Subcategory(
    path="Malicious Use/Security threats/cyber", class1="Malicious Use",
    class2="Security threats", class3="cyber", keywords=("hacking",),
    key_phrase="hack a network", spa_vl=True,
)  # fmt: skip
CLASSES = (CYBER.class1, CYBER.class2, CYBER.class3)
OTHER = ("Malicious Use", "Security threats", "malware")


def png(colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    image = Image.new("RGB", (64, 64), colour)
    image.paste((0, 0, 0), (0, 0, 32, 32))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


PNG = png()


# --------------------------------------------------------------------------- loopback server


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # slow handlers must not hold up the fixture's teardown
    hits: Counter[str]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(
        self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.server.hits[url.path] += 1
        hits = self.server.hits[url.path]
        # A client that gave up (the timeout tests) breaks the pipe: expected.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._route(url.path, query, hits)

    def _route(self, path: str, query: dict[str, str], hits: int) -> None:
        if path.startswith("/img/"):
            self._send(200, PNG, "image/png; charset=binary")
        elif path.startswith("/flaky/"):  # fails `fail` times with `code`, then answers
            if hits <= int(query.get("fail", "1")):
                code = int(query.get("code", "500"))
                headers = {"Retry-After": "0"} if code == 429 else {}
                self._send(code, b"try later", "text/plain", headers)
            else:
                self._send(200, PNG, "image/png")
        elif path.startswith("/status/"):
            self._send(int(path.rsplit("/", 1)[1]), b"no", "text/plain")
        elif path == "/html":
            self._send(200, b"<html>not an image</html>", "text/html")
        elif path == "/declared-big":
            self._send(200, b"\0" * 5000, "image/png")
        elif path == "/streamed-big":  # no Content-Length: only counting while reading can tell
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            for _ in range(20):
                self.wfile.write(b"\0" * 1000)
        elif path == "/slow":
            time.sleep(float(query.get("delay", "1")))
            self._send(200, PNG, "image/png")
        elif path == "/drip":  # headers at once, then a byte every 50 ms
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            for byte in PNG[:40]:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.05)
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/img/target.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(404, b"not found", "text/plain")


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.hits = Counter()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def base(server: _Server) -> str:
    host, port = server.server_address[:2]
    return f"http://{host!s}:{port}"


async def fetch(
    url: str, *, max_bytes: int = 100_000, timeout_s: float = 2.0, attempts: int = 3
) -> Fetched:
    async with make_client(timeout_s=timeout_s, concurrency=4, trust_env=False) as client:
        return await fetch_url(
            client, url, max_bytes=max_bytes, timeout_s=timeout_s, attempts=attempts, backoff_s=0.01
        )


async def fetch_fails(
    url: str, *, max_bytes: int = 100_000, timeout_s: float = 2.0, attempts: int = 3
) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        await fetch(url, max_bytes=max_bytes, timeout_s=timeout_s, attempts=attempts)
    return info.value


# --------------------------------------------------------------------------- URL downloads


async def test_download_ok(server: _Server) -> None:
    got = await fetch(f"{base(server)}/img/a.png")
    assert got.data == PNG and got.content_type == "image/png" and got.attempts == 1


async def test_download_404_is_not_retried(server: _Server) -> None:
    error = await fetch_fails(f"{base(server)}/status/404")
    assert error.kind == "http" and "404" in error.reason and error.attempts == 1
    assert server.hits["/status/404"] == 1


async def test_download_wrong_content_type(server: _Server) -> None:
    error = await fetch_fails(f"{base(server)}/html")
    assert error.kind == "content_type" and "text/html" in error.reason


@pytest.mark.parametrize("path", ["/declared-big", "/streamed-big"])
async def test_download_too_large(server: _Server, path: str) -> None:
    error = await fetch_fails(f"{base(server)}{path}", max_bytes=4096)
    assert error.kind == "too_large" and "4096" in error.reason


async def test_download_slow_server_times_out(server: _Server) -> None:
    started = time.monotonic()
    error = await fetch_fails(f"{base(server)}/slow?delay=1.5", timeout_s=0.3)
    assert error.kind == "timeout" and error.attempts == 1
    assert time.monotonic() - started < 1.0


async def test_download_dripping_body_hits_the_total_deadline(server: _Server) -> None:
    # Each read arrives well within the timeout; the whole answer does not.
    started = time.monotonic()
    error = await fetch_fails(f"{base(server)}/drip", timeout_s=0.4)
    assert error.kind == "timeout"
    assert time.monotonic() - started < 1.2


@pytest.mark.parametrize("code", [500, 503, 429])
async def test_download_retries_5xx_and_429_then_succeeds(server: _Server, code: int) -> None:
    path = f"/flaky/{code}"
    got = await fetch(f"{base(server)}{path}?fail=1&code={code}")
    assert got.data == PNG and got.attempts == 2
    assert server.hits[path] == 2


async def test_download_gives_up_after_the_attempts(server: _Server) -> None:
    error = await fetch_fails(f"{base(server)}/flaky/always?fail=99&code=502", attempts=3)
    assert error.kind == "http" and error.attempts == 3 and "502" in error.reason
    assert server.hits["/flaky/always"] == 3


async def test_download_connection_refused_is_retried_then_reported() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    error = await fetch_fails(f"http://127.0.0.1:{port}/x.png", attempts=2)
    assert error.kind == "network" and error.attempts == 2


async def test_download_follows_redirects(server: _Server) -> None:
    got = await fetch(f"{base(server)}/redirect")
    assert got.data == PNG and got.final_url.endswith("/img/target.png")


# --------------------------------------------------------------------------- folder


def make_tree(root: Path) -> None:
    branch = root.joinpath(*CLASSES)
    (branch / "nested").mkdir(parents=True)
    (branch / "b.png").write_bytes(PNG)
    (branch / "a.png").write_bytes(PNG)
    (branch / "nested" / "c.jpg").write_bytes(PNG)
    (branch / ".DS_Store").write_bytes(b"junk")
    (branch / ".hidden").mkdir()
    (branch / ".hidden" / "x.png").write_bytes(PNG)
    root.joinpath(*OTHER).mkdir(parents=True)
    root.joinpath(*OTHER, "z.png").write_bytes(PNG)


def test_folder_tree_lists_the_branch_in_order(tmp_path: Path) -> None:
    make_tree(tmp_path / "images")
    source = FolderSource(kind="folder", path="images")
    listing = list_folder(source, CYBER, base_dir=tmp_path, flat=False)
    assert [item.meta["path"] for item in listing.items] == ["a.png", "b.png", "nested/c.jpg"]
    assert all(item.source == "folder" and item.path is not None for item in listing.items)
    assert listing.failures == [] and listing.notes == []


def test_folder_flat(tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "one.png").write_bytes(PNG)
    source = FolderSource(kind="folder", path=str(tmp_path / "flat"))
    listing = list_folder(source, CYBER, base_dir=Path("/nonexistent"), flat=True)
    assert [item.meta["path"] for item in listing.items] == ["one.png"]


def test_folder_without_the_branch_is_empty_with_a_note(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    listing = list_folder(
        FolderSource(kind="folder", path="images"), CYBER, base_dir=tmp_path, flat=False
    )
    assert listing.items == [] and "no folder" in listing.notes[0]


def test_folder_root_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        list_folder(FolderSource(kind="folder", path="nope"), CYBER, base_dir=tmp_path, flat=False)
    with pytest.raises(ConfigError, match="local path"):
        list_folder(
            FolderSource(kind="folder", path="s3://bucket/x"), CYBER, base_dir=tmp_path, flat=False
        )


# --------------------------------------------------------------------------- manifest


def row(path: str | None, url: str | None, classes: tuple[str, ...]) -> dict[str, str | None]:
    labels = dict(zip(("class1", "class2", "class3"), classes, strict=True))
    return {"path": path, "url": url, **labels}


# The same rows in every format; PLACES says where each lands in the file.
ROWS = [
    row("imgs/a.png", None, CLASSES),
    row(None, "http://example.test/b.png", CLASSES),
    row("imgs/other.png", None, OTHER),  # another branch: skipped
    row(None, None, CLASSES),  # neither path nor url
    row("imgs/c.png", None, (*CLASSES[:2], "")),  # bad class, agrees with this branch so far
    row(None, "ftp://example.test/d.png", CLASSES),  # not http(s)
    row("imgs/e.png", None, ("Elsewhere", "", "")),  # bad class, but clearly not this branch
]
COLUMNS = ("path", "url", "class1", "class2", "class3")


def write_manifest(folder: Path, kind: str) -> Path:
    path = folder / f"manifest.{kind}"
    if kind == "csv":
        lines = [",".join(COLUMNS), *(",".join(r[c] or "" for c in COLUMNS) for r in ROWS)]
        path.write_text("\n".join(lines) + "\n")
    elif kind == "jsonl":
        # A blank line in the middle: line numbers are the file's, not the row count.
        text = [json.dumps({k: v for k, v in r.items() if v is not None}) for r in ROWS]
        path.write_text("\n".join([*text[:2], "", *text[2:]]) + "\n")
    else:
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    return path


# Where rows 1, 2, 4, 5, 6 of ROWS are, per format.
PLACES = {
    "csv": ["line 2", "line 3", "line 5", "line 6", "line 7"],
    "jsonl": ["line 1", "line 2", "line 5", "line 6", "line 7"],
    "parquet": ["row 1", "row 2", "row 4", "row 5", "row 6"],
}


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_manifest_rows_of_the_branch_errors_named_by_file_and_row(
    tmp_path: Path, kind: str
) -> None:
    manifest = write_manifest(tmp_path, kind)
    source = ManifestSource(kind="manifest", path=manifest.name)
    listing = list_manifest(source, CYBER, base_dir=tmp_path)
    at = PLACES[kind]
    assert [(i.source, i.item_id) for i in listing.items] == [
        ("manifest", f"{manifest}:{at[0]}"),
        ("url", f"{manifest}:{at[1]}"),
    ]
    assert listing.items[0].path == tmp_path / "imgs" / "a.png"  # relative to the manifest
    assert listing.items[1].url == "http://example.test/b.png"
    assert listing.skipped == 2  # the malware row and the "Elsewhere" row
    failures = {f.item_id: f for f in listing.failures}
    assert list(failures) == [f"{manifest}:{w}" for w in at[2:]]
    for failure in listing.failures:
        assert failure.kind == "manifest_row" and failure.reason.startswith(failure.item_id)
    assert "neither path nor url" in failures[f"{manifest}:{at[2]}"].reason
    assert "class3" in failures[f"{manifest}:{at[3]}"].reason
    assert "http(s)" in failures[f"{manifest}:{at[4]}"].reason


def test_csv_line_numbers_survive_multiline_fields(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    cells = ",".join(CLASSES)
    manifest.write_text(
        f'path,note,class1,class2,class3\n"a.png","two\nlines",{cells}\n,x,{cells}\n'
    )
    source = ManifestSource(kind="manifest", path=str(manifest))
    listing = list_manifest(source, CYBER, base_dir=tmp_path)
    assert [i.item_id for i in listing.items] == [f"{manifest}:line 2"]
    assert [f.item_id for f in listing.failures] == [f"{manifest}:line 4"]


def test_an_unparsable_jsonl_line_is_a_failure_for_every_branch(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        '{"path": "a.png", "class1": "x", "class2": "y", "class3": "z"}\n{oops\n[1]\n'
    )
    source = ManifestSource(kind="manifest", path=str(manifest))
    listing = list_manifest(source, CYBER, base_dir=tmp_path)
    assert listing.skipped == 1
    assert [(f.item_id, f.kind) for f in listing.failures] == [
        (f"{manifest}:line 2", "manifest_row"),
        (f"{manifest}:line 3", "manifest_row"),
    ]
    assert "invalid JSON" in listing.failures[0].reason


def test_manifest_file_problems_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_manifest(tmp_path / "missing.csv")
    (tmp_path / "m.txt").write_text("path\n")
    with pytest.raises(ConfigError, match="unknown file type"):
        read_manifest(tmp_path / "m.txt")
    (tmp_path / "m.csv").write_text("file,class1\nx,y\n")
    with pytest.raises(DataError, match=r"m\.csv.*class2, class3, path or url"):
        read_manifest(tmp_path / "m.csv")
    pq.write_table(pa.table({"url": ["x"]}), tmp_path / "m.parquet")
    with pytest.raises(DataError, match=r"m\.parquet.*class1"):
        read_manifest(tmp_path / "m.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot be read"):
        read_manifest(tmp_path / "bad.parquet")


def test_manifest_is_reread_when_it_changes(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,class1,class2,class3\na.png,x,y,z\n")
    assert len(read_manifest(manifest)) == 1
    manifest.write_text("path,class1,class2,class3\na.png,x,y,z\nb.png,x,y,z\n")
    assert len(read_manifest(manifest)) == 2


# --------------------------------------------------------------------------- local files


def test_read_local(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(PNG)
    assert read_local(tmp_path / "a.png", 10_000) == PNG
    with pytest.raises(ImageRejected) as missing:
        read_local(tmp_path / "b.png", 10_000)
    assert missing.value.kind == "missing"
    with pytest.raises(ImageRejected) as big:
        read_local(tmp_path / "a.png", 10)
    assert big.value.kind == "too_large"


def test_httpx_is_what_the_client_is() -> None:
    client = make_client(timeout_s=1, concurrency=2, trust_env=False)
    assert isinstance(client, httpx.AsyncClient) and client.follow_redirects
