"""Judge prompts laid out for prefix caches: the share of judge prompt tokens that sit in a prefix
an earlier call about the same question (and image) already sent, for two layouts.

    python -m bench.prefix_share [--per-branch 5] [--out bench/results/YYYY-MM-DD-prefix.md]

Builds the demo against the simulated server, then asks its judge stage again, per branch, on a
model service that records every request in the order the stage sends it (answers from the sim;
no journal, so every call is made), for:

    shipped          the templates as shipped: image first, then the task's instructions, the
                     question, and the variable part (response, pair, rule) last
    question-first   the same templates with the question (and caption) moved before the task's
                     instructions, so that every kind of call about a question shares it

and for two judge setups: the demo's (safety, ratings, pairwise) and one with rules and debias
(more calls per question). Token weights as in `vlpref plan` (text 4 characters a token, an image
by OpenAI's high-detail rule). See vlpref/prefix.py for the measure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import yaml

from vlpref.chat import ChatRequest, ImagePart, TextPart
from vlpref.prefix import Share, prefix_share
from vlpref.service import Batch, ModelService

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = ("judge_safety", "judge_rating", "judge_pairwise", "judge_rule")
_BLOCK = re.compile(r"^<(question|caption)>.*</\1>\n", re.MULTILINE)


def question_first(text: str) -> str:
    """The template with its <question> (then <caption>) line moved to the top."""
    blocks = {m.group(1): m.group(0) for m in _BLOCK.finditer(text)}
    rest = _BLOCK.sub("", text)
    return blocks.get("question", "") + blocks.get("caption", "") + rest


class RecordingService(ModelService):
    """Sends as usual and keeps every request, in the order the stage hands them over."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[ChatRequest] = []

    def run(self, batches: Iterable[Any], journal: Any, stats: Any = None, **kw: Any) -> Any:
        def noted(requests: Iterable[ChatRequest]) -> Iterator[ChatRequest]:
            for request in requests:
                self.requests.append(request)
                yield request

        wrapped = [
            Batch(b.provider, noted(b.requests), b.check)
            if isinstance(b, Batch)
            else Batch(b[0], noted(b[1]))
            for b in batches
        ]
        return super().run(wrapped, journal, stats, **kw)


def question_group(request: ChatRequest) -> tuple[str, str]:
    """Calls about one question: its image and its <question> text."""
    image = next(
        (p.sha256 for m in request.messages for p in m.content if isinstance(p, ImagePart)), ""
    )
    text = "".join(p.text for m in request.messages for p in m.content if isinstance(p, TextPart))
    found = re.search(r"<question>(.*?)</question>", text, re.DOTALL)
    return image, found.group(1) if found else ""


def measure(per_branch: int) -> list[tuple[str, str, Share]]:
    from flows.build import build_dataset
    from tasks.judge import judge_responses
    from vlpref.config import load_config
    from vlpref.demo import SIM_MODELS, demo_config
    from vlpref.sim.testing import SimServer
    from vlpref.store import Store
    from vlpref.taxonomy import load_taxonomy

    out: list[tuple[str, str, Share]] = []
    with tempfile.TemporaryDirectory() as tmp, SimServer({"models": SIM_MODELS}) as sim:
        root = Path(tmp)
        data = demo_config(sim.base_url, root, per_branch=per_branch)
        shipped = REPO / "prompts"
        reordered = root / "prompts-question-first"
        shutil.copytree(shipped, reordered)
        for name in TEMPLATES:
            path = reordered / f"{name}.txt"
            path.write_text(question_first(path.read_text()))
        config_path = root / "run.yaml"
        config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        version = Store(str(root / "store")).open(build_dataset(str(config_path)))
        base = load_config(config_path)
        leaves = {leaf.branch_id: leaf for leaf in load_taxonomy(base.taxonomy).leaves()}
        judge = base.judges[0]
        setups = {
            "safety + ratings + pairwise": judge,
            "+ rules (max) + debias": judge.model_copy(
                update={"rules": "max", "debias": "content_free"}
            ),
        }
        tables = {n: version.table(n) for n in ("questions", "responses", "images")}
        for setup, entry in setups.items():
            for layout, folder in (("shipped", shipped), ("question-first", reordered)):
                config = base.model_copy(update={"judges": (entry,), "prompts_dir": str(folder)})
                service = RecordingService()
                try:
                    for branch_id, leaf in leaves.items():
                        q, r = tables["questions"], tables["responses"]
                        judge_responses(
                            branch_id,
                            q.filter(pc.equal(q["branch_id"], branch_id)),
                            r.filter(pc.equal(r["branch_id"], branch_id)),
                            tables["images"],
                            config,
                            None,
                            service,
                            rules=leaf.rules,
                        )
                finally:
                    service.close()
                out.append((setup, layout, prefix_share(service.requests, question_group)))
    return out


def report(results: list[tuple[str, str, Share]], per_branch: int) -> str:
    lines = [
        f"# Judge prompts and prefix caches ({dt.date.today().isoformat()})",
        "",
        f"Demo taxonomy, {per_branch} images per branch, the demo's six response models and "
        "judge (`python -m bench.prefix_share`). Share: judge prompt tokens in a prefix an "
        "earlier call about the same question and image already sent (vlpref/prefix.py).",
        "",
        "| judge setup | layout | calls | prompt tokens (est.) | in a shared prefix | share |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for setup, layout, share in results:
        lines.append(
            f"| {setup} | {layout} | {share.calls:,} | {share.tokens:,.0f} | "
            f"{share.shared:,.0f} | {share.ratio:.1%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.prefix_share", description=__doc__)
    parser.add_argument("--per-branch", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    text = report(measure(args.per_branch), args.per_branch)
    out = args.out or REPO / "bench" / "results" / f"{dt.date.today().isoformat()}-prefix.md"
    out.write_text(text, encoding="utf-8")
    print(text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
