"""A tiny randomly initialised open_clip model, built locally (no download), for the retrieval
tier: 32-d embeddings, one-layer 32-wide towers over 32 px images, open_clip's own BPE tokenizer
(shipped in its wheel). Saved as an open_clip model folder (`open_clip_config.json` and
`open_clip_pytorch_model.bin`), the layout `vlpref index build --model` loads. Its similarities
mean nothing; the code path (config, weights, preprocessing, tokenizer, FAISS) is the real one.

    python -m tests_trainers.tiny_clip OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CONFIG = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "head_width": 16,
            "patch_size": 8,
        },
        # open_clip's own BPE vocabulary (49,408 tokens), shipped in its wheel.
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    },
    "preprocess_cfg": {
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    },
}


def ensure_torchvision() -> None:
    """Let torchvision import beside the CPU torch wheel.

    The only torchvision on the registry for torch 2.13 is a CUDA build: its compiled ops need
    libtorch_cuda, so they do not load, and torchvision 0.28 then fails at import registering
    fake kernels for `torchvision::nms` / `qnms`, ops that were never defined. Defining their
    schemas (without kernels) lets the import finish; open_clip uses torchvision's pure-Python
    transforms only, never these ops. A torchvision built for the installed torch (PyTorch's own
    CPU wheels) needs none of this, and this does nothing there."""
    import importlib.util

    import torch

    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018 - defined when torchvision's ops load
        return
    except (AttributeError, RuntimeError):
        pass
    try:
        import torchvision  # noqa: F401

        return
    except RuntimeError:
        pass
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
    _KEEP.append(library)
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the failed import's half-initialised modules


_KEEP: list[object] = []


def build(out: Path) -> Path:
    """Write the model folder (random weights, seed 0) and return it."""
    ensure_torchvision()
    import open_clip
    import torch

    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps(CONFIG, indent=2))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{out}", load_weights=False)
    torch.save(model.state_dict(), out / "open_clip_pytorch_model.bin")
    return out


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
