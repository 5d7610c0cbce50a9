"""``image-embeddings maintain``: OPTIMIZE and VACUUM of the Delta tables this package writes.

Every MERGE rewrites whole data files and leaves the old ones behind for time travel; this command compacts the
small files (OPTIMIZE) and deletes files no table version younger than the retention needs (VACUUM). Neither
changes a table's rows: OPTIMIZE is one atomic commit, VACUUM only removes files no longer referenced, so a
failed maintenance run leaves the data as it was.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from image_embeddings.config import AppConfig
from image_embeddings.lease import leased
from image_embeddings.report import RunReport, run_reported
from image_embeddings.spark import session_conf
from image_embeddings.tables import (
    Table,
    TableRef,
    history,
    table_exists,
    table_properties,
    table_version,
    with_commit_retries,
)

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

RETENTION_PROPERTY = "delta.deletedFileRetentionDuration"
DEFAULT_RETENTION_HOURS = 168.0  # Delta's default of delta.deletedFileRetentionDuration: interval 1 week
RETENTION_CHECK = "spark.databricks.delta.retentionDurationCheck.enabled"
# VACUUM lists a table's directories in this many tasks (Spark's default: 10,000, about 100 s of scheduling on two
# cores for a tiny table). The package's tables are not partitioned: a few directories, a few tasks are enough.
LISTING_PARALLELISM = "spark.sql.sources.parallelPartitionDiscovery.parallelism"
# OPTIMIZE packs small files into files of at most this size (Delta's default: 1 GB). The files table has no
# deletion vectors, so a later MERGE that changes one row of a compacted file rewrites all of it: bounded here.
OPTIMIZE_FILE_BYTES = 256 << 20
OPTIMIZE_SIZES = {"spark.databricks.delta.optimize.maxFileSize": str(OPTIMIZE_FILE_BYTES),
                  "spark.databricks.delta.optimize.minFileSize": str(OPTIMIZE_FILE_BYTES)}

_UNIT_HOURS = {"week": 168.0, "day": 24.0, "hour": 1.0, "minute": 1 / 60, "second": 1 / 3600,
               "millisecond": 1 / 3_600_000, "microsecond": 1 / 3_600_000_000}


class MaintenanceError(RuntimeError):
    """OPTIMIZE or VACUUM failed on at least one table (the others were still maintained)."""


class RetentionTooShortError(MaintenanceError):
    """``maintenance.vacuum_retention_hours`` is below a table's safety minimum; nothing was touched."""


def owned_tables(config: AppConfig) -> list[tuple[str, TableRef]]:
    """The package's Delta tables as (name, table): files, images, embeddings, runs (by path or by name)."""
    out = config.output
    return [("files", out.files), ("images", out.images), ("embeddings", out.embeddings), ("runs", out.runs)]


def interval_hours(text: str) -> float:
    """Hours in a Delta interval property such as ``interval 7 days`` or ``interval 1 week 12 hours``."""
    words = text.strip().lower().split()
    if words and words[0] == "interval":
        words = words[1:]
    if not words or len(words) % 2:
        raise ValueError(f"not an interval: {text!r}")
    hours = 0.0
    for number, unit in zip(words[::2], words[1::2], strict=True):
        unit = unit[:-1] if unit.endswith("s") and unit[:-1] in _UNIT_HOURS else unit
        if unit not in _UNIT_HOURS or not re.fullmatch(r"[+-]?\d+(\.\d+)?", number):
            raise ValueError(f"not an interval Delta accepts for {RETENTION_PROPERTY}: {text!r}")
        hours += float(number) * _UNIT_HOURS[unit]
    return hours


def minimum_retention_hours(spark: SparkSession, path: Table) -> tuple[float, str]:
    """A table's VACUUM safety minimum in hours, and where it comes from (the property, or Delta's default)."""
    properties = table_properties(spark, path)
    value = properties.get(RETENTION_PROPERTY)
    if value is None:
        return DEFAULT_RETENTION_HOURS, f"Delta's default {RETENTION_PROPERTY} of 7 days"
    try:
        return interval_hours(value), f"{RETENTION_PROPERTY} = {value}"
    except ValueError as exc:
        raise MaintenanceError(f"table at {path}: {exc}") from None


def _hours(value: float) -> str:
    return f"{value:g}"


def check_retention(spark: SparkSession, tables: Sequence[tuple[str, Table]], retention_hours: int,
                    allow_short: bool = False) -> None:
    """Refuse a retention below any table's safety minimum before anything is touched; with ``allow_short``, warn.

    Delta refuses such a VACUUM itself unless its retention check is disabled, and a cluster may have disabled
    it: this check does not depend on that setting.
    """
    for name, path in tables:
        minimum, source = minimum_retention_hours(spark, path)
        if retention_hours >= minimum:
            continue
        if not allow_short:
            raise RetentionTooShortError(
                f"maintenance.vacuum_retention_hours: {retention_hours} is shorter than the {_hours(minimum)} hours "
                f"the {name} table at {path} keeps deleted files ({source}); VACUUM would delete files that running "
                f"readers, writers and time travel may still need. Set at least {_hours(minimum)}, or pass "
                "--allow-short-retention to do it anyway")
        log.warning("maintain: VACUUM of the %s table at %s keeps %d hours, less than its %s hours (%s), "
                    "as --allow-short-retention asks", name, path, retention_hours, _hours(minimum), source)


def _optimize(spark: SparkSession, name: str, path: TableRef) -> dict[str, int]:
    def compact() -> dict[str, Any]:
        with session_conf(spark, OPTIMIZE_SIZES):
            row = spark.sql(f"OPTIMIZE {path.sql}").select("metrics").first()
        return {} if row is None or row[0] is None else row[0].asDict(recursive=True)

    metrics, _ = with_commit_retries(f"OPTIMIZE of the {name} table at {path}", compact)
    return {"files_removed": int(metrics.get("numFilesRemoved") or 0),
            "files_added": int(metrics.get("numFilesAdded") or 0)}


def _vacuum(spark: SparkSession, path: TableRef, retention_hours: int, allow_short: bool) -> int | None:
    """VACUUM one table; the number of files deleted when Delta logged it (VACUUM END), else None."""
    before = table_version(spark, path)
    shuffle = str(spark.conf.get("spark.sql.shuffle.partitions", "200"))
    settings = {LISTING_PARALLELISM: shuffle if shuffle.isdigit() else "200"}  # Databricks allows "auto"
    if allow_short:
        settings[RETENTION_CHECK] = "false"
    with session_conf(spark, settings):
        spark.sql(f"VACUUM {path.sql} RETAIN {int(retention_hours)} HOURS")
    for row in history(spark, path, 2).select("version", "operation", "operationMetrics").collect():
        if row["operation"] == "VACUUM END" and (before is None or row["version"] > before):
            deleted = (row["operationMetrics"] or {}).get("numDeletedFiles")
            return None if deleted is None else int(deleted)
    return None


def _maintain(spark: SparkSession, config: AppConfig, allow_short: bool, report: RunReport) -> None:
    settings = config.maintenance
    retention = settings.vacuum_retention_hours
    m = report.metrics
    m.update(vacuum_retention_hours=retention, optimize=settings.optimize, allow_short_retention=allow_short,
             tables={})
    present: list[tuple[str, TableRef]] = []
    for name, path in owned_tables(config):
        m["tables"][name] = {"path": str(path)}
        if table_exists(spark, path):
            present.append((name, path))
        else:
            log.info("maintain: %s table at %s does not exist yet, skipped", name, path)
            m["tables"][name]["skipped"] = "does not exist yet"
    with report.step("retention_check"):
        check_retention(spark, present, retention, allow_short)
    failed: list[str] = []
    for name, path in present:
        entry: dict[str, Any] = m["tables"][name]
        entry["version_before"] = table_version(spark, path)
        try:
            if settings.optimize:
                with report.step(f"optimize_{name}"):
                    entry["optimize"] = _optimize(spark, name, path)
            with report.step(f"vacuum_{name}"):
                entry["vacuum_deleted_files"] = _vacuum(spark, path, retention, allow_short)
        except Exception as exc:  # one table's failure must not keep the others from being maintained
            entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            failed.append(name)
            log.error("maintain: %s table at %s failed: %s", name, path, entry["error"])
        entry["version_after"] = table_version(spark, path)
        log.info("maintain: %s", table_line(name, entry))
    optimized = [t.get("optimize", {}) for t in m["tables"].values()]
    m["files_removed"] = sum(o.get("files_removed", 0) for o in optimized)
    m["files_added"] = sum(o.get("files_added", 0) for o in optimized)
    vacuumed = [t.get("vacuum_deleted_files") for t in m["tables"].values()]
    m["files_vacuumed"] = sum(v for v in vacuumed if v is not None) if any(v is not None for v in vacuumed) else None
    m["tables_maintained"] = len(present) - len(failed)
    m["tables_skipped"] = len(m["tables"]) - len(present)
    if failed:
        raise MaintenanceError(f"maintenance failed on the {', '.join(failed)} table(s): "
                               + "; ".join(m["tables"][n]["error"] for n in failed))


def table_line(name: str, entry: dict[str, Any]) -> str:
    """One line about one table of a maintenance report."""
    if "skipped" in entry:
        return f"{name}: {entry['path']}: {entry['skipped']}, skipped"
    parts = [f"{name}: {entry['path']}: version {entry.get('version_before')} -> {entry.get('version_after')}"]
    if "optimize" in entry:
        parts.append(f"OPTIMIZE removed {entry['optimize']['files_removed']} files, "
                     f"added {entry['optimize']['files_added']}")
    if "vacuum_deleted_files" in entry:
        deleted = entry["vacuum_deleted_files"]
        parts.append("VACUUM deleted " + ("an unknown number of files (not logged)" if deleted is None
                                         else f"{deleted} files"))
    if "error" in entry:
        parts.append(f"FAILED: {entry['error']}")
    return ", ".join(parts)


@leased('maintain')
def run_maintain(spark: SparkSession, config: AppConfig, allow_short_retention: bool = False,
                 run_id: str | None = None, report_file: str | None = None,
                 run_date: str | None = None) -> RunReport:
    """OPTIMIZE and VACUUM every existing table of ``config``; the report also goes to the runs table.

    Raises :class:`RetentionTooShortError` (before touching any table) when ``maintenance.vacuum_retention_hours``
    is below a table's ``delta.deletedFileRetentionDuration`` and ``allow_short_retention`` is false, and
    :class:`MaintenanceError` when a table failed.
    """
    return run_reported("maintain", lambda report: _maintain(spark, config, allow_short_retention, report),
                        spark, config.output.runs, run_id, report_file, run_date, rate=None)
