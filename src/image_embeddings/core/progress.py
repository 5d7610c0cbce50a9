"""Progress of a long Spark step, from Spark's own status tracker (no extra job, nothing in the tasks): one
updating line on a terminal, a log line every few seconds elsewhere (Airflow), and a last line when done.

Spark reports progress per finished task, so the share of ``total`` items done is the share of tasks done in
the step's Spark stages; a step of few tasks advances in steps.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds // 3600}h{seconds % 3600 // 60:02d}"


class Progress:
    """``with Progress(spark, "embed", total=n, unit="images"):`` around the Spark work of one step."""

    def __init__(self, spark: SparkSession, label: str, total: int, unit: str, interval: float = 5.0,
                 stream: TextIO | None = None, terminal: bool | None = None) -> None:
        self.spark, self.label, self.total, self.unit = spark, label, total, unit
        self.interval = interval
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stages: dict[int, tuple[int, int]] = {}  # stage id -> (completed tasks, tasks)
        self._known: set[int] = set()
        self.started = 0.0
        self.lines: list[str] = []  # what was shown, for tests and reports

    def __enter__(self) -> Progress:
        tracker = self.spark.sparkContext.statusTracker()
        self._known = set(tracker.getActiveStageIds())  # stages of other work already running are not ours
        self.started = time.monotonic()
        if self.total > 0:
            self._thread = threading.Thread(target=self._run, name=f"progress-{self.label}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            if kind is None:
                self._show(self.total, final=True)
            elif self.terminal:
                self.stream.write("\n")
                self.stream.flush()

    def fraction(self) -> float:
        """Share of the step's tasks finished so far (0 before Spark has started any)."""
        tracker = self.spark.sparkContext.statusTracker()
        active = set(tracker.getActiveStageIds())
        for stage_id in active - self._known:
            info = tracker.getStageInfo(stage_id)
            if info is not None and info.numTasks:
                self._stages[stage_id] = (info.numCompletedTasks, info.numTasks)
        for stage_id, (_, tasks) in list(self._stages.items()):
            if stage_id not in active:
                self._stages[stage_id] = (tasks, tasks)  # no longer active: finished (or retried as a new one)
        done = sum(d for d, _ in self._stages.values())
        tasks = sum(t for _, t in self._stages.values())
        return done / tasks if tasks else 0.0

    def _run(self) -> None:
        last_log = time.monotonic()
        while not self._stop.wait(min(self.interval, 1.0) if self.terminal else self.interval):
            try:
                done = int(self.total * self.fraction())
            except Exception:  # the session is stopping: no more progress to show
                return
            if self.terminal or time.monotonic() - last_log >= self.interval - 1e-3:
                self._show(done)
                last_log = time.monotonic()

    def _show(self, done: int, final: bool = False) -> None:
        elapsed = time.monotonic() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        text = f"{self.label}: {done:,} of {self.total:,} {self.unit} ({100 * done / self.total:.0f}%)"
        if final:
            text += f" in {_clock(elapsed)}, {rate:.1f} {self.unit}/s"
        elif done:
            text += f", {rate:.1f} {self.unit}/s, about {_clock((self.total - done) / rate)} left"
        self.lines.append(text)
        if self.terminal:
            self.stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
            self.stream.flush()
        else:
            log.info("progress %s", text)
