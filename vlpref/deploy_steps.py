"""The build step of prefect.yaml: what `prefect deploy` checks and records before it registers
a deployment for workers on other hosts (docs/cluster.md, "Deployments").

    build:
      - vlpref.deploy_steps.check_deployment:
          id: vlpref-code
          config: "{{ $VLPREF_CONFIG }}"

It fails the deploy, before any deployment is created or updated, when the run config is missing
or unreadable: an unset or empty VLPREF_CONFIG would otherwise deploy `config: ''` and fail at
the first scheduled run. It returns the code to run: the git repository workers clone and the
commit, which the `pull:` step's `git_clone` reads (`{{ vlpref-code.commit }}`), so that every
worker runs the commit that was deployed, not whatever its branch holds later.

Prefect calls it with the step's inputs templated (`{{ $NAME }}` from the environment, an unset
variable as ''), in the folder `prefect deploy` runs in. A step that raises makes `prefect deploy`
exit 1 and print the cause; the message is printed first as one `error:` line, so it is the
first thing read above Prefect's traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vlpref.config_lookup import ENV as CONFIG_ENV

# Override what the step finds in the checkout: the URL workers clone (`git remote get-url
# origin` by default) and the ref to deploy (HEAD by default; a branch or tag is pinned to its
# commit at deploy time).
REPOSITORY_ENV = "VLPREF_GIT_REPOSITORY"
REF_ENV = "VLPREF_GIT_REF"


class DeployCheckError(ValueError):
    """The deployment would not run where it is sent."""


def _fail(message: str) -> DeployCheckError:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return DeployCheckError(message)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _git(*args: str, cwd: Path | None = None) -> str | None:
    """git's output, stripped; None where git fails (no repository, no remote, no such ref)."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def check_config(config: str) -> str:
    """The config location as deployed; raises unless it names a config that loads here."""
    from vlpref.config import load_config
    from vlpref.errors import ConfigError

    location = config.strip()
    if not location:
        raise _fail(
            f"{CONFIG_ENV} is not set: set it to the run config the deployments build from, a "
            f"path in this repository or a URI on shared storage, e.g. "
            f"{CONFIG_ENV}=runs/nightly.yaml or s3://team/vlpref/nightly.yaml, and deploy again"
        )
    try:
        load_config(location)
    except ConfigError as exc:
        raise _fail(f"{CONFIG_ENV}={location}: {exc}") from exc
    if "://" in location:
        return location
    path = Path(location)
    if path.is_absolute():
        _warn(
            f"{CONFIG_ENV}={location} is a local path: every worker host must have this file "
            "(a shared filesystem); a URI on shared storage or a path in the repository avoids it"
        )
        return location
    # A relative path is read in the worker's clone of the repository: it must be committed.
    if _git("ls-files", "--error-unmatch", "--", location) is None:
        raise _fail(
            f"{CONFIG_ENV}={location} is not committed: workers read a relative config from "
            "their clone of the repository; commit it, or give an absolute path or a URI"
        )
    if _git("diff", "--quiet", "HEAD", "--", location) is None:
        _warn(f"{location} has uncommitted changes: workers read the committed version")
    return location


def code_to_run() -> dict[str, str]:
    """The repository workers clone and the commit they check out."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None:
        raise _fail(
            "prefect deploy runs in a git checkout of vlpref: workers clone the deployed commit "
            "(or serve the deployments from one host with `vlpref serve`)"
        )
    ref = os.environ.get(REF_ENV) or "HEAD"
    commit = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
    if commit is None:
        raise _fail(f"{REF_ENV}={ref} names no commit of {top}")
    repository = os.environ.get(REPOSITORY_ENV) or _git("remote", "get-url", "origin")
    if not repository:
        repository = top
        _warn(
            f"no git remote: workers clone {top}, so they must run on this host; set "
            f"{REPOSITORY_ENV} to a URL the workers reach"
        )
    elif not _git("branch", "-r", "--contains", commit):
        _warn(f"commit {commit[:12]} is on no remote branch: push it before a worker clones it")
    if ref == "HEAD" and _git("status", "--porcelain", "--untracked-files=no"):
        _warn(f"uncommitted changes are not deployed: workers run commit {commit[:12]}")
    return {"repository": repository, "commit": commit}


def check_deployment(config: str) -> dict[str, str]:
    """prefect.yaml's build step: the config checked, and the code to run (module docstring)."""
    deployed = check_config(config)
    code = code_to_run()
    print(f"vlpref: config {deployed}; workers clone {code['repository']} at {code['commit']}")
    return {"config": deployed, **code}
