"""Which run config a command uses when none is given: `--config`, then `VLPREF_CONFIG`, then
`./vlpref.yaml`, then the demo's (`./.vlpref/demo/run.yaml`, written by `make demo`). The first
that is given or exists wins; a given one that does not exist is an error, never skipped."""

from __future__ import annotations

import os
from pathlib import Path

from vlpref.errors import ConfigError

ENV = "VLPREF_CONFIG"
LOCAL = Path("vlpref.yaml")
DEMO = Path(".vlpref") / "demo" / "run.yaml"


def find_config(given: str | Path | None, cwd: Path | None = None) -> tuple[str | Path, str]:
    """(the config file, where it came from: `--config`, `$VLPREF_CONFIG`, `./vlpref.yaml` or
    `the demo's`). A URI on shared storage (`s3://…`) is taken as given: the loader reads it, and
    says so if it is not there."""
    here = cwd or Path.cwd()
    if given is not None:
        return _existing(given, "--config"), "--config"
    env = os.environ.get(ENV)
    if env:
        return _existing(env, f"${ENV}"), f"${ENV}"
    for path, why in ((LOCAL, "./vlpref.yaml"), (DEMO, "the demo's")):
        if (here / path).is_file():
            return here / path, why
    raise ConfigError(
        f"no run config: give --config FILE, set {ENV}, or put vlpref.yaml here "
        f"({here}); `make demo` writes {DEMO}"
    )


def _existing(location: str | Path, source: str) -> str | Path:
    text = str(location)
    if "://" in text and not text.startswith("file://"):
        return text  # remote: read (or refused) by load_config, which names it
    path = Path(text.removeprefix("file://"))
    if not path.is_file():
        raise ConfigError(f"{source}: {path} is not a file")
    return path
