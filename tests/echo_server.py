"""A loopback endpoint that repeats the key it receives, as some proxies and APIs do.

`GET /v1/models` lists `MODELS`; `POST /v1/chat/completions` answers by the model asked for:

- `echo-401`, `echo-400`, `echo-500`: that status, with an OpenAI-style error body whose message
  quotes the request's `Authorization` header, and the key again in JSON fields (`api_key`,
  `received_headers`) and in a response header;
- `echo-cut`: 400 with a message whose key straddles the 300th character (where the provider
  cuts an error message);
- `echo-html`: 200 with an HTML page (not a chat completion) that quotes the header.

Every key it received is kept in `keys`, so a test can prove the key did reach the endpoint.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

MODELS = ("echo-401", "echo-400", "echo-500", "echo-cut", "echo-html")
STATUS = {"echo-401": 401, "echo-400": 400, "echo-500": 500, "echo-cut": 400}


class EchoServer:
    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, ctype: str, echo: str = "") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                if echo:
                    self.send_header("X-Echo-Authorization", echo)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    data = {"object": "list", "data": [{"id": m} for m in MODELS]}
                    self._send(200, json.dumps(data).encode(), "application/json")
                else:
                    self._send(404, b"{}", "application/json")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                auth = self.headers.get("Authorization", "")
                key = auth.removeprefix("Bearer ").strip()
                server.keys.add(key)
                server.requests += 1
                model = str(body.get("model"))
                if model == "echo-html":
                    page = f"<html><body>proxy error; you sent Authorization: {auth}</body></html>"
                    self._send(200, page.encode(), "text/html", echo=auth)
                    return
                if model == "echo-cut":
                    message = "x" * 280 + f" key={key} is not valid"
                else:
                    message = f"Incorrect API key provided: {auth}. Received key {key}."
                error = {
                    "error": {"message": message, "type": "invalid_request_error"},
                    "api_key": key,
                    "received_headers": {"Authorization": auth},
                }
                status = STATUS.get(model, 404)
                self._send(status, json.dumps(error).encode(), "application/json", echo=auth)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
