"""Task runners for `build_dataset`: where the (stage, branch) tasks execute.

- `threads` (default): Prefect's ThreadPoolTaskRunner in this process; on Ctrl-C or SIGTERM it
  cancels the model requests in flight, so the run stops within seconds (`StoppingThreadPool`).
- `dask`: prefect-dask's DaskTaskRunner; a local cluster of worker processes, or an existing
  cluster by address (`tcp://scheduler:8786`). Install the `dask` extra.
- `ray`: prefect-ray's RayTaskRunner; a local Ray, or a cluster by address
  (`ray://head:10001`). Install the `ray` extra.
Workers need the workspace and the store on storage they all reach (a shared filesystem or an
object store URI) and PREFECT_API_URL pointing at the same Prefect server.

Under Dask and Ray the endpoints' `concurrency`, `rpm` and `tpm` hold for the whole run, not per
worker: the runner opens a `vlpref.limits.shared_limits()` scope around the cluster, so every
worker's providers take their slots from global concurrency limits on the run's Prefect server.
The scope and this process's Prefect API reach the workers by their environment: local Dask
workers inherit it (they never start a Prefect server of their own), a Dask cluster by address
gets a worker plugin, and every Ray task gets them in its `runtime_env`. The runner also reports
each finished stage to this process's progress listeners (the console board), since a stage task
in a worker process tells only that process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
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
        ray_class = _scale_out_ray_runner(RayTaskRunner)
        if address:
            return ray_class(address=address)
        # A local Ray runs one task per CPU it is given: `workers` tasks at once.
        return ray_class(init_kwargs={"num_cpus": workers}) if workers else ray_class()
    raise ConfigError(f"unknown task runner {name!r} (one of {', '.join(RUNNERS)})")


def _api_url_for_workers() -> str | None:
    """The Prefect API this process talks to: the configured one, or the temporary server
    Prefect started for it (a flow called from Python without PREFECT_API_URL). Local workers
    get it in their environment; without it each would start a temporary server of its own."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if url:
        return str(url)
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
    task told the worker's, where nobody listens)."""
    try:
        # The finished Dask future holds the task's final state: no call to the Prefect API
        # (its `state` property would ask the API from this callback's thread). A failed
        # task's value is its exception, without counts. (A timeout of 0 always times out in
        # distributed's sync, even for a finished future.)
        value = future.result(timeout=10, raise_on_failure=False)
    except Exception:  # the display is a nicety: never let it break the run
        return
    _notify_counts(stage, branch_id, value)


def _notify_counts(stage: str, branch_id: str, value: Any) -> None:
    """Tell this process's progress listeners a finished stage task's counts (a failed task's
    value is its exception, without counts: failures show in the run summary)."""
    from flows import progress

    counts = getattr(value, "counts", None)
    if isinstance(counts, dict):
        progress.notify(stage, branch_id, counts)


def _reason(exc: BaseException) -> str:
    """An exception's message on one line, cut to a length an `error:` line can carry."""
    return " ".join(str(exc).split())[:300]


class _ScaleOut:
    """What the Dask and Ray runners add to prefect-dask's and prefect-ray's (module docstring):
    the run's limits scope and Prefect API for every worker, each finished stage told to this
    process's progress listeners, and a cluster reached at the first task rather than on entry.

    Prefect enters the task runner before the flow function runs and outside its error
    handling: a cluster that cannot be reached there (a wrong address, Ray's token
    authentication) raises out of the engine and leaves the flow run "Running" in the UI
    forever. Reached from the first `submit`, inside the flow function, the same error fails
    the flow run with its message. A mixin placed before the runner's class."""

    _vlpref_stack: contextlib.ExitStack | None = None  # open from __enter__ to __exit__
    _vlpref_variables: dict[str, str]  # what every worker needs in its environment (set on entry)
    _vlpref_connected = False
    _started: bool

    def __enter__(self) -> Any:
        if self._started:  # as Prefect's TaskRunner.__enter__, which `_connect` calls later
            raise RuntimeError("This task runner is already started")
        self._vlpref_stack, self._vlpref_variables = self._open_scale_out()
        self._vlpref_connected = False
        self._vlpref_lock = threading.Lock()
        self._started = True  # submit accepts tasks; the cluster is reached at the first
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if not self._vlpref_connected:
            self._started = False
        self._close_scale_out(*exc_info)

    def _connect(self) -> None:
        """Start or reach the cluster: the runner's own `__enter__`, once, at the first task."""
        with self._vlpref_lock:
            if self._vlpref_connected:
                return
            stack = self._vlpref_stack
            assert stack is not None, "the task runner is not entered"
            self._started = False  # the runner's __enter__ checks it was not started yet
            try:
                super().__enter__()  # type: ignore[misc]
            except BaseException as exc:
                self._started = True
                raise self._connection_error(exc) from None
            self._vlpref_connected = True
            stack.push(lambda *exc: super(_ScaleOut, self).__exit__(*exc))  # type: ignore[misc]
            try:
                self._after_connect()
            except BaseException as exc:
                raise self._connection_error(exc) from None

    def _connection_error(self, exc: BaseException) -> BaseException:
        """The error to raise when the cluster cannot be reached (default: Ray's or Dask's)."""
        return exc

    def _after_connect(self) -> None:
        """What the runner does once its cluster is there."""

    def _open_scale_out(self) -> tuple[contextlib.ExitStack, dict[str, str]]:
        """Enter the run's limits scope and, for local workers spawned from here, this process's
        Prefect API. Returns the stack to close after the cluster, and the variables every
        worker needs (for workers this process does not spawn)."""
        from vlpref.prefect_server import api_url_in_environment

        stack = contextlib.ExitStack()
        try:
            scope = stack.enter_context(limits.shared_limits())
            variables = {limits.LIMITS_ENV: scope}
            url = _api_url_for_workers()
            if url is not None:  # set while local workers are spawned (and respawned)
                stack.enter_context(api_url_in_environment(url))
                variables["PREFECT_API_URL"] = url
        except BaseException:
            stack.close()
            raise
        return stack, variables

    def _close_scale_out(self, *exc_info: Any) -> None:
        stack, self._vlpref_stack = self._vlpref_stack, None
        if stack is not None:
            stack.__exit__(*exc_info)  # the cluster first (pushed last), the run's limits last


def _scale_out_dask_runner(base: type[Any]) -> type[Any]:
    """`DaskTaskRunner` with run-wide limits, a shared Prefect API and progress (module
    docstring). Built on first use: prefect-dask is an optional extra."""
    global _DASK_RUNNER
    if _DASK_RUNNER is not None:
        return _DASK_RUNNER

    from distributed import WorkerPlugin

    class SetEnvironment(WorkerPlugin):
        """Sets environment variables in every worker, including workers that join later: how
        a cluster started elsewhere (`--address`) learns the run's limits scope. Local workers
        inherit the variables anyway."""

        name = "vlpref-environment"

        def __init__(self, variables: dict[str, str]) -> None:
            self.variables = variables

        def setup(self, worker: Any) -> None:
            os.environ.update(self.variables)

    class ScaleOutDaskRunner(_ScaleOut, base):  # type: ignore[misc]
        def _after_connect(self) -> None:
            # prefect-dask starts or reaches the cluster when its `client` is first read; the
            # plugin then gives every worker the run's scope, those of a cluster started
            # elsewhere (which inherit nothing from this process) and those that join later.
            scope = self._vlpref_variables[limits.LIMITS_ENV]
            self.client.register_plugin(SetEnvironment({limits.LIMITS_ENV: scope}))

        def _connection_error(self, exc: BaseException) -> BaseException:
            if self.address and isinstance(exc, (OSError, TimeoutError)):
                return ConfigError(
                    f"could not connect to the Dask scheduler at {self.address} "
                    f"({_reason(exc)}): "
                    "check the address and that the scheduler runs (`dask scheduler`)"
                )
            return exc

        def submit(self, task: Any, parameters: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            self._connect()
            future = super().submit(task, parameters, *args, **kwargs)
            stage = _stage_of(parameters)
            if stage is not None:
                future.add_done_callback(lambda f: _tell_progress(*stage, f))
            return future

    ScaleOutDaskRunner.__qualname__ = ScaleOutDaskRunner.__name__
    _DASK_RUNNER = ScaleOutDaskRunner
    return ScaleOutDaskRunner


_DASK_RUNNER: type[Any] | None = None


def _scale_out_ray_runner(base: type[Any]) -> type[Any]:
    """`RayTaskRunner` with run-wide limits, a shared Prefect API and progress (module
    docstring). The variables reach every task through Ray's `runtime_env` (each task's, merged
    with any `remote_options` in force): a cluster started elsewhere, a local Ray and a Ray
    already initialised in this process all get them. Built on first use: prefect-ray is an
    optional extra."""
    global _RAY_RUNNER
    if _RAY_RUNNER is not None:
        return _RAY_RUNNER
    from prefect_ray.context import RemoteOptionsContext, remote_options
    from ray.exceptions import RayError

    class ScaleOutRayRunner(_ScaleOut, base):  # type: ignore[misc]
        def _connection_error(self, exc: BaseException) -> BaseException:
            if self.address and isinstance(exc, (ConnectionError, RayError)):
                return ConfigError(_ray_connection_error(self.address, exc))
            return exc

        def submit(self, task: Any, parameters: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            self._connect()
            current = RemoteOptionsContext.get().current_remote_options
            runtime_env = dict(current.get("runtime_env") or {})
            runtime_env["env_vars"] = {
                **(runtime_env.get("env_vars") or {}),
                **self._vlpref_variables,
            }
            with remote_options(runtime_env=runtime_env):
                future = super().submit(task, parameters, *args, **kwargs)
            stage = _stage_of(parameters)
            if stage is not None:
                # The object's own completion callback, with the task's final state as its
                # value: prefect-ray's `add_done_callback` would make the callback fetch it again.
                future.wrapped_future._on_completed(
                    lambda state: _tell_progress_of_state(*stage, state)
                )
            return future

    ScaleOutRayRunner.__qualname__ = ScaleOutRayRunner.__name__
    _RAY_RUNNER = ScaleOutRayRunner
    return ScaleOutRayRunner


def _ray_connection_error(address: str, exc: BaseException) -> str:
    """What to do when `ray.init(address)` fails: Ray says only "Failed to connect" after ~20 s
    of retries, and the usual cause since Ray 2.59 is its token authentication (on by default
    for clusters started with `ray start`, off in a client that does not set it)."""
    mode = os.environ.get("RAY_AUTH_MODE")
    hint = (
        "the cluster's token is not accepted: give this host the cluster's token "
        "(~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)"
        if mode == "token"
        else "if the cluster uses token authentication (Ray's default since 2.59), set "
        f"RAY_AUTH_MODE=token (now {'unset' if mode is None else repr(mode)}) and give this "
        "host the cluster's token (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)"
    )
    return (
        f"could not connect to the Ray cluster at {address} ({_reason(exc)}): check the address; "
        f"{hint}; see docs/cluster.md, section 5"
    )


def _tell_progress_of_state(stage: str, branch_id: str, state: Any) -> None:
    """A Ray task finished: its value is the task's final Prefect state (or the exception that
    crashed it). Tell this process's listeners the stage's counts, as `_tell_progress` does."""
    try:
        value = state.result(raise_on_failure=False)
    except Exception:  # the display is a nicety: never let it break the run
        return
    if asyncio.iscoroutine(value):  # only from an event loop, which Ray's callbacks are not
        value.close()
        return
    _notify_counts(stage, branch_id, value)


_RAY_RUNNER: type[Any] | None = None
