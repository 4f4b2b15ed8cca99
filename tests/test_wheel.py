"""vlpref installs as a wheel and works from outside the repository (issue 12, item 8).

The wheel is built offline (no build isolation: the dev extra installs setuptools) from a copy of
what the build reads, installed with --no-deps into a fresh venv, and given its dependencies by a
`.pth` line naming this venv's site-packages. A path line in a `.pth` only appends that folder to
sys.path; the `.pth` files inside it (the editable install's finder among them) are not run, so
the checkout cannot leak in: the test asserts that vlpref, flows and tasks import from the new
venv. Then, from an empty folder outside the repository, the demo builds a version from the
shipped demo taxonomy and prompts, and `vlpref check` accepts a config naming `builtin:demo`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from vlpref.prompts import DEFAULT_PROMPTS_DIR, prompt_versions
from vlpref.resources import TAXONOMY_DIR
from vlpref.taxonomy import load_taxonomy

REPO = Path(__file__).resolve().parents[1]
# What the build reads (pyproject's packages and readme). The top-level prompts/ and taxonomy/
# symlinks are left out on purpose: the wheel must take them from vlpref/resources/.
BUILD_INPUTS = ("pyproject.toml", "README.md", "vlpref", "flows", "tasks")

PROBE = """
import json, sys
import flows, tasks, vlpref
from vlpref.config import load_config
from vlpref.prompts import DEFAULT_PROMPTS_DIR
from vlpref.resources import builtin_taxonomy
from vlpref.taxonomy import load_taxonomy
config = load_config(sys.argv[1])
print(json.dumps({
    "vlpref": vlpref.__file__,
    "flows": flows.__file__,
    "tasks": tasks.__file__,
    "prompts": str(DEFAULT_PROMPTS_DIR),
    "builtin_demo": str(builtin_taxonomy("builtin:demo")),
    "config_taxonomy": config.taxonomy,
    "leaves": len(load_taxonomy(config.taxonomy).leaves()),
    "sys_path": sys.path,
}))
"""

OUTSIDE_CONFIG = """\
name: outside
taxonomy: {taxonomy}
endpoints:
  sim: {{kind: openai, base_url: "http://127.0.0.1:9/v1"}}
models: [{{name: m, endpoint: sim, model: sim-refuser, sampling: {{n: 2}}}}]
generator: {{name: gen, endpoint: sim, model: sim-judge}}
judges: [{{name: judge, endpoint: sim, model: sim-judge}}]
"""


def _run(
    cmd: list[str],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def _inside(path: str | Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


def test_the_checkout_paths_are_symlinks_into_the_package() -> None:
    """Configs in a checkout keep saying `taxonomy/demo.yaml` and `prompts_dir: prompts`."""
    for name, target in (("prompts", DEFAULT_PROMPTS_DIR), ("taxonomy", TAXONOMY_DIR)):
        top = REPO / name
        assert top.is_symlink() and not Path(os.readlink(top)).is_absolute(), top
        assert top.resolve() == target.resolve()
    assert _inside(DEFAULT_PROMPTS_DIR, REPO / "vlpref" / "resources")


@pytest.mark.slow
def test_the_wheel_installs_and_builds_the_demo_outside_the_repo(
    tmp_path: Path, prefect_server: str
) -> None:
    # -- build the wheel, offline, from a copy of the sources
    src = tmp_path / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(
                REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        else:
            shutil.copy2(REPO / name, src / name)
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip"]
    offline = ["--no-deps", "--no-index"]
    built = _run(
        [*pip, "wheel", *offline, "--no-build-isolation", "--wheel-dir", str(dist), str(src)],
        timeout=300,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = dist.glob("vlpref-*.whl")

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    shipped = {
        p.relative_to(REPO).as_posix()
        for package in ("vlpref", "flows", "tasks")
        for p in (REPO / package).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert shipped - names == set(), "files of the package missing from the wheel"
    assert {f"vlpref/resources/prompts/{n}.txt" for n in prompt_versions()} <= names
    assert {"vlpref/resources/taxonomy/demo.yaml", "vlpref/resources/taxonomy/spa_vl.yaml"} <= names
    assert b"License-Expression: Apache-2.0" in metadata

    # -- a fresh venv: the wheel, and this venv's site-packages for the dependencies only
    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=120)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    installed = _run([*pip, "--python", str(python), "install", *offline, str(wheel)], timeout=300)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    site = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        timeout=60,
    )
    assert site.returncode == 0, site.stderr
    deps = sysconfig.get_paths()["purelib"]
    (Path(site.stdout.strip()) / "_vlpref_test_deps.pth").write_text(deps + "\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PREFECT_API_URL"] = prefect_server  # the session's server, as every flow test uses
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    outside = tmp_path / "outside"
    outside.mkdir()

    # -- the installed package, not the checkout, answers imports and names the shipped files
    config = outside / "run.yaml"
    config.write_text(OUTSIDE_CONFIG.format(taxonomy="builtin:demo"))
    probe = _run([str(python), "-c", PROBE, str(config)], timeout=120, cwd=outside, env=env)
    assert probe.returncode == 0, probe.stderr[-3000:]
    seen = json.loads(probe.stdout)
    for key in ("vlpref", "flows", "tasks", "prompts", "builtin_demo", "config_taxonomy"):
        assert _inside(seen[key], venv), f"{key} comes from {seen[key]}, not the new venv"
    assert seen["config_taxonomy"] == seen["builtin_demo"]
    assert seen["leaves"] == len(load_taxonomy(TAXONOMY_DIR / "demo.yaml").leaves())
    # The checkout is not on the path (its venv's site-packages is, for the dependencies).
    leaks = [p for p in seen["sys_path"] if p and _inside(p, REPO) and Path(p) != Path(deps)]
    assert leaks == [], seen["sys_path"]

    # -- `vlpref check` on a config outside the repository
    vlpref = str(venv / "bin" / "vlpref")
    checked = _run([vlpref, "check", str(config)], timeout=120, cwd=outside, env=env)
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert "ok" in checked.stderr
    config.write_text(OUTSIDE_CONFIG.format(taxonomy="builtin:nope"))
    refused = _run([vlpref, "check", str(config)], timeout=120, cwd=outside, env=env)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "taxonomy: line 2: unknown builtin taxonomy 'builtin:nope'" in refused.stderr
    assert "builtin:demo, builtin:spa_vl" in refused.stderr

    # -- the demo, from the empty folder: its files go under ./.vlpref/demo
    demo = _run(
        [str(python), "-m", "vlpref.demo", "--per-branch", "1"],
        timeout=240,
        cwd=outside,
        env=env,
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "dataset version" in demo.stdout
    # Prefect's lines went to the run's log file, whose path the demo says first.
    assert demo.stderr.startswith("log: ") and "| INFO" not in demo.stderr, demo.stderr[-2000:]
    root = outside / ".vlpref" / "demo"
    run_config = yaml.safe_load((root / "run.yaml").read_text())
    assert run_config["taxonomy"] == "builtin:demo"
    from vlpref.store import Store

    (version,) = Store(str(root / "store")).list_versions()
    manifest = Store(str(root / "store")).open(version.version_id).manifest
    assert manifest["taxonomy"]["hash"] == load_taxonomy("builtin:demo").content_hash
    assert manifest["prompts"] == prompt_versions()
    assert manifest["counts"], manifest
