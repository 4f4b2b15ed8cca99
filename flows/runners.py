"""Task runners for `build_dataset`: where the (stage, branch) tasks execute.

- `threads` (default): Prefect's ThreadPoolTaskRunner in this process; on Ctrl-C or SIGTERM it
  cancels the model requests in flight, so the run stops within seconds (`StoppingThreadPool`).
- `dask`: prefect-dask's DaskTaskRunner; a local cluster of worker processes, or an existing
  cluster by address (`tcp://scheduler:8786`). Install the `dask` extra.
- `ray`: prefect-ray's RayTaskRunner; a local Ray, or a cluster by address
  (`ray://head:10001`). Install the `ray` extra.
Workers need the workspace and the store on storage they all reach (a shared filesystem or an
object store URI) and PREFECT_API_URL pointing at the same Prefect server.

Under Dask the endpoints' `concurrency`, `rpm` and `tpm` hold for the whole run, not per worker:
`ScaleOutDaskRunner` opens a `vlpref.limits.shared_limits()` scope around the cluster, so every
worker's providers take their slots from global concurrency limits on the run's Prefect server.
It also hands its local workers this process's Prefect API (they never start a server of their
own), and reports each finished stage to this process's progress listeners (the console board),
since a stage task in a worker process tells only that process.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any

from prefect.task_runners import ThreadPoolTaskRunner

from vlpref import limits, stopping
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
        runner_class = _scale_out_dask_runner(DaskTaskRunner)
        if address:
            return runner_class(address=address)
        return runner_class(
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


class SetEnvironment:
    """A Dask worker plugin that sets environment variables in every worker, including workers
    that join later: how a cluster started elsewhere (`--address`) learns the run's limits
    scope. Local workers inherit the variables anyway."""

    name = "vlpref-environment"

    def __init__(self, variables: dict[str, str]) -> None:
        self.variables = variables

    def setup(self, worker: Any) -> None:
        import os

        os.environ.update(self.variables)


def _api_url_for_workers() -> str | None:
    """The Prefect API this process talks to: the configured one, or the temporary server
    Prefect started for it (a flow called from Python without PREFECT_API_URL). Local workers
    get it in their environment; without it each would start a temporary server of its own."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if url:
        return str(url)
    import sys

    module = sys.modules.get("prefect.server.api.server")
    instances = getattr(getattr(module, "SubprocessASGIServer", None), "_instances", {})
    for server in list(instances.values()):
        if getattr(server, "server_process", None) is not None:
            return str(server.api_url)
    return None


def _stage_of(parameters: dict[str, Any]) -> tuple[str, str] | None:
    """(stage, branch_id) of a `flows.build.stage_task` call, from its parameters."""
    name, leaf = parameters.get("name"), parameters.get("leaf")
    branch_id = getattr(leaf, "branch_id", None)
    if isinstance(name, str) and isinstance(branch_id, str):
        return name, branch_id
    return None


def _tell_progress(stage: str, branch_id: str, future: Any) -> None:
    """A stage task finished in a worker: tell this process's listeners its counts (what the
    task told the worker's, where nobody listens). Failures show in the run summary."""
    from flows import progress

    try:
        # The finished Dask future holds the task's final state: no call to the Prefect API
        # (its `state` property would ask the API from this callback's thread). A failed
        # task's value is its exception, without counts. (A timeout of 0 always times out in
        # distributed's sync, even for a finished future.)
        value = future.result(timeout=10, raise_on_failure=False)
    except Exception:  # the display is a nicety: never let it break the run
        return
    counts = getattr(value, "counts", None)
    if isinstance(counts, dict):
        progress.notify(stage, branch_id, counts)


def _scale_out_dask_runner(base: type[Any]) -> type[Any]:
    """`DaskTaskRunner` with run-wide limits, a shared Prefect API and progress (module
    docstring). Built on first use: prefect-dask is an optional extra."""
    global _DASK_RUNNER
    if _DASK_RUNNER is not None:
        return _DASK_RUNNER

    class ScaleOutDaskRunner(base):  # type: ignore[misc]
        def __enter__(self) -> Any:
            from vlpref.prefect_server import api_url_in_environment

            stack = contextlib.ExitStack()
            try:
                scope = stack.enter_context(limits.shared_limits())
                url = _api_url_for_workers()
                if url is not None:  # set while local workers are spawned (and respawned)
                    stack.enter_context(api_url_in_environment(url))
                entered = super().__enter__()
                stack.push(lambda *exc: super(ScaleOutDaskRunner, self).__exit__(*exc))
                if self._client is not None:
                    self._client.register_plugin(SetEnvironment({limits.LIMITS_ENV: scope}))
            except BaseException:
                stack.close()
                raise
            self._vlpref_stack: contextlib.ExitStack | None = stack
            return entered

        def __exit__(self, *exc_info: Any) -> None:
            stack: contextlib.ExitStack | None = getattr(self, "_vlpref_stack", None)
            self._vlpref_stack = None
            if stack is not None:
                stack.__exit__(*exc_info)  # the cluster first, then the run's limits

        def submit(self, task: Any, parameters: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            future = super().submit(task, parameters, *args, **kwargs)
            stage = _stage_of(parameters)
            if stage is not None:
                future.add_done_callback(lambda f: _tell_progress(*stage, f))
            return future

    ScaleOutDaskRunner.__qualname__ = ScaleOutDaskRunner.__name__
    _DASK_RUNNER = ScaleOutDaskRunner
    return ScaleOutDaskRunner


_DASK_RUNNER: type[Any] | None = None
