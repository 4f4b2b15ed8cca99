"""Memory stays bounded under hostile inputs (issue 14.5 and the /dev/zero part of 14.2).

Each measurement runs in a fresh interpreter and reports the growth of its peak RSS
(`ru_maxrss`) over the peak it had before the hostile part began, so that what the test
process did before cannot hide or inflate it.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

PRELUDE = """
import json, resource, struct, sys, threading, zlib
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""


def measure(body: str) -> dict[str, Any]:
    """Run `body` (which prints one JSON line last) in a fresh interpreter."""
    script = PRELUDE + textwrap.dedent(body)
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.slow
def test_hostile_pngs_decode_one_at_a_time_within_the_budget() -> None:
    # Four 7,999 x 7,999 PNGs of ~200 KB each (~256 MB apiece decoded), normalised by four
    # threads at once with the default budget of 64M pixels. Without it they decode together
    # (~1.1 GB over the baseline, measured); with it, one at a time.
    result = measure(
        """
        from vlpref.images.normalize import NormalizeOptions, decode_budget, normalize_bytes

        def chunk(kind, body):
            crc = struct.pack(">I", zlib.crc32(kind + body))
            return struct.pack(">I", len(body)) + kind + body + crc

        def big_png(side):
            # white, with a black corner: small once compressed, huge once decoded
            packer = zlib.compressobj(9)
            corner = b"\\0" + b"\\0" * 300 + b"\\xff" * ((side - 100) * 3)
            white = b"\\0" + b"\\xff" * (side * 3)
            body = [packer.compress(corner if y < 100 else white) for y in range(side)]
            ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
            idat = b"".join([*body, packer.flush()])
            signature = b"\\x89PNG\\r\\n\\x1a\\n"
            return signature + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")

        data = big_png(7999)
        options = NormalizeOptions()
        before = peak_mb()
        sides = []
        def run():
            sides.append(normalize_bytes(data, options).width)
        threads = [threading.Thread(target=run) for _ in range(4)]
        for t in threads: t.start()
        for t in threads: t.join()
        budget = decode_budget(options.pixel_budget)
        print(json.dumps({"png_kb": len(data) // 1024, "growth_mb": peak_mb() - before,
                          "sides": sides, "budget_peak": budget.peak,
                          "capacity": budget.capacity}))
        """
    )
    assert result["sides"] == [1024] * 4
    assert result["png_kb"] < 300
    assert result["budget_peak"] <= result["capacity"]
    # One decode is ~280 MB (256 MB of RGB plus resizing); two at once would be over 512 MB.
    assert result["growth_mb"] < 400, result


@pytest.mark.slow
def test_a_gzip_bomb_download_allocates_little() -> None:
    # 256 MB of zeros in ~250 KB of gzip, from a loopback server, max_bytes 1 MB: refused as
    # too_large having inflated ~1 MB. httpx's own decoding inflates each 64 KB network read at
    # once (~64 MB of zeros) before anything can count it.
    result = measure(
        """
        import asyncio
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from vlpref.images.netguard import HostGuard
        from vlpref.images.normalize import ImageRejected
        from vlpref.images.sources import fetch_url, make_client

        packer = zlib.compressobj(9, zlib.DEFLATED, 31)
        block = bytes(1 << 20)
        bomb = b"".join([*(packer.compress(block) for _ in range(256)), packer.flush()])
        del block

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Encoding", "gzip")
                self.end_headers()
                try:
                    self.wfile.write(bomb)
                except OSError:
                    pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/bomb.png"

        async def main():
            guard = HostGuard(allow_private=True)
            async with make_client(timeout_s=30, concurrency=4, trust_env=False,
                                   guard=guard) as client:
                before = peak_mb()
                kinds = []
                for _ in range(4):
                    try:
                        await fetch_url(client, url, max_bytes=1_000_000, timeout_s=30)
                        kinds.append("ok")
                    except ImageRejected as exc:
                        kinds.append(exc.kind)
                return kinds, peak_mb() - before

        kinds, growth = asyncio.run(main())
        print(json.dumps({"bomb_kb": len(bomb) // 1024, "kinds": kinds, "growth_mb": growth}))
        """
    )
    assert result["kinds"] == ["too_large"] * 4
    assert result["bomb_kb"] < 1024
    assert result["growth_mb"] < 24, result


@pytest.mark.slow
def test_dev_zero_read_stays_bounded_even_past_the_stat_check() -> None:
    # /dev/zero is refused on stat (a character device); here that check is made to pass, so
    # the read cap alone bounds it: max_bytes + 1 read, however long the file claims to be.
    result = measure(
        """
        import stat
        from pathlib import Path
        import vlpref.images.sources as sources
        from vlpref.images.normalize import ImageRejected

        root = sources.LocalRoot.of(Path("/dev"))
        before = peak_mb()
        try:
            sources.read_local(Path("/dev/zero"), 20_000_000, root=root)
            refused = None
        except ImageRejected as exc:
            refused = exc.kind
        sources.stat = type("Stat", (), {"S_ISREG": staticmethod(lambda m: True),
                                         "S_ISDIR": staticmethod(stat.S_ISDIR),
                                         "S_IFMT": staticmethod(stat.S_IFMT)})
        try:
            sources.read_local(Path("/dev/zero"), 20_000_000, root=root)
            capped = None
        except ImageRejected as exc:
            capped = exc.kind
        print(json.dumps({"refused": refused, "capped": capped, "growth_mb": peak_mb() - before}))
        """
    )
    assert result["refused"] == "not_regular" and result["capped"] == "too_large"
    # 20 MB read (plus the join of the pieces): never more, where an uncapped read of /dev/zero
    # grows by about 1 GB a second until memory runs out.
    assert result["growth_mb"] < 3 * 20, result
