import contextlib
import functools
import gzip
import io
import ipaddress
import json
import socket
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlpref.config import FolderSource, ManifestSource
from vlpref.errors import ConfigError, DataError
from vlpref.images.netguard import HostGuard, IPAddress
from vlpref.images.normalize import ImageRejected
from vlpref.images.sources import (
    Fetched,
    ImageClient,
    LocalRoot,
    _BodyDecoder,
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
    connections = 0  # TCP connections accepted: a refused host must not add one
    hosts: list[str]  # the Host header of each request

    def get_request(self) -> tuple[socket.socket, Any]:
        self.connections += 1
        return super().get_request()


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def zeros_gzip(size: int) -> bytes:
    """`size` zero bytes, gzip-encoded: about 1,000 times smaller."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    parts = [packer.compress(block) for _ in range(size >> 20)]
    return b"".join([*parts, packer.flush()])


@functools.cache
def bomb() -> bytes:
    return zeros_gzip(256 << 20)


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
        self.server.hosts.append(self.headers.get("Host", ""))
        hits = self.server.hits[url.path]
        # A client that gave up (the timeout tests) breaks the pipe: expected.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._route(url.path, query, hits)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

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
            self._redirect("/img/target.png")
        elif path == "/redirect-to":  # anywhere the query says (a hop the guard must check)
            self._redirect(query["to"])
        elif path == "/loop":
            self._redirect("/loop")
        elif path == "/gzip":  # the PNG, gzip-encoded whatever the client asked for
            self._send(200, gzip_bytes(PNG), "image/png", {"Content-Encoding": "gzip"})
        elif path == "/deflate":  # zlib-wrapped (RFC 1950) or raw deflate
            raw = query.get("raw") == "1"
            packer = zlib.compressobj(wbits=-15 if raw else 15)
            body = packer.compress(PNG) + packer.flush()
            self._send(200, body, "image/png", {"Content-Encoding": "deflate"})
        elif path == "/brotli":
            self._send(200, b"whatever", "image/png", {"Content-Encoding": "br"})
        elif path == "/bomb":  # 256 MB of zeros in ~250 KB of gzip, no Content-Length
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Encoding", "gzip")
            self.end_headers()
            self.wfile.write(bomb())
        elif path == "/error-text":  # a banner a failure reason must not repeat
            self._send(403, b"internal-banner-v1.2", "text/plain")
        else:
            self._send(404, b"not found", "text/plain")


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.hits = Counter()
    httpd.hosts = []
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def base(server: _Server) -> str:
    host, port = server.server_address[:2]
    return f"http://{host!s}:{port}"


# The loopback test server is a private address: refused unless the guard allows it.
LOOPBACK = HostGuard(allow_private=True)


async def fetch(
    url: str,
    *,
    max_bytes: int = 100_000,
    timeout_s: float = 2.0,
    attempts: int = 3,
    guard: HostGuard = LOOPBACK,
) -> Fetched:
    client = make_client(timeout_s=timeout_s, concurrency=4, trust_env=False, guard=guard)
    async with client:
        return await fetch_url(
            client, url, max_bytes=max_bytes, timeout_s=timeout_s, attempts=attempts, backoff_s=0.01
        )


async def fetch_fails(
    url: str,
    *,
    max_bytes: int = 100_000,
    timeout_s: float = 2.0,
    attempts: int = 3,
    guard: HostGuard = LOOPBACK,
) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        await fetch(url, max_bytes=max_bytes, timeout_s=timeout_s, attempts=attempts, guard=guard)
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
    assert error.kind == "server_error" and error.attempts == 3 and "502" in error.reason
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


# --------------------------------------------------------------------------- no SSRF


def port(server: _Server) -> int:
    return int(server.server_address[1])


async def test_loopback_is_refused_by_default_before_any_connection(server: _Server) -> None:
    before = server.connections
    error = await fetch_fails(f"{base(server)}/img/a.png", guard=HostGuard())
    assert error.kind == "refused_host" and error.attempts == 1
    assert "127.0.0.1 is a loopback address" in error.reason
    assert "allow_private or allow_hosts" in error.reason
    assert server.connections == before  # refused before connecting
    # Through a name, and through IPv6 loopback: refused the same way.
    named = HostGuard(resolver=Resolver({"images.test": ["127.0.0.1"]}))
    error = await fetch_fails(f"http://images.test:{port(server)}/img/a.png", guard=named)
    assert error.kind == "refused_host" and "images.test resolves to a loopback" in error.reason
    error = await fetch_fails(f"http://[::1]:{port(server)}/img/a.png", guard=HostGuard())
    assert error.kind == "refused_host"
    assert server.connections == before


@pytest.mark.parametrize(
    "url", ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/", "http://[fe80::1]/"]
)
async def test_internal_addresses_are_refused_unconnected(url: str) -> None:
    # Refused on the address itself: no connection is tried (the conftest would fail it).
    error = await fetch_fails(url, guard=HostGuard())
    assert error.kind == "refused_host" and error.attempts == 1


async def test_allow_private_and_allow_hosts_accept_loopback(server: _Server) -> None:
    url = f"{base(server)}/img/a.png"
    for guard in (
        HostGuard(allow_private=True),
        HostGuard(allow_hosts=["127.0.0.1"]),
        HostGuard(allow_hosts=["127.0.0.0/8"]),
    ):
        assert (await fetch(url, guard=guard)).data == PNG
    named = HostGuard(
        allow_hosts=["images.internal"], resolver=Resolver({"images.internal": ["127.0.0.1"]})
    )
    before = len(server.hosts)
    got = await fetch(f"http://images.internal:{port(server)}/img/named.png", guard=named)
    assert got.data == PNG
    # Connected to the checked address, asked with the name.
    assert server.hosts[before:] == [f"images.internal:{port(server)}"]


@pytest.mark.parametrize("target", ["http://127.0.0.2:{port}/img/x.png", "http://[::1]:{port}/"])
async def test_a_redirect_to_a_refused_address_is_refused_at_the_hop(
    server: _Server, target: str
) -> None:
    guard = HostGuard(allow_hosts=["127.0.0.1"])  # this server only
    hop = target.format(port=port(server))
    before, hits = server.connections, server.hits["/img/x.png"]
    error = await fetch_fails(f"{base(server)}/redirect-to?to={hop}", guard=guard)
    assert error.kind == "refused_host"
    assert "(redirect 1 to http://" in error.reason and "loopback address" in error.reason
    assert server.connections == before + 1  # the first hop only
    assert server.hits["/img/x.png"] == hits


async def test_redirects_to_other_schemes_and_loops_are_refused(server: _Server) -> None:
    error = await fetch_fails(f"{base(server)}/redirect-to?to=file:///etc/passwd")
    assert error.kind == "refused_host" and "'file' URL refused" in error.reason
    error = await fetch_fails(f"{base(server)}/loop")
    assert error.kind == "http" and "more than 5 redirects" in error.reason
    assert server.hits["/loop"] == 6


async def test_dns_rebinding_is_caught_at_the_connection(server: _Server) -> None:
    # The hop check sees 127.0.0.1 (allowed); the lookup at connection time answers 127.0.0.2
    # (refused): the connection is refused, and none is made.
    guard = HostGuard(
        allow_hosts=["127.0.0.1"],
        resolver=Resolver({"rebind.test": ["127.0.0.1"]}, then={"rebind.test": ["127.0.0.2"]}),
    )
    before = server.connections
    error = await fetch_fails(f"http://rebind.test:{port(server)}/img/a.png", guard=guard)
    assert error.kind == "refused_host" and "rebind.test resolves to a loopback" in error.reason
    assert server.connections == before


async def test_failure_reasons_carry_no_credentials_and_no_server_text(server: _Server) -> None:
    secret = f"http://user:hunter2@127.0.0.1:{port(server)}"
    error = await fetch_fails(f"{secret}/status/404?token=abc123&X-Amz-Signature=feed&size=2")
    assert error.reason == f"{base(server)}/status/404?size=2: HTTP 404"
    error = await fetch_fails(f"{secret}/error-text?sig=abc123")
    assert "internal-banner" not in error.reason and "hunter2" not in error.reason
    got = await fetch(f"{secret}/redirect-to?to=/img/t.png%3Fsig%3Dabc123&token=abc123")
    assert "hunter2" not in got.final_url and "abc123" not in got.final_url
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    error = await fetch_fails(f"http://127.0.0.1:{closed}/x.png?token=abc123", attempts=1)
    shown = f"http://127.0.0.1:{closed}/x.png"
    assert error.reason == f"{shown}: could not connect (after 1 attempt(s))"


async def test_proxies_from_the_environment_are_honoured_and_the_host_still_checked(
    server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loopback server plays the proxy (it serves the path of an absolute-form request).
    # `images.test` "resolves" to a public address (never contacted: the proxy is asked).
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("HTTP_PROXY", base(server))
    public = Resolver({"images.test": ["93.184.215.14"], "internal.test": ["10.0.0.7"]})
    client = make_client(
        timeout_s=2, concurrency=2, trust_env=True, guard=HostGuard(resolver=public)
    )
    async with client:
        got = await fetch_url(client, "http://images.test/img/p.png", max_bytes=10_000, timeout_s=2)
        assert got.data == PNG and server.hosts[-1] == "images.test"
        with pytest.raises(ImageRejected) as info:
            await fetch_url(client, "http://internal.test/img/p.png", max_bytes=10_000, timeout_s=2)
    assert info.value.kind == "refused_host" and "private address" in info.value.reason


# --------------------------------------------------------------------------- content encodings


@pytest.mark.parametrize("path", ["/gzip", "/deflate", "/deflate?raw=1"])
async def test_encoded_bodies_are_decoded(server: _Server, path: str) -> None:
    assert (await fetch(f"{base(server)}{path}")).data == PNG


async def test_a_gzip_bomb_is_cut_off_at_max_bytes(server: _Server) -> None:
    started = time.monotonic()
    error = await fetch_fails(f"{base(server)}/bomb", max_bytes=1_000_000, timeout_s=10)
    assert error.kind == "too_large" and "stopped reading" in error.reason
    assert time.monotonic() - started < 5  # 256 MB were never inflated
    # (The memory it takes is measured in test_memory.py.)


def test_the_body_decoder_inflates_in_bounded_steps() -> None:
    decoder = _BodyDecoder.for_encoding("gzip")
    assert decoder is not None
    pieces = decoder.feed(bomb()[:65536])  # one network read of the bomb: ~64 MB of zeros
    sizes = [len(next(pieces)) for _ in range(100)]  # lazily: nothing inflated ahead
    assert max(sizes) <= 1 << 16
    two_members = gzip_bytes(b"ab") + gzip_bytes(b"cd")
    whole = _BodyDecoder.for_encoding("x-gzip")
    assert whole is not None and b"".join(whole.feed(two_members)) == b"abcd"
    assert _BodyDecoder.for_encoding("br") is None


async def test_other_content_encodings_are_refused(server: _Server) -> None:
    error = await fetch_fails(f"{base(server)}/brotli")
    assert error.kind == "content_encoding" and "'br'" in error.reason


class Resolver:
    """A scripted resolver: `names` on the first lookup of a name, `then` on later ones."""

    def __init__(
        self, names: dict[str, list[str]], then: dict[str, list[str]] | None = None
    ) -> None:
        self.names, self.then = names, then or names
        self.seen: Counter[str] = Counter()

    async def __call__(self, host: str, port: int) -> list[IPAddress]:
        self.seen[host] += 1
        table = self.names if self.seen[host] == 1 else self.then
        if host in table:
            return [ipaddress.ip_address(a) for a in table[host]]
        return [ipaddress.ip_address(host.strip("[]"))]  # literals resolve to themselves


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
    # Published relative to the root (the folder source's path), never absolute.
    branch = "/".join(CLASSES)
    assert [item.item_id for item in listing.items] == [
        f"{branch}/a.png",
        f"{branch}/b.png",
        f"{branch}/nested/c.jpg",
    ]
    assert listing.items[0].meta["folder"] == branch


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
    name = manifest.name  # published relative to the root (the manifest's folder)
    assert [(i.source, i.item_id) for i in listing.items] == [
        ("manifest", f"{name}:{at[0]}"),
        ("url", f"{name}:{at[1]}"),
    ]
    assert listing.items[0].path == tmp_path / "imgs" / "a.png"  # relative to the manifest
    assert listing.items[1].url == "http://example.test/b.png"
    assert listing.skipped == 2  # the malware row and the "Elsewhere" row
    failures = {f.item_id: f for f in listing.failures}
    assert list(failures) == [f"{name}:{w}" for w in at[2:]]
    for failure in listing.failures:
        assert failure.kind == "manifest_row" and failure.reason.startswith(failure.item_id)
        assert str(tmp_path) not in failure.reason
    assert "neither path nor url" in failures[f"{name}:{at[2]}"].reason
    assert "class3" in failures[f"{name}:{at[3]}"].reason
    assert "http(s)" in failures[f"{name}:{at[4]}"].reason
    assert listing.items[0].meta == {"manifest": name, "row": at[0], "path": "imgs/a.png"}


def test_csv_line_numbers_survive_multiline_fields(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    cells = ",".join(CLASSES)
    manifest.write_text(
        f'path,note,class1,class2,class3\n"a.png","two\nlines",{cells}\n,x,{cells}\n'
    )
    source = ManifestSource(kind="manifest", path=str(manifest))
    listing = list_manifest(source, CYBER, base_dir=tmp_path)
    assert [i.item_id for i in listing.items] == ["m.csv:line 2"]
    assert [f.item_id for f in listing.failures] == ["m.csv:line 4"]


def test_an_unparsable_jsonl_line_is_a_failure_for_every_branch(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        '{"path": "a.png", "class1": "x", "class2": "y", "class3": "z"}\n{oops\n[1]\n'
    )
    source = ManifestSource(kind="manifest", path=str(manifest))
    listing = list_manifest(source, CYBER, base_dir=tmp_path)
    assert listing.skipped == 1
    assert [(f.item_id, f.kind) for f in listing.failures] == [
        ("m.jsonl:line 2", "manifest_row"),
        ("m.jsonl:line 3", "manifest_row"),
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
    root = LocalRoot.of(tmp_path)
    assert read_local(tmp_path / "a.png", 10_000, root=root) == PNG
    with pytest.raises(ImageRejected) as missing:
        read_local(tmp_path / "b.png", 10_000, root=root)
    assert missing.value.kind == "missing" and missing.value.reason == "file not found: b.png"
    with pytest.raises(ImageRejected) as big:
        read_local(tmp_path / "a.png", 10, root=root)
    assert big.value.kind == "too_large"


def test_httpx_is_what_the_client_is() -> None:
    client = make_client(timeout_s=1, concurrency=2, trust_env=False)
    assert isinstance(client, ImageClient) and isinstance(client, httpx.AsyncClient)
    assert not client.follow_redirects  # fetch_url follows them, checking each hop
    assert not client.guard.allow_private  # public addresses only, by default
