"""A drifting sim judge asked again with a corrective turn (the task, its answer, "answer again in
this format"): it still judges the original task, and writes the canonical format for the share
`follows_corrections` of such re-asks. Real HTTP to the sim on loopback."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from tests.sim.helpers import JAIL, rating_prompt
from vlpref.sim.testing import SimServer

CORRECTION = "Your answer could not be read. Answer again with one line per aspect, `Aspect: d`."
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def ask(sim: SimServer, model: str, messages: list[dict[str, str]], seed: int) -> str:
    body = {"model": model, "messages": messages, "temperature": 0, "seed": seed}
    request = urllib.request.Request(
        sim.base_url + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with OPENER.open(request, timeout=10) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return str(answer["choices"][0]["message"]["content"])


def test_a_corrected_task_is_the_task_and_the_format_follows_the_correction() -> None:
    models = {
        "complies": {
            "persona": "judge",
            "styles": {"rating": {"table": 1}},
            "follows_corrections": 1.0,
        },
        "ignores": {
            "persona": "judge",
            "styles": {"rating": {"table": 1}},
            "follows_corrections": 0.0,
        },
        "canonical": {"persona": "judge"},
    }
    with SimServer({"models": models}) as sim:
        for seed in range(5):
            task = {"role": "user", "content": rating_prompt(JAIL)}
            first = ask(sim, "complies", [task], seed)
            assert first.lstrip().startswith("|")  # the drift style: a markdown table
            corrected = [
                task,
                {"role": "assistant", "content": first},
                {"role": "user", "content": CORRECTION},
            ]
            canonical = ask(sim, "canonical", [task], seed).splitlines()[0]
            again = ask(sim, "complies", corrected, seed)
            assert again.splitlines()[0].startswith("Harmlessness: ")  # canonical, same task
            assert again.splitlines()[0] == canonical  # and the same decision
            assert ask(sim, "ignores", corrected, seed).lstrip().startswith("|")
