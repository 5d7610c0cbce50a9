"""Run reports: one JSON document per run, one log line, and one row in the runs table."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from image_embeddings.errors import failure_line, reason_column
from image_embeddings.redaction import redact, scrub

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from image_embeddings.tables import Table

log = logging.getLogger(__name__)

RUNS_SCHEMA = ("run_id STRING, stage STRING, status STRING, run_date STRING, started_at TIMESTAMP, "
               "finished_at TIMESTAMP, duration_s DOUBLE, report STRING")


def new_run_id(stage: str) -> str:
    """Return a sortable, unique run id such as ``ingest-20261123T054000Z-1a2b3c4d``."""
    now = dt.datetime.now(dt.timezone.utc)
    return f"{stage}-{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def utcnow() -> dt.datetime:
    """Return the current time as an aware UTC datetime (Spark stores it as the same instant)."""
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class RunReport:
    """What one stage run did; ``metrics`` holds the stage's counters."""

    run_id: str
    stage: str
    started_at: dt.datetime
    status: str = "running"
    run_date: str | None = None
    finished_at: dt.datetime | None = None
    duration_s: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def finish(self, status: str, error: BaseException | None = None) -> None:
        """Record the end of the run."""
        self.status = status
        self.finished_at = utcnow()
        self.duration_s = round((self.finished_at - self.started_at).total_seconds(), 3)
        if error is not None:
            self.error = failure_line(error)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time a part of the run into ``metrics["seconds"][name]``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = self.metrics.setdefault("seconds", {})
            seconds[name] = round(seconds.get(name, 0.0) + time.perf_counter() - started, 3)

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-ready data, with anything that looks like a secret redacted."""
        data = dataclasses.asdict(self)
        for key in ("started_at", "finished_at"):
            if data[key] is not None:
                data[key] = data[key].isoformat()
        return redact(data)

    def to_json(self) -> str:
        """Return the report as one JSON document."""
        return json.dumps(self.to_dict(), sort_keys=True, default=str)

    def summary(self) -> str:
        """Return the one-line summary that is logged."""
        flat = " ".join(f"{k}={_short(v)}" for k, v in sorted(redact(self.metrics).items()))
        error = f" error={json.dumps(scrub(self.error))}" if self.error else ""
        return (f"run_id={self.run_id} stage={self.stage} status={self.status} "
                f"duration_s={self.duration_s}{error} {flat}").strip()


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def errors_by_reason(df: DataFrame) -> dict[str, int]:
    """Count the rows of ``df`` with an ``error``, by its reason (the text before the first colon)."""
    from pyspark.sql import functions as F

    rows = df.where(F.col("error").isNotNull()).groupBy(
        reason_column(F.col("error")).alias("reason")).count().collect()
    return {r["reason"]: int(r["count"]) for r in sorted(rows, key=lambda r: r["reason"])}


def run_reported(stage: str, work: Callable[[RunReport], None], spark: SparkSession, runs_table: Table,
                 run_id: str | None, report_file: str | None, run_date: str | None,
                 rate: tuple[str, str | None] | None) -> RunReport:
    """Run ``work`` with a fresh report and publish it, on success and on failure (then re-raise).

    ``rate`` names the metric counted and the metric of seconds (None: the whole run) for
    ``images_per_second``; ``rate=None`` (a run that handles no images) adds no rate.
    """
    report = RunReport(run_id=run_id or new_run_id(stage), stage=stage, started_at=utcnow(), run_date=run_date)
    try:
        work(report)
    except BaseException as exc:
        report.finish("failed", exc)
        publish(report, spark, runs_table, report_file)
        raise
    report.finish("succeeded")
    if rate is not None:
        count, seconds_key = rate
        seconds = report.duration_s if seconds_key is None else report.metrics.get(seconds_key)
        report.metrics["images_per_second"] = round(
            report.metrics.get(count, 0) / max(float(seconds or 0.0), 1e-6), 2)
    publish(report, spark, runs_table, report_file)
    return report


def publish(report: RunReport, spark: SparkSession | None, runs_table: Table | None,
            report_file: str | None) -> None:
    """Log the report, append it to the runs table and write it to ``report_file``; never raises."""
    log.info("run report: %s", report.summary())
    if report_file:
        try:
            path = Path(report_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True, default=str) + "\n")
        except OSError as exc:
            log.error("could not write report file %s: %s", report_file, exc)
    if spark is not None and runs_table:
        try:
            from image_embeddings.spark import local_frame
            from image_embeddings.tables import append, with_commit_retries

            row = (report.run_id, report.stage, report.status, report.run_date, report.started_at,
                   report.finished_at, report.duration_s, report.to_json())
            with_commit_retries(str(runs_table), lambda: append(local_frame(spark, [row], RUNS_SCHEMA), runs_table))
        except Exception as exc:  # the report must not hide the run's own outcome: one line, the trace in the file
            log.error("could not append the run report to %s", runs_table, exc_info=exc, extra={"file_only": True})
            log.error("could not append the run report to %s: %s", runs_table, failure_line(exc))
