"""Task runners for `build_dataset`: where the (stage, branch) tasks execute.

- `threads` (default): Prefect's ThreadPoolTaskRunner in this process.
- `dask`: prefect-dask's DaskTaskRunner; a local cluster of worker processes, or an existing
  cluster by address (`tcp://scheduler:8786`). Install the `dask` extra.
- `ray`: prefect-ray's RayTaskRunner; a local Ray, or a cluster by address
  (`ray://head:10001`). Install the `ray` extra.
Workers need the workspace and the store on storage they all reach (a shared filesystem or an
object store URI) and PREFECT_API_URL pointing at the same Prefect server.
"""

from __future__ import annotations

from typing import Any

from vlpref.errors import ConfigError

RUNNERS = ("threads", "dask", "ray")


def task_runner(
    name: str = "threads", *, workers: int | None = None, address: str | None = None
) -> Any:
    if name == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers) if workers else ThreadPoolTaskRunner()
    if name == "dask":
        try:
            from prefect_dask.task_runners import DaskTaskRunner
        except ImportError as exc:
            raise ConfigError(
                "the dask runner needs the `dask` extra: pip install 'vlpref[dask]'"
            ) from exc
        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": workers or 2, "processes": True, "threads_per_worker": 4}
        )
    if name == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as exc:
            raise ConfigError(
                "the ray runner needs the `ray` extra: pip install 'vlpref[ray]'"
            ) from exc
        return RayTaskRunner(address=address) if address else RayTaskRunner()
    raise ConfigError(f"unknown task runner {name!r} (one of {', '.join(RUNNERS)})")
