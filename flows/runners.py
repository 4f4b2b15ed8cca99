"""Task runners for `build_dataset`: where the (stage, branch) tasks execute.

- `threads` (default): Prefect's ThreadPoolTaskRunner in this process; on Ctrl-C or SIGTERM it
  cancels the model requests in flight, so the run stops within seconds (`StoppingThreadPool`).
- `dask`: prefect-dask's DaskTaskRunner; a local cluster of worker processes, or an existing
  cluster by address (`tcp://scheduler:8786`). Install the `dask` extra.
- `ray`: prefect-ray's RayTaskRunner; a local Ray, or a cluster by address
  (`ray://head:10001`). Install the `ray` extra.
Workers need the workspace and the store on storage they all reach (a shared filesystem or an
object store URI) and PREFECT_API_URL pointing at the same Prefect server.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from prefect.task_runners import ThreadPoolTaskRunner

from vlpref import stopping
from vlpref.errors import ConfigError

RUNNERS = ("threads", "dask", "ray")


def cancel_model_requests() -> bool:
    """Cancel every batch in flight on this process's shared model service: each stage task
    waiting on one gets a CancelledError at once instead of waiting for its last answers. What
    arrived is already in the journal (written as it arrives); the journal is closed by the
    stage's `with`. Returns whether there was a running service to cancel.

    For interruptions only: the service is not meant to be used afterwards."""
    from vlpref.service import ModelService

    # ModelService has no public cancel: its batches run as tasks on its private loop.
    service = ModelService._shared
    loop = getattr(service, "_loop", None)
    if not isinstance(loop, asyncio.AbstractEventLoop) or not loop.is_running():
        return False

    def cancel_all() -> None:
        for task in asyncio.all_tasks(loop):
            task.cancel()

    loop.call_soon_threadsafe(cancel_all)
    return True


def _interrupted(exc: BaseException | None) -> bool:
    """Teardown because of Ctrl-C, SIGTERM (Prefect's TerminationSignal) or an exit: not an
    Exception, which leaves the running tasks to finish (their answers reach the journal)."""
    return exc is not None and not isinstance(exc, Exception)


class StoppingThreadPool(ThreadPoolTaskRunner[Any]):
    """Prefect's thread pool, which stops the model requests in flight when the flow run is torn
    down by an interruption. Prefect's own teardown waits for running tasks, and a stage task can
    have minutes of requests ahead of it; cancelling them first makes the wait a matter of
    seconds. Prefect calls `cancel_all` on SIGTERM (inside its `except TerminationSignal`) and
    `__exit__` on Ctrl-C."""

    def cancel_all(self) -> None:
        if _interrupted(sys.exc_info()[1]):
            _stop_work()
        super().cancel_all()

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if _interrupted(exc_value):
            _stop_work()
        super().__exit__(exc_type, exc_value, traceback)


def _stop_work() -> None:
    """Model requests in flight are cancelled; CPU loops (a branch's images) stop between two
    items (vlpref/stopping.py)."""
    stopping.request()
    cancel_model_requests()


def task_runner(
    name: str = "threads", *, workers: int | None = None, address: str | None = None
) -> Any:
    if name == "threads":
        return StoppingThreadPool(max_workers=workers) if workers else StoppingThreadPool()
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
