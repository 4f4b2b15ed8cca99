"""Build `.venv-trainers`: the trainers tier's own virtual environment (CPU only, no GPU).

    python3.11 .ci/trainers_venv.py .venv-trainers

What goes in, and why:

- `torch==2.13.0` (the local CPU wheel; an open range would pull multi-GB CUDA builds) and `trl`,
  which brings transformers, accelerate and datasets. TRL does not pin against vlpref's
  dependencies (unlike vLLM, see .ci/vllm_venv.py), so the two share one environment.
- vlpref itself with its `dev` and `retrieval` extras, editable: the tier builds a real version
  through a Prefect flow run against the simulated server (the export tests' fixture), exports
  it, and hands the export to TRL; and it builds the retrieval source's embedded index with
  open_clip and FAISS (tests_trainers/test_retrieval.py). `torchvision==0.28.0` is the release
  that goes with torch 2.13 (pinned with it, or pip would pick another torch); the registry's
  build is CUDA-linked, so its compiled ops do not load on the CPU torch:
  tests_trainers/tiny_clip.py says how the tier lets it import anyway (open_clip only uses its
  Python transforms).
- LLaMA-Factory and ms-swift are not installed: each pins its own torch, transformers, peft and
  more, which would fight TRL's; their exports are checked against their documented schemas in
  tests/export (the docstring there says so).

It ends by importing what the tier uses, so a broken environment fails here, loudly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINERS = ["torch==2.13.0", "torchvision==0.28.0", "trl"]
CHECK = (
    "import torch, transformers, trl, datasets, faiss, vlpref.export, flows.build;"
    "import tests_trainers.tiny_clip as t; t.ensure_torchvision(); import open_clip;"
    "from trl.trainer.dpo_trainer import DataCollatorForVisionPreference;"
    "print('trl', trl.__version__, '| transformers', transformers.__version__,"
    " '| torch', torch.__version__, '| datasets', datasets.__version__)"
)


def run(*cmd: str, cwd: Path | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=cwd)


def main() -> None:
    venv = Path(sys.argv[1] if len(sys.argv) > 1 else ".venv-trainers")
    python = venv / "bin" / "python"
    if not python.exists():
        run(sys.executable, "-m", "venv", str(venv))
    run(str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(str(python), "-m", "pip", "install", "--quiet", *TRAINERS)
    run(str(python), "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[dev,retrieval]")
    run(str(python), "-c", CHECK, cwd=ROOT)


if __name__ == "__main__":
    main()
