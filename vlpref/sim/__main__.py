"""`python -m vlpref.sim --host 127.0.0.1 --port 0 --config FILE`.

Prints one line `LISTENING http://HOST:PORT` (flushed) once connections are accepted, then
serves until SIGTERM or SIGINT, or, with --watch-stdin, until stdin closes. Exit status 2 on a
bad config (the message names the file and field).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import threading

from aiohttp import web

from vlpref.errors import ConfigError
from vlpref.sim.config import SimConfig, load_config
from vlpref.sim.server import create_app


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vlpref.sim", description="Simulated OpenAI-compatible server."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--config", required=True, help="sim config (YAML or JSON)")
    parser.add_argument(
        "--watch-stdin",
        action="store_true",
        help="exit when stdin reaches EOF (so the server dies with the process that started it)",
    )
    return parser.parse_args(argv)


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Set `stop` once stdin closes: the parent exited or hung up, even if it was killed."""

    def wait_for_eof() -> None:
        # os.read on the raw fd: a thread blocked in sys.stdin.buffer.read holds the buffer's
        # lock, which makes interpreter shutdown stall.
        while os.read(0, 4096):
            pass
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=wait_for_eof, name="stdin-watch", daemon=True).start()


async def serve(config: SimConfig, host: str, port: int, *, watch_stdin: bool = False) -> None:
    """Serve `config` on host:port until SIGTERM/SIGINT (or stdin EOF with `watch_stdin`)."""
    # handler_cancellation: a hung request is dropped as soon as its client disconnects.
    runner = web.AppRunner(
        create_app(config), access_log=None, handler_cancellation=True, shutdown_timeout=1.0
    )
    await runner.setup()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    site = web.SockSite(runner, sock, backlog=2048)
    await site.start()
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"LISTENING http://{shown}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if watch_stdin:
        _watch_stdin(loop, stop)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"vlpref.sim: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config, args.host, args.port, watch_stdin=args.watch_stdin))
    return 0


if __name__ == "__main__":
    sys.exit(main())
