"""One exception tree for vlpref.

    VlprefError
    ├── ConfigError          a run config, taxonomy or prompt file is invalid (file + field)
    ├── DataError            input data is unusable (an image that fails to decode, a bad row)
    │   └── JudgeParseError  a judge's output does not follow the verdict protocol
    ├── JournalError         the request journal cannot be read or written
    ├── StoreError           the store refuses an operation (a version exists, a lock is held)
    └── ProviderError        a model provider cannot be built or used at all
        └── ProviderNotFound no built-in or plug-in provider has the requested kind

Request-level failures (a 429 that outlived its retries, a timeout, a malformed body) are *not*
exceptions: the model seam returns them as `Failure` values inside the batch result, so one bad
request never takes a batch down with it.
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


class ProviderError(VlprefError):
    """A model provider cannot be built or used."""


class ProviderNotFound(ProviderError):
    """No built-in or plug-in provider is registered under the requested kind."""
