"""vlpref: build safety preference datasets for vision-language models."""

from vlpref.heap import prefer_system_arrow_pool
from vlpref.offline import apply_offline_defaults

apply_offline_defaults()  # before anything imports Prefect
prefer_system_arrow_pool()  # before anything imports pyarrow (see vlpref/heap.py)

from vlpref.chat import (  # noqa: E402
    ChatRequest,
    ChatResult,
    Failure,
    ImagePart,
    Message,
    Sample,
    SamplingParams,
    TextPart,
    TokenLogprob,
    Usage,
)
from vlpref.config import RunConfig, load_config  # noqa: E402
from vlpref.errors import (  # noqa: E402
    ConfigError,
    DataError,
    JournalError,
    ProviderError,
    ProviderNotFound,
    StoreError,
    VlprefError,
)
from vlpref.journal import Journal  # noqa: E402
from vlpref.providers import Provider, create_provider  # noqa: E402
from vlpref.runner import BatchStats, run_all, run_requests  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BatchStats",
    "ChatRequest",
    "ChatResult",
    "ConfigError",
    "DataError",
    "Failure",
    "ImagePart",
    "Journal",
    "JournalError",
    "Message",
    "Provider",
    "ProviderError",
    "ProviderNotFound",
    "RunConfig",
    "Sample",
    "SamplingParams",
    "StoreError",
    "TextPart",
    "TokenLogprob",
    "Usage",
    "VlprefError",
    "__version__",
    "create_provider",
    "load_config",
    "run_all",
    "run_requests",
]
