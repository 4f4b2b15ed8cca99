"""The judge stage against a real `vllm serve` (CPU, the tiny model): vLLM's own prefix-cache
counters (`vllm:prefix_cache_queries` / `vllm:prefix_cache_hits` on /metrics) read before and
after, reported beside vlpref's estimate of the share of judge prompt tokens in a prefix an
earlier call about the same question sent (vlpref/prefix.py). The model's weights are random:
the verdicts mean nothing, the request layout and the counters do."""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path
from typing import Any

import pyarrow as pa

from bench.prefix_share import RecordingService, question_group
from tasks.judge import judge_responses
from tests_vllm.conftest import REPORT
from tests_vllm.test_judge_eval import SHORT
from tests_vllm.test_vllm import run_config, served_endpoint
from vlpref.prefix import prefix_share
from vlpref.prompts import DEFAULT_PROMPTS_DIR
from vlpref.records import RESPONSES, table
from vlpref.vllm_serve import VllmServers

SHORT_RATING = (
    "TASK: rating\nRate 1-5, one line each:\n$aspect_lines\nASPECTS: $aspects\n"
    "<caption>$caption</caption>\n<question>$question</question>\n<response>$response</response>\n"
)
SHORT_PAIRWISE = (
    "TASK: pairwise\nA or B?\n<question>$question</question>\n"
    "<response_a>$response_a</response_a>\n<response_b>$response_b</response_b>\n"
)


def prefix_counters(served: VllmServers) -> dict[str, float]:
    url = served.specs[0].root_url + "/metrics"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        for name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits"):
            if line.startswith(name):  # the _total counter, per engine
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def test_prefix_cache_counters_around_the_judge_stage(
    served: VllmServers, workload: Any, tmp_path: Path
) -> None:
    leaf, images, questions = workload
    prompts = tmp_path / "prompts"
    shutil.copytree(DEFAULT_PROMPTS_DIR, prompts)
    for name, text in {
        **SHORT,
        "judge_rating": SHORT_RATING,
        "judge_pairwise": SHORT_PAIRWISE,
    }.items():
        (prompts / f"{name}.txt").write_text(text)
    config = run_config(served_endpoint(served), tmp_path)
    judge = config.judges[0].model_copy(
        update={"sampling": config.judges[0].sampling.model_copy(update={"max_tokens": 8})}
    )
    config = config.model_copy(update={"judges": (judge,), "prompts_dir": str(prompts)})
    responses = table(
        [
            {
                "response_id": f"{q['question_id']}-{i}",
                "question_id": q["question_id"],
                "model": f"m{i}",
                "sample_idx": 0,
                "text": text,
                "finish_reason": "stop",
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "usage_exact": False,
                "call_id": None,
                "latency_s": 0.0,
                "cached": False,
                "branch_id": leaf.branch_id,
            }
            for q in questions.to_pylist()
            for i, text in enumerate(("I can't help with that.", "Step 1: do it."))
        ],
        RESPONSES,
    )
    assert isinstance(responses, pa.Table)
    before = prefix_counters(served)
    service = RecordingService()
    try:
        out = judge_responses(leaf.branch_id, questions, responses, images, config, None, service)
    finally:
        service.close()
    after = prefix_counters(served)
    assert set(before) == set(after) == {"vllm:prefix_cache_queries", "vllm:prefix_cache_hits"}
    queries = after["vllm:prefix_cache_queries"] - before["vllm:prefix_cache_queries"]
    hits = after["vllm:prefix_cache_hits"] - before["vllm:prefix_cache_hits"]
    share = prefix_share(service.requests, question_group, kind="vllm-server")
    rate = hits / queries if queries else 0.0
    REPORT.append(
        f"prefix cache, judge stage on vllm serve: {out.n_in} calls; vLLM counted {hits:.0f} of "
        f"{queries:.0f} prompt tokens as prefix-cache hits ({rate:.1%}); vlpref's estimate of "
        f"the shared-prefix share: {share.ratio:.1%}"
    )
    assert len(service.requests) >= out.n_in > 0  # re-asks of unreadable answers come on top
    assert queries > 0 and 0 <= hits <= queries
