"""The generation source in real flow runs (the session's Prefect server) against the sim: the
plan counts image requests before anything is sent, a build asks them once, and a rerun (and
the plan after it) finds every image in the journal and sends nothing."""

from __future__ import annotations

from pathlib import Path

import yaml

from flows.build import build_dataset
from flows.plan import plan_run
from vlpref.config import load_config
from vlpref.sim.testing import SimServer, sim_run_config

CYBER = "Malicious Use/Security threats/cyber"
SIM = {
    "models": {
        "sim-refuser": {"persona": "refuser"},
        "sim-jailbroken": {"persona": "jailbroken"},
        "sim-judge": {"persona": "judge"},
    }
}


def test_generated_images_are_planned_built_once_and_reused(
    tmp_path: Path, prefect_server: str
) -> None:
    with SimServer(SIM) as sim:
        data = sim_run_config(
            sim.base_url,
            name="generate",
            taxonomy="builtin:demo",
            workspace=str(tmp_path / "ws"),
            store=str(tmp_path / "store"),
            models=["refuser", "jailbroken"],
            only=[CYBER],
            stages={
                "images": {
                    "source": {
                        "kind": "generate",
                        "endpoint": "sim",
                        "model": "sim-painter",
                        "size": "64x64",
                        "per_branch": 2,
                        "seed": 0,
                    }
                }
            },
        )
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump(data, sort_keys=False))

        planned = [line for line in plan_run(load_config(config)).lines if line.stage == "images"]
        assert [(ln.model, ln.to_send, ln.from_journal) for ln in planned] == [
            ("sim-painter", 2, 0)
        ]
        assert sim.counters()["total"] == 0 and not (tmp_path / "ws").exists()

        build_dataset(str(config))
        painter = sim.counters()["by_model"]["sim-painter"]
        assert painter == {"200": 2}
        total = sim.counters()["total"]

        build_dataset(str(config))
        assert sim.counters()["total"] == total  # nothing at all sent again

        again = plan_run(load_config(config))
        assert again.to_json()["requests"] == {"from_journal": 0, "to_send": 0, "bound": 0}
