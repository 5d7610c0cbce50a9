"""``image-embeddings status``: the last runs, each table's version and size, embeddings per model identity and
the newest failure, read from the Delta tables (by path, local or ``s3a://``, or by name) without running anything."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from image_embeddings.core.config import AppConfig
from image_embeddings.core.tables import read_table, table_version
from image_embeddings.ops.maintain import owned_tables

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

# The counts shown per run, by stage (from the run's report).
COUNTS = {"ingest": ("files_listed", "files_decoded", "files_removed", "images", "errors"),
          "embed": ("rows_considered", "embedded", "removed", "errors"),
          "maintain": ()}


def collect_status(spark: SparkSession, config: AppConfig, runs: int = 10) -> dict[str, Any]:
    """The status as plain data: ``runs`` newest first, ``tables``, ``models``, ``last_failure``."""
    from pyspark.sql import functions as F

    out = config.output
    tables = []
    for name, path in owned_tables(config):
        df = read_table(spark, path)
        tables.append({"table": name, "path": str(path), "exists": df is not None,
                       "version": table_version(spark, path) if df is not None else None,
                       "rows": df.count() if df is not None else None})
    history: list[dict[str, Any]] = []
    last_failure = None
    runs_df = read_table(spark, out.runs)
    if runs_df is not None:
        newest = runs_df.orderBy(F.col("started_at").desc()).limit(runs).collect()
        history = [_run(r) for r in newest]
        failed = runs_df.where(F.col("status") == "failed").orderBy(F.col("started_at").desc()).limit(1).collect()
        last_failure = _run(failed[0]) if failed else None
    models = []
    embeddings = read_table(spark, out.embeddings)
    if embeddings is not None:
        grouped = embeddings.groupBy("model_key", "model", "weights_checksum", "preprocess_id").agg(
            F.count(F.lit(1)).alias("rows"), F.count("embedding").alias("embedded"),
            F.max("embedded_at").alias("last_embedded_at")).orderBy("model_key").collect()
        models = [{"model_key": r["model_key"], "model": r["model"], "weights_checksum": r["weights_checksum"],
                   "preprocess_id": r["preprocess_id"], "rows": int(r["rows"]),
                   "without_embedding": int(r["rows"]) - int(r["embedded"]),
                   "last_embedded_at": None if r["last_embedded_at"] is None else r["last_embedded_at"].isoformat()}
                  for r in grouped]
    return {"runs": history, "tables": tables, "models": models, "last_failure": last_failure}


def _run(row: Any) -> dict[str, Any]:
    try:
        report = json.loads(row["report"] or "{}")
    except ValueError:
        report = {}
    metrics = report.get("metrics") or {}
    counts = {k: metrics[k] for k in COUNTS.get(row["stage"], ()) if k in metrics}
    return {"run_id": row["run_id"], "stage": row["stage"], "status": row["status"], "run_date": row["run_date"],
            "started_at": None if row["started_at"] is None else row["started_at"].isoformat(),
            "duration_s": row["duration_s"], "counts": counts, "error": report.get("error")}


def status_lines(status: dict[str, Any]) -> list[str]:
    """The status for a terminal."""
    lines = ["last runs (newest first):"]
    if not status["runs"]:
        lines.append("  none recorded")
    for r in status["runs"]:
        counts = ", ".join(f"{k} {_short(v)}" for k, v in r["counts"].items())
        line = (f"  {(r['started_at'] or '')[:19]:<19}  {r['stage']:<8} {r['status']:<9} "
                f"{r['duration_s'] or 0:>7.1f} s  {r['run_id']}")
        lines.append(line + (f"  {counts}" if counts else "") + (f"  error: {r['error']}" if r["error"] else ""))
    lines.append("tables:")
    for t in status["tables"]:
        state = (f"version {t['version']}, {t['rows']} rows" if t["exists"] else "not created yet")
        lines.append(f"  {t['table']:<10} {state:<28} {t['path']}")
    lines.append("embeddings by model identity:")
    if not status["models"]:
        lines.append("  none")
    for m in status["models"]:
        last = (m["last_embedded_at"] or "-")[:19]
        lines.append(f"  {m['model_key']}  {m['model']}, weights {m['weights_checksum'][:19]}, {m['rows']} rows "
                     f"({m['without_embedding']} without embedding), last embedded {last}")
    failure = status["last_failure"]
    lines.append("newest failure: " + ("none" if failure is None else
                                       f"{(failure['started_at'] or '')[:19]} {failure['stage']} {failure['run_id']}: "
                                       f"{failure['error'] or 'no error recorded'}"))
    return lines


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}" if value else "0"
    return str(value)
