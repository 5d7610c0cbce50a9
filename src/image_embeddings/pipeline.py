"""Both stages in one run, with one combined report."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from image_embeddings.core.config import AppConfig
from image_embeddings.core.lease import leased
from image_embeddings.core.report import RunReport, new_run_id
from image_embeddings.embed.embedder import EmbedderSettings
from image_embeddings.embed.identity import embedder_settings, resolve_config_weights
from image_embeddings.embed.stage import run_embed, warm_up_workers
from image_embeddings.ingest.stage import run_ingest

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


@leased('run')
def run_pipeline(spark: SparkSession, config: AppConfig, run_id: str | None = None,
                 report_file: str | None = None, run_date: str | None = None) -> dict[str, Any]:
    """Run ingest then embed; return (and write to ``report_file``) the combined report.

    Each stage also appends its own row to the runs table. When ingest fails, embed does not run. Stage 1's
    Python workers load stage 2's model in the background (on CPU), so stage 2 starts with it loaded.
    """
    base = run_id or new_run_id("run")
    stages: dict[str, RunReport] = {}
    try:
        settings = _warm_up_settings(config)
        warm_up = None if settings is None else (lambda: warm_up_workers(spark, settings))
        stages["ingest"] = run_ingest(spark, config, run_id=f"{base}-ingest", run_date=run_date, warm_up=warm_up)
        stages["embed"] = run_embed(spark, config, run_id=f"{base}-embed", run_date=run_date)
    finally:
        combined = combine(base, run_date, stages)
        log.info("pipeline report: run_id=%s status=%s %s", base, combined["status"], " ".join(
            f"{name}.{key}={value}" for name, stage in combined["stages"].items()
            for key, value in stage.items() if key in ("status", "duration_s")))
        if report_file:
            Path(report_file).parent.mkdir(parents=True, exist_ok=True)
            Path(report_file).write_text(json.dumps(combined, indent=2, sort_keys=True, default=str) + "\n")
    return combined


def _warm_up_settings(config: AppConfig) -> EmbedderSettings | None:
    """Stage 2's embedder settings, or None when its weights cannot be resolved yet (stage 2 will say why)."""
    try:
        return embedder_settings(config, resolve_config_weights(config))
    except Exception as exc:
        log.info("no model warm-up during ingest: %s", exc)
        return None


def combine(run_id: str, run_date: str | None, stages: dict[str, RunReport]) -> dict[str, Any]:
    """One document holding every stage's report; the status is succeeded only if both stages succeeded."""
    done = [s.status for s in stages.values()]
    status = "succeeded" if len(done) == 2 and all(s == "succeeded" for s in done) else "failed"
    return {"run_id": run_id, "run_date": run_date, "status": status,
            "stages": {name: report.to_dict() for name, report in stages.items()}}
