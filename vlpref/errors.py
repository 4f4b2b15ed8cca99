"""One exception tree for vlpref.

    VlprefError
    ├── ConfigError          a run config, taxonomy or prompt file is invalid (file + field)
    ├── DataError            input data is unusable (an image that fails to decode, a bad row)
    │   └── JudgeParseError  a judge's output does not follow the verdict protocol
    ├── JournalError         the request journal cannot be read or written
    ├── StoreError           the store refuses an operation (a version exists, a lock is held)
    ├── NothingToPublish     every branch ran, and none produced a pair
    │                        or holds a damaged file (the message names it)
    ├── BuildError           branches of a build failed (each branch with its first cause)
    └── ProviderError        a model provider cannot be built or used at all
        └── ProviderNotFound no built-in or plug-in provider has the requested kind

Request-level failures (a 429 that outlived its retries, a timeout, a malformed body) are *not*
exceptions: the model seam returns them as `Failure` values inside the batch result, so one bad
request never takes a batch down with it.

The command line prints any of these as one `error: ...` line and exits with code 2.
"""

from __future__ import annotations


class VlprefError(Exception):
    """Base class of every error vlpref raises on purpose."""


class ConfigError(VlprefError):
    """A configuration, taxonomy or prompt file is invalid.

    The message names the file and the field (or line) and says what was expected.
    """

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None) -> None:
        self.file = file
        self.field = field
        where = ""
        if file and field:
            where = f"{file}: {field}: "
        elif file:
            where = f"{file}: "
        elif field:
            where = f"{field}: "
        super().__init__(f"{where}{message}")


class DataError(VlprefError):
    """Input data is unusable."""


class JudgeParseError(DataError):
    """A judge's output does not follow the verdict protocol; no score is made up for it.

    The message says what was expected and quotes the start of what came back.
    """


class JournalError(VlprefError):
    """The request journal cannot be read or written."""


class StoreError(VlprefError):
    """The dataset store refuses an operation."""


class BuildError(VlprefError):
    """Branches of a build failed: the flow ran the others, then published nothing.

    `failures` holds one `"<branch>: <cause>"` per failed branch. The message names every branch;
    the first `SHOWN` with the first line of their cause, cut to `CAUSE_CHARS` characters (the
    full causes are in the Prefect task logs and the run summary). It also names the workspace the
    branches work in: a cause such as a full disk names no file.
    """

    CAUSE_CHARS = 300
    SHOWN = 8

    def __init__(self, failures: list[str], *, workspace: str | None = None) -> None:
        self.failures = list(failures)
        self.workspace = workspace
        shown = []
        for failure in self.failures[: self.SHOWN]:
            lines = failure.strip().splitlines()
            first = lines[0] if lines else "unknown cause"
            if len(first) > self.CAUSE_CHARS:
                first = first[: self.CAUSE_CHARS - 3].rstrip() + "..."
            shown.append(first)
        rest = [failure.split(":", 1)[0] for failure in self.failures[self.SHOWN :]]
        if rest:
            shown.append(f"and {len(rest)} more: {', '.join(rest)}")
        where = f" (workspace {workspace})" if workspace else ""
        super().__init__(
            f"{len(self.failures)} branch(es) failed{where}, nothing published: " + "; ".join(shown)
        )


class ProviderError(VlprefError):
    """A model provider cannot be built or used."""


class ProviderNotFound(ProviderError):
    """No built-in or plug-in provider is registered under the requested kind."""


class NothingToPublish(VlprefError):
    """Every branch ran and none produced a pair, so there is no version to write; the run
    summary printed before this error says which stage lost the rows and why."""
