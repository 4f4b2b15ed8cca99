"""vLLM offline engine vs vLLM server on the tiny test model: the same workload, the same run.

    .venv-vllm/bin/python -m bench.vllm_tiny [--requests 192] [--model .cache/vlpref-tiny-vlm]

(`make test-vllm` builds `.venv-vllm` and the model, and its last test runs this measurement on
the tier's own server and engine.) Each request carries an image and a question, asks for
`n=2` samples of up to 16 tokens with logprobs (top 3), as the responses stage does. Both sides
are warmed up first (engine start-up and the first request are not timed), the sides take turns
over 5 rounds and each figure is a side's median round, and neither side uses the journal, so
the figures compare the two serving paths only: vlpref's OpenAI-compatible provider over
loopback HTTP against the server process, and `kind: vllm` in this process.

On a 2-core CPU the tiny model is all overhead (HTTP, JSON, image processing, scheduling), not
model compute; on a GPU with a real model the numbers mean something else (see docs/vllm.md).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vlpref.chat import ChatRequest, ImagePart, Message, SamplingParams
from vlpref.providers.base import Provider
from vlpref.runner import BatchStats, run_all

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / ".cache" / "vlpref-tiny-vlm"
RESULTS = REPO / "bench" / "results" / "vllm_tiny.json"
SERVED_NAME = "tiny-vlm"
REQUESTS = 192  # per timed round
REPEATS = 5  # rounds per side; the median is reported
# CPU-only settings the tier uses for both sides. The KV cache is sized explicitly: on the CPU
# backend `gpu_memory_utilization` would reserve a fraction of the machine's memory. Chunked
# prefill is off: on the CPU backend a seeded request whose prompt is split over two steps
# crashes the engine ("CPU Generator does not use offset"); GPUs are not affected.
KV_CACHE_BYTES = 256 << 20
ENGINE_ARGS: dict[str, Any] = {
    "kv_cache_memory_bytes": KV_CACHE_BYTES,
    "enable_chunked_prefill": False,
}
SERVER_ARGS = ("--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--no-enable-chunked-prefill")
CPU_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_TARGET_DEVICE": "cpu",
    "TORCH_COMPILE_DISABLE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


def images(count: int = 4) -> list[ImagePart]:
    """Small distinct PNGs (a colour field with a bar), made here."""
    from PIL import Image, ImageDraw

    out: list[ImagePart] = []
    for i in range(count):
        image = Image.new("RGB", (320, 240), (40 + 50 * i, 90, 200 - 40 * i))
        ImageDraw.Draw(image).rectangle((20 + 10 * i, 40, 200, 80 + 20 * i), fill=(250, 250, 250))
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        out.append(ImagePart(data=buffer.getvalue()))
    return out


def workload(model: str, count: int, *, tag: str = "bench") -> list[ChatRequest]:
    """`count` image + text requests, n=2, 16 tokens, logprobs with top 3."""
    pictures = images()
    params = SamplingParams(
        max_tokens=16, temperature=1.0, seed=7, n=2, logprobs=True, top_logprobs=3
    )
    return [
        ChatRequest(
            id=f"{tag}-{i}",
            model=model,
            messages=(
                Message.user(pictures[i % len(pictures)], f"{tag} question {i}: what is shown?"),
            ),
            params=params,
        )
        for i in range(count)
    ]


@dataclass
class Measurement:
    side: str
    requests: int
    ok: int
    samples: int
    completion_tokens: int
    seconds: float

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def row(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "requests_per_s": round(self.requests_per_s, 2),
            "samples_per_s": round(self.samples / self.seconds, 2) if self.seconds else 0.0,
            "completion_tokens_per_s": (
                round(self.completion_tokens / self.seconds, 1) if self.seconds else 0.0
            ),
        }


async def _timed(side: str, provider: Provider, requests: list[ChatRequest]) -> Measurement:
    started = time.perf_counter()
    results = await run_all(provider, requests, None, BatchStats())
    seconds = time.perf_counter() - started
    ok = [r for r in results if r.ok]
    return Measurement(
        side=side,
        requests=len(requests),
        ok=len(ok),
        samples=sum(len(r.samples) for r in ok),
        completion_tokens=sum(r.usage.completion_tokens for r in ok),
        seconds=round(seconds, 3),
    )


async def compare(
    sides: dict[str, Provider], model: str, count: int = REQUESTS, repeats: int = REPEATS
) -> list[Measurement]:
    """Warm every side up (not timed), then time `repeats` rounds in which each side answers the
    same `count` requests, sides interleaved so that background load hits them alike. Each round
    has prompts of its own (no prefix-cache hits across rounds). Per side: the median round."""
    for provider in sides.values():
        await run_all(provider, workload(model, 2, tag="warm-up"))
    rounds: dict[str, list[Measurement]] = {side: [] for side in sides}
    for repeat in range(repeats):
        requests = workload(model, count, tag=f"round{repeat}")
        for side, provider in sides.items():
            rounds[side].append(await _timed(side, provider, requests))
    return [sorted(runs, key=lambda m: m.seconds)[len(runs) // 2] for runs in rounds.values()]


def report(measurements: list[Measurement], path: Path | None = None) -> str:
    """A printable table (and, given a path, the same figures as JSON)."""
    rows = [m.row() for m in measurements]
    lines = ["side      requests  seconds  req/s  samples/s  tokens/s"]
    for r in rows:
        lines.append(
            f"{r['side']:<8} {r['requests']:>9} {r['seconds']:>8.2f} {r['requests_per_s']:>6.2f}"
            f" {r['samples_per_s']:>10.2f} {r['completion_tokens_per_s']:>9.1f}"
        )
    by_side = {m.side: m for m in measurements}
    if {"offline", "server"} <= by_side.keys() and by_side["server"].requests_per_s:
        ratio = by_side["offline"].requests_per_s / by_side["server"].requests_per_s
        lines.append(f"offline / server: {ratio:.2f}x")
    if path is None:
        return "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "results": rows,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return "\n".join(lines)


def offline_options(model_dir: str | Path) -> dict[str, Any]:
    return {
        "kind": "vllm",
        "model": str(model_dir),
        "served_model_name": SERVED_NAME,
        "enforce_eager": True,
        "max_model_len": 512,
        "extra_engine_args": dict(ENGINE_ARGS),
    }


def served_config(model_dir: str | Path, workspace: str | Path) -> dict[str, Any]:
    """A run config whose one response model is served by `vlpref vllm-serve` on CPU."""
    return {
        "name": "vllm-tiny",
        "taxonomy": str(REPO / "taxonomy" / "demo.yaml"),
        "workspace": str(Path(workspace) / "ws"),
        "store": str(Path(workspace) / "store"),
        "endpoints": {
            "tiny": {
                "kind": "openai",
                "base_url": "http://127.0.0.1/v1",  # no port: the server gets a free one
                "concurrency": 64,
                "timeout_s": 120,
                "serve": {
                    "model": str(model_dir),
                    "max_model_len": 512,
                    "enforce_eager": True,
                    "extra_args": list(SERVER_ARGS),
                    "env": CPU_ENV,
                    "startup_timeout_s": 300,
                    "stop_grace_s": 20,
                },
            }
        },
        "models": [
            {
                "name": "tiny",
                "endpoint": "tiny",
                "model": SERVED_NAME,
                "sampling": {"max_tokens": 8, "n": 2, "temperature": 1.0, "seed": 1},
            }
        ],
        "generator": {"name": "gen", "endpoint": "tiny", "model": SERVED_NAME},
        "judges": [{"name": "judge", "endpoint": "tiny", "model": SERVED_NAME}],
    }


async def _run(model_dir: Path, count: int) -> list[Measurement]:
    import tempfile

    from vlpref.config import parse_config
    from vlpref.providers.registry import create_provider
    from vlpref.vllm_serve import VllmServers

    out: list[Measurement] = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config(served_config(model_dir, tmp))
        with VllmServers(cfg, log=print) as servers:
            endpoint = servers.config.endpoints["tiny"]
            options = {k: v for k, v in endpoint.items() if k != "serve"}
            server = create_provider("openai", options)
            offline = create_provider("vllm", offline_options(model_dir))
            try:
                out = await compare({"server": server, "offline": offline}, SERVED_NAME, count)
            finally:
                await server.aclose()
                await offline.aclose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="vLLM offline vs server on the tiny model")
    parser.add_argument("--requests", type=int, default=REQUESTS)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    args = parser.parse_args()
    for name, value in CPU_ENV.items():
        os.environ.setdefault(name, value)
    if not (args.model / "BUILT").exists():
        raise SystemExit(
            f"{args.model}: no tiny model; build it with "
            "`.venv-vllm/bin/python tests_vllm/build_tiny_model.py` (or run `make test-vllm`)"
        )
    print(report(asyncio.run(_run(args.model, args.requests)), RESULTS))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
