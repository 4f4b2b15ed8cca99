"""A test double of clip-retrieval's KNN service (`clip-retrieval back`) over a local image pool.

    with KnnServer(pool_dir, indice_name="pool") as knn:
        knn.url         # http://127.0.0.1:PORT/knn-service
        knn.requests    # the JSON bodies it received

Routes: POST /knn-service (the protocol vlpref/images/knn_client.py documents), GET
/indices-list, and GET /pool/{name}, which serves the pool's files (the URLs the answers carry).

No model: an image's "embedding" is the bag of words of its caption (a sidecar `<stem>.txt`, else
the file name with `_` and `-` as spaces), and a query's similarity to it is the cosine of word
counts. So results are deterministic and meaningful enough for tests: a query for "cyber attack"
ranks `cyber_attack_1.png` first.

Checks as the real service does: `modality`, `num_images` and `indice_name` are required, and
an unknown index is an error object (`{"error": ...}`, status 200, as `clip back` answers).
`use_safety_model: true` leaves out images whose caption contains `nsfw` (the real one runs a
classifier). Test hooks: `fail_first` answers that many requests with 503 first; `extra` hits
are appended to every answer (a URL to a private address, say, to test the download guards).
"""

from __future__ import annotations

import asyncio
import math
import mimetypes
import re
import socket
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

__all__ = ["KnnPool", "KnnServer", "word_similarity"]

_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> Counter[str]:
    return Counter(_WORD.findall(text.lower()))


def word_similarity(query: str, caption: str) -> float:
    """Cosine similarity of the two texts' word counts (0 when either has no word)."""
    a, b = _words(query), _words(caption)
    dot = sum(a[w] * b[w] for w in a)
    norm = math.sqrt(sum(v * v for v in a.values())) * math.sqrt(sum(v * v for v in b.values()))
    return dot / norm if norm else 0.0


class KnnPool:
    """The images of a folder (non-hidden files other than `.txt` sidecars) and their captions."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: list[Path] = sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix != ".txt"
        )
        self.captions = [self._caption(p) for p in self.files]

    @staticmethod
    def _caption(path: Path) -> str:
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            return sidecar.read_text(encoding="utf-8").strip()
        return re.sub(r"[_-]+", " ", path.stem)

    def search(self, text: str, k: int, *, safe: bool) -> list[tuple[int, float]]:
        scored = [
            (i, word_similarity(text, caption))
            for i, caption in enumerate(self.captions)
            if not (safe and "nsfw" in caption.lower())
        ]
        scored.sort(key=lambda pair: (-pair[1], pair[0]))
        return scored[:k]


class KnnServer:
    """The double, served from a thread of this process on 127.0.0.1 (port chosen by the OS)."""

    def __init__(
        self,
        pool: Path,
        *,
        indice_name: str = "pool",
        fail_first: int = 0,
        extra: Sequence[dict[str, Any]] = (),
    ) -> None:
        self.pool = KnnPool(pool)
        self.indice_name = indice_name
        self.fail_first = fail_first
        self.extra = list(extra)
        self.requests: list[dict[str, Any]] = []
        self.base_url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"{self.base_url}/knn-service"

    # -- handlers ------------------------------------------------------------------------------

    async def _knn(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "the body is not JSON"}, status=400)
        self.requests.append(body)
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.json_response({"error": "overloaded (simulated)"}, status=503)
        missing = [k for k in ("modality", "num_images", "indice_name") if k not in body]
        if missing:  # clip back reads them with json_data[...]: a KeyError, a 500
            return web.Response(status=500, text=f"KeyError: {missing[0]}")
        if body["indice_name"] != self.indice_name:
            return web.json_response({"error": f"unknown indice {body['indice_name']!r}"})
        text = body.get("text") or ""
        found = self.pool.search(
            text, int(body["num_images"]), safe=bool(body.get("use_safety_model"))
        )
        answer: list[dict[str, Any]] = [
            {
                "url": f"{self.base_url}/pool/{self.pool.files[i].name}",
                "caption": self.pool.captions[i],
                "similarity": round(score, 6),
                "id": i,
            }
            for i, score in found
        ]
        return web.json_response(answer + self.extra)

    async def _indices(self, request: web.Request) -> web.Response:
        return web.json_response([self.indice_name])

    async def _file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        match = [p for p in self.pool.files if p.name == name]
        if not match:
            raise web.HTTPNotFound()
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return web.Response(body=match[0].read_bytes(), content_type=kind)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> KnnServer:
        started = threading.Event()
        loop = self._loop = asyncio.new_event_loop()

        async def serve() -> None:
            app = web.Application()
            app.router.add_post("/knn-service", self._knn)
            app.router.add_get("/indices-list", self._indices)
            app.router.add_get("/pool/{name}", self._file)
            runner = self._runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))  # the OS picks the port; known before serving
            port = sock.getsockname()[1]
            await web.SockSite(runner, sock).start()
            self.base_url = f"http://127.0.0.1:{port}"
            started.set()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(serve())
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="knn-double", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the KNN double did not start")
        return self

    def stop(self) -> None:
        loop, runner = self._loop, self._runner
        if loop is None:
            return
        if runner is not None:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        loop.close()
        self._loop = None

    def __enter__(self) -> KnnServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
