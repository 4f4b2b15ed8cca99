"""Process-wide defaults that keep vlpref (and Prefect under it) offline and quiet.

Applied when `vlpref` is imported, before Prefect is. Each is a default: a variable the user has
already set wins.

- `DO_NOT_TRACK=1`: Prefect's client-side analytics (and every other tool honouring the standard)
  send nothing.
- `PREFECT_SERVER_ANALYTICS_ENABLED=false`: a Prefect server started by us (ephemeral or
  `prefect server start`) does not report its start-up to Prefect.
- `PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED=false`: no version round trip on each client.
- `RAY_USAGE_STATS_ENABLED=0`: a local Ray that the Ray runner starts (and its workers, which
  inherit the variable) does not report usage to Ray's servers, which it does by default for
  `ray.init()` clusters.
No `PREFECT_API_URL` is set: with none, Prefect runs flows against a temporary local server
(SQLite under `PREFECT_HOME`), which needs no network.
"""

from __future__ import annotations

import os

OFFLINE_DEFAULTS: dict[str, str] = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def apply_offline_defaults() -> None:
    for name, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(name, value)
