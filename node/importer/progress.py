"""How an import shows its progress: a bar with the rate and the time left on a terminal
(rich), plain lines every few seconds otherwise (a log, a pipe, CI)."""

from __future__ import annotations

import sys
import time
from typing import IO, Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

PLAIN_EVERY_S = 2.0


class Reporter(Protocol):
    def start(self, total: int, done: int) -> None: ...

    def advance(self, rows: int) -> None: ...

    def stop(self) -> None: ...


class _Rate(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- docs/s" if speed is None else f"{speed:,.0f} docs/s")


class BarReporter:
    def __init__(self, out: IO[str]) -> None:
        self.console = Console(file=out, force_terminal=True, highlight=False)
        self.bar = Progress(
            TextColumn("importing"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.percentage:>3.0f}%"), _Rate(), TextColumn("left"),
            TimeRemainingColumn(), TextColumn("elapsed"), TimeElapsedColumn(),
            console=self.console, refresh_per_second=8,
        )
        self.task = self.bar.add_task("import", total=0, start=False)

    def start(self, total: int, done: int) -> None:
        self.bar.update(self.task, total=total, completed=done)
        self.bar.start_task(self.task)
        self.bar.start()

    def advance(self, rows: int) -> None:
        self.bar.advance(self.task, rows)

    def stop(self) -> None:
        self.bar.stop()


class LineReporter:
    """One line every PLAIN_EVERY_S seconds and a last one at the end."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.total = self.done = self.first = 0
        self.t0 = self.last = 0.0

    def start(self, total: int, done: int) -> None:
        self.total, self.done, self.first = total, done, done
        self.t0 = self.last = time.monotonic()

    def advance(self, rows: int) -> None:
        self.done += rows
        now = time.monotonic()
        if now - self.last >= PLAIN_EVERY_S:
            self.last = now
            self._line(now)

    def stop(self) -> None:
        self._line(time.monotonic())

    def _line(self, now: float) -> None:
        rate = (self.done - self.first) / max(now - self.t0, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100 * self.done / self.total if self.total else 100.0
        eta = "?" if left == float("inf") else f"{left:,.0f} s"
        print(f"imported {self.done:,}/{self.total:,} rows ({pct:.0f}%), {rate:,.0f} docs/s, "
              f"{eta} left", file=self.out, flush=True)


class NoReporter:
    def start(self, total: int, done: int) -> None:
        pass

    def advance(self, rows: int) -> None:
        pass

    def stop(self) -> None:
        pass


def reporter(mode: str, out: IO[str] = sys.stderr) -> Reporter:
    """`auto`: a bar on a terminal, lines otherwise; or `bar`, `lines`, `none`."""
    if mode == "auto":
        mode = "bar" if out.isatty() else "lines"
    if mode == "bar":
        return BarReporter(out)
    if mode == "lines":
        return LineReporter(out)
    return NoReporter()
