"""Every count in a run config has an upper bound (docs/configuration.md, "Bounds"): a value
past it is one `error: FILE: FIELD: line N: ...` line from `vlpref check`, exit code 2, no
traceback, before anything is built. `per_branch: 1000000000` used to run to 4.7 GB in 60 s."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from vlpref import cli

BASE: dict[str, Any] = {
    "name": "bounds",
    "taxonomy": "builtin:demo",
    "workspace": "ws",
    "store": "store",
    "endpoints": {"sim": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
    "models": [
        {"name": "a", "endpoint": "sim", "model": "m", "sampling": {"n": 1}},
        {"name": "b", "endpoint": "sim", "model": "m", "sampling": {"n": 1}},
    ],
    "generator": {"name": "gen", "endpoint": "sim", "model": "m"},
    "judges": [{"name": "judge", "endpoint": "sim", "model": "m"}],
    "stages": {
        "images": {"source": {"kind": "typographic", "per_branch": 1}},
        "questions": {},
        "judge": {},
        "pairs": {},
        "publish": {},
    },
}


def _many(prefix: str, count: int, make: Any) -> dict[str, Any]:
    return {f"{prefix}{i}": make(i) for i in range(count)}


def _model(i: int) -> dict[str, Any]:
    return {"name": f"m{i}", "endpoint": "sim", "model": "m"}


# (field as the error names it, the path to set, a value just past the bound, what is said)
CASES: list[tuple[str, tuple[Any, ...], Any, str]] = [
    (
        "models[0].sampling.max_tokens",
        ("models", 0, "sampling", "max_tokens"),
        1_000_001,
        "1000000",
    ),
    ("models[0].sampling.n", ("models", 0, "sampling", "n"), 129, "128"),
    ("models[0].sampling.top_logprobs", ("models", 0, "sampling", "top_logprobs"), 21, "20"),
    ("models[0].sampling.stop", ("models", 0, "sampling", "stop"), ["x"] * 17, "at most 16"),
    (
        "stages.images.source.per_branch",
        ("stages", "images", "source", "per_branch"),
        10_001,
        "10000",
    ),
    ("stages.images.source.size", ("stages", "images", "source", "size"), 4097, "4096"),
    ("stages.images.max_side", ("stages", "images", "max_side"), 8193, "8192"),
    ("stages.images.min_side", ("stages", "images", "min_side"), 8193, "8192"),
    ("stages.images.max_bytes", ("stages", "images", "max_bytes"), 50_000_001, "50000000"),
    ("stages.images.max_pixels", ("stages", "images", "max_pixels"), 100_000_001, "100000000"),
    ("stages.images.download_timeout_s", ("stages", "images", "download_timeout_s"), 3601, "3600"),
    ("stages.images.download_attempts", ("stages", "images", "download_attempts"), 21, "20"),
    ("stages.images.download_concurrency", ("stages", "images", "download_concurrency"), 65, "64"),
    (
        "stages.images.overrides",
        ("stages", "images", "overrides"),
        _many("p", 10_001, lambda i: {"kind": "typographic"}),
        "at most 10000",
    ),
    ("stages.questions.max_attempts", ("stages", "questions", "max_attempts"), 21, "20"),
    ("stages.questions.types", ("stages", "questions", "types"), ["easy", "easy"], "twice"),
    (
        "stages.judge.max_pairs_per_question",
        ("stages", "judge", "max_pairs_per_question"),
        1001,
        "1000",
    ),
    ("stages.judge.max_attempts", ("stages", "judge", "max_attempts"), 21, "20"),
    ("stages.judge.aspects", ("stages", "judge", "aspects"), ["helpfulness"] * 2, "twice"),
    ("stages.pairs.safety_groups", ("stages", "pairs", "safety_groups"), 65, "64"),
    (
        "stages.pairs.never_chosen",
        ("stages", "pairs", "never_chosen"),
        ["length"] * 17,
        "at most 16",
    ),
    (
        "stages.publish.splits",
        ("stages", "publish", "splits"),
        _many("s", 17, lambda i: 1 / 17),
        "at most 16",
    ),
    ("endpoints", ("endpoints",), _many("e", 65, lambda i: {"kind": "openai"}), "at most 64"),
    ("models", ("models",), [_model(i) for i in range(65)], "at most 64"),
    ("judges", ("judges",), [_model(i) for i in range(17)], "at most 16"),
    ("only", ("only",), ["Malicious Use"] * 10_001, "at most 10000"),
    ("parallel_branches", ("parallel_branches",), 65, "64"),
    ("responses_in_flight", ("responses_in_flight",), 100_001, "100000"),
    ("early_stop_after", ("early_stop_after",), 10_001, "10000"),
    (
        "models",
        ("models",),
        [{**_model(i), "sampling": {"n": n}} for i, n in enumerate((128, 128, 1))],
        "257 response samples per question",
    ),
]


def config_with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    node = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return data


def check(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, path: Path) -> str:
    """`vlpref check PATH` through the command line's own entry point, in this process."""
    monkeypatch.setattr(sys, "argv", ["vlpref", "check", str(path)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    return line


def test_the_base_config_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE, sort_keys=False))
    monkeypatch.setattr(sys, "argv", ["vlpref", "check", str(path)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code in (0, None), capsys.readouterr().err


@pytest.mark.parametrize(
    ("field", "path", "value", "said"), CASES, ids=[f"{c[0]}={str(c[2])[:20]}" for c in CASES]
)
def test_a_count_past_its_bound_is_one_error_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    field: str,
    path: tuple[Any, ...],
    value: Any,
    said: str,
) -> None:
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump(config_with(path, value), sort_keys=False))
    line = check(capsys, monkeypatch, file)
    assert re.match(rf"error: {re.escape(str(file))}: {re.escape(field)}: line \d+: ", line), line
    assert said in line, line


def test_a_billion_typographic_images_are_refused_at_once(tmp_path: Path) -> None:
    """The issue's config, through a real `vlpref check` and `vlpref run` subprocess: refused in
    seconds (the interpreter's start included), nothing written, no Prefect server started."""
    data = config_with(("stages", "images", "source", "per_branch"), 1_000_000_000)
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump(data, sort_keys=False))
    for command in ("check", "run"):
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "vlpref.cli", command, str(file)],
            capture_output=True,
            text=True,
            timeout=120,
            env={k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},
        )
        assert time.perf_counter() - started < 30
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == (
            f"error: {file}: stages.images.source.per_branch: line 32: "
            "Input should be less than or equal to 10000 (got 1000000000)"
        )
        assert "prefect" not in proc.stderr.lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]
