"""The YAML loader every file vlpref reads goes through (vlpref/yamlfile.py): duplicate keys,
alias bombs, recursive aliases, deep nesting, huge numbers and huge files are each one error
naming the file, the field and the line; nothing is expanded before it is counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.test_config import GOOD, GOOD_ENV, write, write_good
from vlpref import yamlfile
from vlpref.config import load_config
from vlpref.errors import ConfigError
from vlpref.yamlfile import load_yaml

REPO = Path(__file__).resolve().parents[1]

# The 9-line "billion laughs": 9^9 (387 million) strings once expanded.
ALIAS_BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def refused(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


# -- duplicate keys ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field", "line", "first"),
    [
        (("workspace: work\n", "workspace: work\nname: again\n"), "name", 4, 1),
        (
            ("    concurrency: 8\n", "    concurrency: 8\n    concurrency: 9\n"),
            "endpoints.sim.concurrency",
            9,
            8,
        ),
        (("n: 2}", "n: 2, n: 3}"), "models[0].sampling.n", 18, 18),
        (("  hosted:\n", "  sim:\n"), "endpoints.sim", 9, 5),
    ],
    ids=["top level", "nested", "in a flow mapping", "a whole mapping"],
)
def test_a_duplicate_key_is_refused_with_its_line(
    tmp_path: Path, change: tuple[str, str], field: str, line: int, first: int
) -> None:
    assert change[0] in GOOD
    path = write(tmp_path, GOOD.replace(change[0], change[1], 1))
    message = refused(path)
    key = field.rsplit(".", 1)[-1]
    assert message == (
        f"{path}: {field}: line {line}: duplicate key {key!r} (first on line {first}); "
        "write each key once"
    )


def test_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("base: &base {x: 1, y: 2}\nmine:\n  <<: *base\n  x: 3\n")
    data, _ = load_yaml(path)
    assert data["mine"] == {"x": 3, "y": 2}


def test_keys_equal_as_values_are_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "k.yaml"
    path.write_text("1: a\n01: b\n")
    with pytest.raises(ConfigError, match=r"line 2: duplicate key 1 \(first on line 1\)"):
        load_yaml(path)


# -- aliases, nesting, values, size ------------------------------------------------------------


def test_the_alias_bomb_is_refused_at_its_fifth_line(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    assert str(info.value) == (
        f"{path}: e[0]: line 5: YAML aliases would expand to more than 10,000 nodes "
        "(an alias bomb?); write the values out"
    )


BOMB_PROBE = """
import json, resource, sys, time
from vlpref.config import load_config
from vlpref.errors import ConfigError

before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
try:
    load_config(sys.argv[1])
except ConfigError as exc:
    error = str(exc)
print(json.dumps({
    "seconds": time.perf_counter() - started,
    "rss_before_mb": before / 1024,
    "rss_after_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "error": error,
}))
"""


def test_the_alias_bomb_fails_fast_in_little_memory(tmp_path: Path) -> None:
    """In a subprocess of its own (its peak RSS is its own), capped at 2 GB of address space
    so that a regression fails here instead of taking the machine: the loader used to expand
    the bomb until it ran out of memory (MemoryError after 15 s under the same cap)."""
    path = tmp_path / "run.yaml"
    path.write_text(ALIAS_BOMB)
    probe = subprocess.run(
        [sys.executable, "-c", BOMB_PROBE, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_cap_memory,
        cwd=REPO,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    seen = json.loads(probe.stdout)
    assert "alias bomb" in seen["error"]
    assert seen["seconds"] < 2, seen
    # What loading it cost: the imports before it (300 MB and more with Prefect loaded) are not
    # the bomb's, and vary with what vlpref imports.
    assert seen["rss_after_mb"] - seen["rss_before_mb"] < 50, seen
    assert seen["rss_after_mb"] - seen["rss_before_mb"] < 20, seen


def _cap_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def test_the_cli_refuses_the_alias_bomb_with_one_error_line(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(ALIAS_BOMB)
    proc = subprocess.run(
        [sys.executable, "-m", "vlpref.cli", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_cap_memory,
        env={**os.environ, **GOOD_ENV},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {path}: e[0]: line 5: YAML aliases would expand to more than 10,000 nodes "
        "(an alias bomb?); write the values out"
    )


def test_more_than_a_hundred_aliases_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "many.yaml"
    items = ", ".join(["*x"] * (yamlfile.MAX_ALIASES + 1))
    path.write_text(f"x: &x 1\nys: [{items}]\n")
    with pytest.raises(ConfigError, match=r"ys\[100\]: line 2: more than 100 YAML aliases"):
        load_yaml(path)
    path.write_text(f"x: &x 1\nys: [{', '.join(['*x'] * yamlfile.MAX_ALIASES)}]\n")
    assert len(load_yaml(path)[0]["ys"]) == yamlfile.MAX_ALIASES


@pytest.mark.parametrize("text", ["a: &a [1, *a]\n", "a: &a {b: *a}\n"])
def test_an_alias_inside_the_node_it_names_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="line 1: an alias inside the node it names"):
        load_yaml(path)


def test_deep_nesting_is_refused_before_python_recursion_runs_out(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"deep\.yaml: a: line 1: nested deeper than 64 levels"):
        load_yaml(path)


def test_an_integer_python_cannot_build_is_an_error_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "parallel_branches: " + "9" * 5000 + "\n")
    assert "line 28: invalid YAML: cannot read this value (Exceeds the limit" in refused(path)


def test_a_file_past_the_size_limit_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * (yamlfile.MAX_FILE_BYTES + 1))
    with pytest.raises(ConfigError, match=r"big\.yaml: cannot read: larger than 8 MiB"):
        load_yaml(path)


# -- every YAML file vlpref reads --------------------------------------------------------------


def test_the_taxonomy_goes_through_the_loader(tmp_path: Path) -> None:
    from vlpref.taxonomy import load_taxonomy

    path = tmp_path / "tax.yaml"
    path.write_text(ALIAS_BOMB)
    with pytest.raises(ConfigError, match=r"tax\.yaml: e\[0\]: line 5: YAML aliases would"):
        load_taxonomy(path)
    path.write_bytes(b"#" * (yamlfile.MAX_FILE_BYTES + 1))
    with pytest.raises(ConfigError, match="cannot read taxonomy file: larger than 8 MiB"):
        load_taxonomy(path)


def test_the_sim_config_goes_through_the_loader(tmp_path: Path) -> None:
    from vlpref.sim.config import load_config as load_sim_config

    path = tmp_path / "sim.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            models:
              sim-a: {persona: refuser}
              sim-a: {persona: judge}
            """
        )
    )
    with pytest.raises(ConfigError, match=r"sim\.yaml: models\.sim-a: line 3: duplicate key"):
        load_sim_config(path)


def test_prefect_yaml_goes_through_the_loader(tmp_path: Path) -> None:
    from vlpref.serve import read_deployments

    text = (REPO / "prefect.yaml").read_text()
    path = tmp_path / "prefect.yaml"
    path.write_text(text.replace("  - name: nightly\n", "  - name: nightly\n    name: other\n"))
    with pytest.raises(ConfigError, match=r"deployments\[0\]\.name: line \d+: duplicate key"):
        read_deployments(path)
    path.write_text(text)
    deployments = read_deployments(path, config="run.yaml")
    assert [d["name"] for d in deployments] == ["nightly", "branch-rerun"]


def test_the_good_config_still_loads(tmp_path: Path) -> None:
    assert load_config(write_good(tmp_path)).name == "demo"
