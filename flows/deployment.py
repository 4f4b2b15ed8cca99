"""The flow prefect.yaml's deployments run: `build_dataset` on the task runner its parameters name.

A flow's task runner is fixed when the flow object is made, and a worker loads the deployment's
flow from its entrypoint: a parameter cannot choose it for the flow itself. So this flow, named
`build-dataset` like the one it runs (the deployments stay `build-dataset/nightly` and
`build-dataset/branch-rerun`), takes `runner`, `runner_address` and `workers` and

- with the default (`threads`, no `workers`) runs the build in its own flow run, on its own
  thread pool: one flow run, as `vlpref run` makes;
- otherwise runs `build_dataset` as a subflow on `flows.runners.task_runner(...)`: a local Dask
  or Ray cluster on the worker's host, or an existing cluster by address, so that one build
  spreads over several hosts, not only whole runs over a work pool's workers.

It also refuses an empty `only` at once, in one line that says what to give (the branch-rerun
deployment's default, which a quick run from the UI uses).
"""

from __future__ import annotations

from typing import Literal

from prefect import flow

from flows.build import build_dataset
from flows.runners import task_runner
from vlpref.errors import ConfigError

Runner = Literal["threads", "dask", "ray"]


def _top_level_branches(config: str) -> str:
    """`; top-level branches: A, B` from the config's taxonomy, or '' where it cannot be read
    (the build would say why)."""
    from vlpref.config import load_config
    from vlpref.taxonomy import load_taxonomy

    try:
        names = [d.name for d in load_taxonomy(load_config(config).taxonomy).domains]
    except Exception:  # the message is help, not the error: the build names the real one
        return ""
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return f"; top-level branches: {shown}" if names else ""


def refuse_empty_only(config: str, only: list[str] | None) -> None:
    """An empty `only` names no branch: a failed run whose message says what to pass."""
    if only is None or only:
        return
    raise ConfigError(
        "this deployment rebuilds the branches named in `only`, and none is given: run it with "
        'only=["<taxonomy path prefix>"] (the UI\'s custom run, or prefect deployment run '
        "build-dataset/branch-rerun -p 'only=[\"Malicious Use\"]'); the nightly deployment "
        f"rebuilds every branch{_top_level_branches(config)}"
    )


@flow(name="build-dataset", log_prints=True, task_runner=task_runner("threads"))
def deployed_build(
    config: str,
    only: list[str] | None = None,
    retry_failed: str | None = None,
    plan: bool = False,
    runner: Runner = "threads",
    runner_address: str | None = None,
    workers: int | None = None,
) -> str:
    """Build one dataset version (`flows.build.build_dataset`: `config` is a path or a URI on
    shared storage, `only`, `retry_failed`, `plan`) on the task runner `runner`: `threads` in
    this process, `dask` or `ray` on a local cluster of `workers` processes or the cluster at
    `runner_address` (tcp://scheduler:8786, ray://head:10001). Returns the version's id."""
    refuse_empty_only(config, only)
    if runner_address and runner == "threads":
        raise ConfigError(f"runner_address {runner_address!r} needs runner dask or ray")
    if runner == "threads" and workers is None:
        # This flow run's own pool: no subflow in the way of the run's tasks in the UI.
        return build_dataset.fn(config, only, retry_failed, plan)
    chosen = task_runner(runner, workers=workers, address=runner_address)
    return build_dataset.with_options(task_runner=chosen)(config, only, retry_failed, plan)
