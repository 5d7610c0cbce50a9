"""Progress of a long Spark step, from Spark's own status tracker (no extra job, nothing in the tasks): one
updating line on a terminal, a log line every few seconds elsewhere (Airflow), and a last line when done.

Spark reports progress per finished task, so the share of ``total`` items done is the share of tasks done in
the step's Spark stages; a step of few tasks advances in steps.

A Spark Connect session has no status tracker: progress then comes from the execution progress the server sends
with each of this client's actions while it runs (pyspark 4.0's progress handlers), or, on clients without those,
shrinks to a line when the step starts and one when it ends. Either is said once in the log.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)
_said: set[str] = set()  # what this process has said about progress on Spark Connect, once each


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
        # stage id (on Connect: (operation id, stage id)) -> (completed tasks, tasks)
        self._stages: dict[Any, tuple[int, int]] = {}
        self._known: set[int] = set()
        self._connect = self._reports = False
        self._lock = threading.Lock()
        self.started = 0.0
        self.lines: list[str] = []  # what was shown, for tests and reports

    def __enter__(self) -> Progress:
        from image_embeddings.core.spark import is_connect

        self._connect = is_connect(self.spark)
        if self._connect:
            self._reports = self._listen()
        else:
            tracker = self.spark.sparkContext.statusTracker()
            self._known = set(tracker.getActiveStageIds())  # stages of other work already running are not ours
        self.started = time.monotonic()
        if self.total > 0 and self._connect and not self._reports:
            self._show(0)  # no progress to follow: the start, and the end in __exit__
        elif self.total > 0:
            self._thread = threading.Thread(target=self._run, name=f"progress-{self.label}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stop.set()
        if self._connect and self._reports:
            with contextlib.suppress(Exception):  # the session is gone: so is the handler
                self.spark.removeProgressHandler(self._on_report)  # type: ignore[attr-defined]
        if self._thread is not None or (self._connect and self.total > 0):
            if self._thread is not None:
                self._thread.join(timeout=10)
            if kind is None:
                self._show(self.total, final=True)
            elif self.terminal:
                self.stream.write("\n")
                self.stream.flush()

    def _listen(self) -> bool:
        """Follow the progress reports of this Connect client's actions; False where the client has none."""
        register = getattr(self.spark, "registerProgressHandler", None)
        if register is None:
            _say_once("progress degraded on Spark Connect: this client gets no progress reports (pyspark before "
                      "4.0), so each step logs a line when it starts and one when it ends")
            return False
        _say_once("progress degraded on Spark Connect: no status tracker; the counts come from the progress the "
                  "server reports for this client's own actions, every few seconds while one runs")
        register(self._on_report)
        return True

    def _on_report(self, stages: Iterable[Any] | None = None, inflight_tasks: int = 0,
                   operation_id: str | None = None, done: bool = False, **_: Any) -> None:
        """A Connect progress handler: the stages of one running action. Never raises (that would fail it)."""
        try:
            with self._lock:
                for stage in stages or ():
                    finished = stage.num_tasks if (done or stage.done) else stage.num_completed_tasks
                    self._stages[(operation_id, stage.stage_id)] = (finished, stage.num_tasks)
                if done:  # the action ended: its last report may predate its last tasks
                    for key, (_finished, tasks) in list(self._stages.items()):
                        if key[0] == operation_id:
                            self._stages[key] = (tasks, tasks)
        except Exception:  # progress is an aid only
            pass

    def fraction(self) -> float:
        """Share of the step's tasks finished so far (0 before Spark has started any)."""
        if self._connect:
            with self._lock:
                done = sum(d for d, _ in self._stages.values())
                tasks = sum(t for _, t in self._stages.values())
            return done / tasks if tasks else 0.0
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


def _say_once(line: str) -> None:
    if line not in _said:
        _said.add(line)
        log.info(line)
