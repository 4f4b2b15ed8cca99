"""The live per-stage board `vlpref run` shows while a run works (docs/pipeline.md, "The
console"):

    stage      branches                 sent  journal  failed  req/s     ETA
    images     ━━━━━━━━━━━━  4/4                                        done
    questions  ━━━━━━──────  2/4          40        0       0   21.3    0:02
    responses  ━━━━━━━━━━━━  3/4 1✗      120        0      37   80.1  failed

Per stage: the branches finished (a bar and n/N, with the branches where the stage failed: it
raised, every row of it failed, or an earlier stage of the branch failed so it never ran), and
the model results as they arrive: sent, answered from the journal, failed (growing while it
happens), the rate of sent requests, and an ETA.

The ETA is (requests still to send) / (sent per second). What is still to send comes from the
plan when `vlpref run --plan` worked one out, else from the branches already done: the mean of
what a branch that ran sent, for each branch not done yet, less what it already sent. With
neither (no branch done yet, a stage that sends nothing, nothing sent yet) there is no basis and
the ETA is `–`, not a guess.

Counts arrive from many task threads (`flows/progress.py`); the board keeps them under a lock and
renders a snapshot. The renderable is plain rich: `Console(width=80)` renders it in 80 columns.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

# The board is never wider than this in a wide terminal: the bar alone would grow.
MAX_WIDTH = 100
NO_BASIS = "–"


@dataclass
class _Stage:
    requesting: bool  # the stage makes model requests (flows/stages.py: journaled)
    sent: int = 0
    cached: int = 0
    failed: int = 0
    started: float | None = None  # when its first branch started
    first_sent: float | None = None
    last_sent: float | None = None
    status: dict[str, str] = field(default_factory=dict)  # branch -> done | failed
    sent_by_branch: dict[str, int] = field(default_factory=dict)
    results_by_branch: dict[str, int] = field(default_factory=dict)
    planned: int | None = None  # requests to send, from the plan
    bound: int = 0  # what the plan could not count exactly, at most


@dataclass(frozen=True)
class StageView:
    """What one row shows; `eta_s` None: no basis for an ETA."""

    stage: str
    total: int
    done: int
    failed_branches: int
    requesting: bool
    sent: int
    cached: int
    failed: int
    rate: float | None
    eta_s: float | None

    @property
    def finished(self) -> bool:
        return self.done + self.failed_branches >= self.total


class StageBoard:
    """Per-stage live counters, fed by progress events, rendered by rich."""

    def __init__(
        self,
        stages: Sequence[str],
        branches: int,
        *,
        requesting: Sequence[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.order = list(stages)
        self.branches = branches
        self.clock = clock
        self._lock = threading.Lock()
        self._stages = {s: _Stage(requesting=s in requesting) for s in self.order}
        self._failed_at: dict[str, int] = {}  # branch -> index of the first stage that failed
        self._finished_at: dict[str, float] = {}

    # --- events (any thread) ------------------------------------------------------------------

    def on_start(self, stage: str, branch: str) -> None:
        s = self._stages.get(stage)
        if s is None:
            return
        with self._lock:
            if s.started is None:
                s.started = self.clock()

    def on_request(self, stage: str, branch: str, cached: bool, failed: bool, sent: bool) -> None:
        s = self._stages.get(stage)
        if s is None:
            return
        with self._lock:
            if sent:
                now = self.clock()
                s.sent += 1
                s.sent_by_branch[branch] = s.sent_by_branch.get(branch, 0) + 1
                if s.first_sent is None:
                    s.first_sent = now
                s.last_sent = now
            elif cached:
                s.cached += 1
            if failed:
                s.failed += 1
            s.results_by_branch[branch] = s.results_by_branch.get(branch, 0) + 1

    def on_done(self, stage: str, branch: str, counts: Mapping[str, Any]) -> list[str]:
        """A stage output for the branch (run or reused). Failed when it had rows in and none
        out (its later stages still run, on nothing). Returns the stages this event finished
        (every branch accounted for)."""
        n_in, n_out = int(counts.get("in") or 0), int(counts.get("out") or 0)
        return self._set(stage, branch, "failed" if n_in and not n_out else "done")

    def on_failed(self, stage: str, branch: str) -> list[str]:
        """The stage raised for the branch: its later stages will not run for it (unless
        Prefect's retry of the task then succeeds)."""
        return self._set(stage, branch, "failed", raised=True)

    def set_plan(self, by_stage: Mapping[str, Mapping[str, int]]) -> None:
        with self._lock:
            for stage, planned in by_stage.items():
                if stage in self._stages:
                    self._stages[stage].planned = int(planned.get("to_send") or 0)
                    self._stages[stage].bound = int(planned.get("bound") or 0)

    def _set(self, stage: str, branch: str, state: str, *, raised: bool = False) -> list[str]:
        if stage not in self._stages:
            return []
        with self._lock:
            before = {v.stage for v in self._views() if v.finished}
            self._stages[stage].status[branch] = state
            index = self.order.index(stage)
            if raised:
                self._failed_at[branch] = min(index, self._failed_at.get(branch, index))
            elif self._failed_at.get(branch) == index:  # a retry of the task succeeded
                del self._failed_at[branch]
            now = self.clock()
            newly = [v.stage for v in self._views() if v.finished and v.stage not in before]
            for name in newly:
                self._finished_at[name] = now
            return newly

    # --- views ---------------------------------------------------------------------------------

    def views(self) -> list[StageView]:
        with self._lock:
            return self._views()

    def elapsed(self, stage: str) -> float | None:
        """Seconds from the stage's first branch's start to its last branch's end, once it has
        finished (None before, or when no branch of it ever started)."""
        with self._lock:
            at, started = self._finished_at.get(stage), self._stages[stage].started
        return None if at is None or started is None else at - started

    def _views(self) -> list[StageView]:
        now = self.clock()
        out = []
        for index, name in enumerate(self.order):
            s = self._stages[name]
            done = sum(1 for state in s.status.values() if state == "done")
            failed = sum(1 for state in s.status.values() if state == "failed")
            # A branch that failed at an earlier stage never runs this one.
            failed += sum(
                1 for b, at in self._failed_at.items() if at < index and b not in s.status
            )
            rate = _rate(s, now, finished=done + failed >= self.branches)
            out.append(
                StageView(
                    stage=name,
                    total=self.branches,
                    done=done,
                    failed_branches=failed,
                    requesting=s.requesting,
                    sent=s.sent,
                    cached=s.cached,
                    failed=s.failed,
                    rate=rate,
                    eta_s=self._eta(s, rate, done + failed),
                )
            )
        return out

    def _eta(self, s: _Stage, rate: float | None, finished: int) -> float | None:
        if finished >= self.branches or not rate:
            return None
        left: float
        if s.planned is not None:
            left = s.planned - s.sent
            if left <= 0:  # past the exact count: the plan's bound is what may still come
                left = s.planned + s.bound - s.sent
        else:
            ran = [
                b for b, state in s.status.items() if state == "done" and b in s.results_by_branch
            ]
            if not ran:
                return None
            per_branch = sum(s.sent_by_branch.get(b, 0) for b in ran) / len(ran)
            open_branches = self.branches - finished
            started = [b for b in s.sent_by_branch if b not in s.status]
            left = per_branch * open_branches - sum(
                min(s.sent_by_branch[b], per_branch) for b in started
            )
        return left / rate if left > 0 else None

    # --- rendering -----------------------------------------------------------------------------

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield render(self.views(), min(options.max_width, MAX_WIDTH))


def _rate(s: _Stage, now: float, *, finished: bool) -> float | None:
    """Sent requests per second since the stage's first; None under half a second or two."""
    if s.first_sent is None or s.sent < 2:
        return None
    end = s.last_sent if finished and s.last_sent is not None else now
    span = end - s.first_sent
    return s.sent / span if span >= 0.5 else None


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return NO_BASIS
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def render(views: Sequence[StageView], width: int) -> Table:
    """The board as a table `width` columns wide at most (the bar takes what is left)."""
    table = Table(box=None, padding=(0, 1, 0, 0), width=width, expand=False, show_edge=False)
    table.add_column("stage", no_wrap=True, min_width=9)
    table.add_column("", no_wrap=True, ratio=1, min_width=4)  # the bar: what width is left
    table.add_column("branches", no_wrap=True, justify="left", min_width=3)
    for name in ("sent", "journal", "failed"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("req/s", justify="right", no_wrap=True)
    table.add_column("ETA", justify="right", no_wrap=True, min_width=5)
    for v in views:
        finished = v.finished
        bar = ProgressBar(
            total=max(v.total, 1),
            completed=v.done + v.failed_branches,
            complete_style="red" if v.failed_branches else "bar.complete",
            finished_style="red" if v.failed_branches else "bar.finished",
        )
        branches = Text(f"{v.done + v.failed_branches}/{v.total}")
        if v.failed_branches:
            branches.append(f" {v.failed_branches}✗", style="bold red")
        if v.requesting:
            numbers = [
                Text(str(v.sent)),
                Text(str(v.cached)),
                Text(str(v.failed), style="bold red" if v.failed else ""),
                Text(f"{v.rate:.1f}" if v.rate is not None else NO_BASIS),
            ]
        else:  # a stage without model requests: nothing to count here
            numbers = [Text(""), Text(""), Text(""), Text("")]
        if finished and v.done == 0:
            eta = Text("failed", style="bold red")
        elif finished:
            eta = Text("done", style="green")
        else:
            eta = Text(format_eta(v.eta_s))
        table.add_row(Text(v.stage), bar, branches, *numbers, eta)
    return table


def finished_line(view: StageView, elapsed_s: float | None) -> str:
    """The line a piped run prints when a stage has finished for every branch (no live board
    there): `questions: 4 of 4 branches done (3.2 s)`, `judge: 3 of 4 branches done, 1 failed`."""
    line = f"{view.stage}: {view.done} of {view.total} branches done"
    if view.failed_branches:
        line += f", {view.failed_branches} failed"
    if elapsed_s is not None:
        line += f" ({elapsed_s:.1f} s)"
    return line
