"""Spark batch jobs that turn a bucket of product photos into image embeddings stored in Delta Lake.

The notebook API: each function takes the caller's ``spark`` and a config (an :class:`AppConfig` or a YAML
path, with optional ``overrides``) and runs one stage for one ``run_date``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from image_embeddings.core.config import AppConfig, ConfigError, load_config

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from image_embeddings.core.report import RunReport

from image_embeddings.core.version import __version__

__all__ = ["AppConfig", "ConfigError", "__version__", "load_config", "run_embed", "run_ingest", "run_pipeline"]


def _config(config: AppConfig | str | os.PathLike[str], overrides: Sequence[str], run_date: str | None) -> AppConfig:
    if isinstance(config, AppConfig):
        return config
    return load_config(config, overrides, run_date=run_date)


def run_ingest(spark: SparkSession, config: AppConfig | str | os.PathLike[str], overrides: Sequence[str] = (),
               run_date: str | None = None, run_id: str | None = None, report_file: str | None = None) -> RunReport:
    """Run stage 1 with the caller's SparkSession (a notebook's, for example)."""
    from image_embeddings.ingest.stage import run_ingest as _run

    return _run(spark, _config(config, overrides, run_date), run_id=run_id, report_file=report_file,
                run_date=run_date)


def run_embed(spark: SparkSession, config: AppConfig | str | os.PathLike[str], overrides: Sequence[str] = (),
              run_date: str | None = None, run_id: str | None = None, report_file: str | None = None) -> RunReport:
    """Run stage 2 with the caller's SparkSession."""
    from image_embeddings.embed.stage import run_embed as _run

    return _run(spark, _config(config, overrides, run_date), run_id=run_id, report_file=report_file,
                run_date=run_date)


def run_pipeline(spark: SparkSession, config: AppConfig | str | os.PathLike[str], overrides: Sequence[str] = (),
                 run_date: str | None = None, run_id: str | None = None,
                 report_file: str | None = None) -> dict[str, Any]:
    """Run both stages with the caller's SparkSession; returns the combined report."""
    from image_embeddings.pipeline import run_pipeline as _run

    return _run(spark, _config(config, overrides, run_date), run_id=run_id, report_file=report_file,
                run_date=run_date)
