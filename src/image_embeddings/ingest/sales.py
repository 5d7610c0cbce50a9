"""The images table's sales columns, joined onto rows keyed by ``image_id`` (the article's combined table)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from image_embeddings.core.config import AppConfig
from image_embeddings.core.tables import read

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession


def embeddings_with_sales(spark: SparkSession, config: AppConfig) -> DataFrame:
    """The embeddings joined with the images table's sales columns (the article's combined table)."""
    return with_sales(spark, config, read(spark, config.output.embeddings))


def with_sales(spark: SparkSession, config: AppConfig, rows: DataFrame) -> DataFrame:
    """``rows`` (keyed by ``image_id``) joined with the images table's sales columns."""
    images = read(spark, config.output.images)
    own = {"path", "file_size", "modification_time", "sha256", "width", "height", "image", "error", "preprocess_id",
           "run_id", "ingested_at", "duplicate_files", "updated_run_id", "updated_at"}
    sales = [c for c in images.columns if c not in own]
    return rows.join(images.select(*sales), "image_id", "left")
