"""Which failures a rerun asks for again: the `--retry-failed` policy, per failure kind.

A stage output that holds failures is not final. On a rerun, an output whose failures include
kinds the policy retries is computed again: the request journal answers everything that succeeded,
so only the failed requests are sent, and the stages after it are recomputed from the healed rows.

    transient  (default) retry what a rerun can heal: the endpoint was overloaded, down, slow,
               refused the key (a fixed key heals it), or the stage stopped early
    all        retry every failure, also those that cannot heal by retrying the same request
    none       reuse every finished stage output as it is

The table is by kind, not by stage, so a new failure kind must be added here: an unknown kind is
treated as permanent (retried only by `all`), which errs on the side of not paying again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal, get_args

RetryPolicy = Literal["transient", "all", "none"]
RETRY_POLICIES: Final = get_args(RetryPolicy)

# Failures a rerun can heal: the same request may well succeed next time.
TRANSIENT_KINDS: Final = frozenset(
    {
        "rate_limit",  # 429 that outlived the provider's retries
        "server_error",  # 5xx that outlived them
        "timeout",  # no answer in time, every attempt
        "connection",  # could not connect / dropped, every attempt
        "network",  # an image download's connection error
        "malformed",  # a body that was not a chat completion, every attempt
        "auth",  # 401/403: heals once the key is fixed (keys never enter request keys)
        "stopped",  # not sent: the stage stopped asking a model after a streak of failures
        "missing",  # the endpoint returned no sample, or a local file was not there yet
        "filter_error",  # an image filter raised: heals once the plug-in is fixed
        "other",
    }
)

# Failures that retrying the same request cannot heal: a rerun re-asks them only with `all`.
PERMANENT_KINDS: Final = frozenset(
    {
        "bad_request",  # 400/404/422: the same body gets the same answer
        "engine",  # an in-process engine refused the request (e.g. over max_model_len)
        "unparseable",  # the answers are journaled: re-asking returns the same text
        "no_pair",  # a selection outcome of the pairs stage, not a request
        "duplicate",  # an image already in the branch
        "near_duplicate",  # within stages.images.near_duplicate_distance of one kept before it
        # An image filter's rejection (filter_<name>; plug-ins' kinds are unknown, so permanent
        # too): the same image gets the same score.
        "filter_min_size",
        "filter_aspect",
        "filter_near_blank",
        "filter_text_coverage",
        "filter_nsfw",
        "http",  # an image URL answered 4xx
        "content_type",
        "too_large",
        "too_small",
        "empty",
        "blank",
        "bomb",
        "corrupt",
        "truncated",
        "unsupported",
        "unreadable",
        "manifest_row",
        "outside_root",  # a local path that resolves outside the image root
        "not_regular",  # a device, FIFO or socket
        "refused_host",  # a URL to a private/loopback/link-local address (allow_private/hosts)
        "content_encoding",  # a download in an encoding vlpref does not inflate
    }
)


def is_transient(kind: str) -> bool:
    return kind in TRANSIENT_KINDS


def retried(kind: str, policy: RetryPolicy) -> bool:
    """Whether a failure of `kind` is asked for again under `policy`."""
    if policy == "all":
        return True
    if policy == "none":
        return False
    return is_transient(kind)


def retryable_count(failed_by_kind: Mapping[str, int], policy: RetryPolicy) -> int:
    """How many of an output's failures the policy asks for again."""
    return sum(n for kind, n in failed_by_kind.items() if retried(kind, policy))


def check_policy(value: str) -> RetryPolicy:
    if value not in RETRY_POLICIES:
        from vlpref.errors import ConfigError

        raise ConfigError(
            f"retry_failed: expected one of {', '.join(RETRY_POLICIES)}, got {value!r}"
        )
    return value  # type: ignore[return-value]
