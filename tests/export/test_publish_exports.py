"""`exports:` in the run config: a scheduled run writes its trainer formats with every version,
into `<store>/exports/<version_id>/<name>`, and setting them changes neither the config's hash
nor a stage key (an export changes nothing in the version). A real flow run (the session's
Prefect server) against the simulated server."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from flows.build import build_dataset
from vlpref.config import load_config
from vlpref.sim.testing import SimServer, sim_run_config
from vlpref.store import Store

SIM = {
    "models": {
        "sim-refuser": {"persona": "refuser"},
        "sim-jailbroken": {"persona": "jailbroken"},
        "sim-judge": {"persona": "judge"},
    }
}


def test_a_run_writes_its_exports_with_the_version(tmp_path: Path, prefect_server: str) -> None:
    with SimServer(SIM) as sim:
        data = sim_run_config(
            sim.base_url,
            name="exports",
            taxonomy="builtin:demo",
            workspace=str(tmp_path / "ws"),
            store=str(tmp_path / "store"),
            models=["refuser", "jailbroken"],
            per_branch=1,
        )
        plain = tmp_path / "plain.yaml"
        plain.write_text(yaml.safe_dump(data))
        data["exports"] = {
            "formats": [
                {"format": "trl"},
                {"format": "llamafactory", "name": "lf-train", "splits": ["train"]},
            ]
        }
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump(data))
        assert load_config(config).content_hash() == load_config(plain).content_hash()
        version_id = build_dataset(str(config))
    root = tmp_path / "store" / "exports" / version_id
    assert sorted(p.name for p in root.iterdir()) == ["lf-train", "trl"]
    trl = json.loads((root / "trl" / "export.json").read_text())
    lf = json.loads((root / "lf-train" / "export.json").read_text())
    version = Store(str(tmp_path / "store")).open(version_id)
    quadruples = sum(version.split(s).num_rows for s in version.splits)
    assert trl["version_id"] == version_id and trl["rows_written"] == quadruples > 0
    assert lf["rows_written"] == version.split("train").num_rows
    version.verify()  # the version's files are as its manifest lists them: untouched
    assert not any(p.name == "exports" for p in Path(version.path("")).iterdir())
