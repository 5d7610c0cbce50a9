"""Spark batch jobs that turn a bucket of product photos into image embeddings stored in Delta Lake."""

from __future__ import annotations

from image_embeddings.config import AppConfig, ConfigError, load_config

__version__ = "0.1.0"

__all__ = ["AppConfig", "ConfigError", "__version__", "load_config", "run_embed", "run_ingest"]


def run_ingest(spark, config, run_id=None, report_file=None):  # type: ignore[no-untyped-def]
    """Run stage 1 with the caller's SparkSession (a notebook's, for example); see ``ingest.run_ingest``."""
    from image_embeddings.ingest import run_ingest as _run

    if not isinstance(config, AppConfig):
        config = load_config(config)
    return _run(spark, config, run_id=run_id, report_file=report_file)


def run_embed(spark, config, run_id=None, report_file=None):  # type: ignore[no-untyped-def]
    """Run stage 2 with the caller's SparkSession; see ``embed.run_embed``."""
    from image_embeddings.embed import run_embed as _run

    if not isinstance(config, AppConfig):
        config = load_config(config)
    return _run(spark, config, run_id=run_id, report_file=report_file)
