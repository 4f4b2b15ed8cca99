"""Where the log lines of a `vlpref run` go: a file in the workspace, and the console only with
`-v`.

Prefect configures logging when it is imported (`prefect/logging/logging.yml`, or the file that
`PREFECT_LOGGING_SETTINGS_PATH` names): the root logger gets a `PrefectConsoleHandler` on stderr,
and the flow and task run loggers (`prefect.flow_runs`, `prefect.task_runs`) send to Prefect's API
(the UI) and propagate to the root, so every INFO line of every task prints on the console,
through the progress display. `route_logs` leaves the API handlers alone (the UI keeps every
line) and, for the run, adds a file handler to the root logger and takes Prefect's console
handlers off it; with `verbose`, their lines go to the CLI's rich console instead, which prints
them above the live display rather than through it.

Keys: `install_log_redaction` redacts every record as it is created, before any handler sees it,
so the file gets what the API and the console get, redacted (tests/test_run_log.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.text import Text

from vlpref.redact import install_log_redaction

LOG_DIR = "logs"
# Prefect's `standard` format (logging.yml) with the date: a log file outlives the day.
FORMAT = "%(asctime)s.%(msecs)03d | %(levelname)-7s | %(name)s - %(message)s"
FLOW_RUN_FORMAT = (
    "%(asctime)s.%(msecs)03d | %(levelname)-7s | Flow run %(flow_run_name)r - %(message)s"
)
TASK_RUN_FORMAT = (
    "%(asctime)s.%(msecs)03d | %(levelname)-7s | Task run %(task_run_name)r - %(message)s"
)
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def log_file_path(workspace: str | Path, now: datetime | None = None) -> Path:
    """`<workspace>/logs/run-<UTC stamp>.log`, e.g. `ws/logs/run-20250101T120000Z.log`. An
    object-store workspace (`s3://...`) has no local folder: its logs go to `./logs`."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    root = Path(workspace) if "://" not in str(workspace) else Path.cwd()
    path = root / LOG_DIR / f"run-{stamp}.log"
    n = 1
    while path.exists():  # two runs in one second (tests) get a file each
        n += 1
        path = root / LOG_DIR / f"run-{stamp}-{n}.log"
    return path


def _formatter() -> logging.Formatter:
    try:
        from prefect.logging.formatters import PrefectFormatter
    except ImportError:  # pragma: no cover - Prefect is a dependency; keep the file plain then
        return logging.Formatter(FORMAT, DATE_FORMAT)
    return PrefectFormatter(
        FORMAT, DATE_FORMAT, flow_run_fmt=FLOW_RUN_FORMAT, task_run_fmt=TASK_RUN_FORMAT
    )


class RichConsoleHandler(logging.Handler):
    """Log lines printed by a rich console: above its live display, not through it."""

    def __init__(self, console: Console, formatter: logging.Formatter) -> None:
        super().__init__()
        self.console = console
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.print(Text(self.format(record)), soft_wrap=True, highlight=False)
        except Exception:  # a log line must never break the run
            self.handleError(record)


def _is_console_handler(handler: logging.Handler) -> bool:
    try:
        from prefect.logging.handlers import PrefectConsoleHandler
    except ImportError:  # pragma: no cover
        return False
    return isinstance(handler, PrefectConsoleHandler)


def _prefect_logging_configured() -> None:
    try:
        from prefect.logging.configuration import ensure_logging_setup
    except ImportError:  # pragma: no cover - Prefect is a dependency
        return
    ensure_logging_setup()


@contextmanager
def route_logs(path: Path, *, verbose: bool, console: Console) -> Iterator[Path]:
    """For the `with` block: every log record that reaches the root logger goes to `path`
    (created with its folder); Prefect's console handlers are off the root logger, and with
    `verbose` the same lines print on `console`. Everything is put back on exit."""
    install_log_redaction()  # before the first record: the file never holds a key
    _prefect_logging_configured()  # else Prefect would add its console handler after ours
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(_formatter())
    removed = [h for h in root.handlers if _is_console_handler(h)]
    for handler in removed:
        root.removeHandler(handler)
    root.addHandler(file_handler)
    shown: logging.Handler | None = None
    if verbose:
        shown = RichConsoleHandler(console, _formatter())
        root.addHandler(shown)
    # Prefect's run loggers are at INFO (PREFECT_LOGGING_LEVEL) and propagate to the root,
    # whose own level (WARNING) does not filter what propagates: the file gets their INFO lines.
    try:
        yield path
    finally:
        root.removeHandler(file_handler)
        if shown is not None:
            root.removeHandler(shown)
        for handler in removed:
            root.addHandler(handler)
        file_handler.close()
