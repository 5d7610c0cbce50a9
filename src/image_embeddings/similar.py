"""Nearest neighbours by cosine similarity, from the embeddings table of the configured model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from image_embeddings.config import AppConfig
from image_embeddings.embed import embedder_settings, model_key, resolve_config_weights
from image_embeddings.embedder import Weights

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

SMALL_TABLE_ROWS = 200_000  # up to this many rows the search runs on the driver in numpy


class SimilarError(RuntimeError):
    """The query cannot be answered from this table; the message says why."""


@dataclass(frozen=True)
class Neighbour:
    """One search result."""

    image_id: str
    score: float
    sha256: str | None


def model_rows(spark: SparkSession, config: AppConfig, weights: Weights | None = None) -> DataFrame:
    """This config's rows of the embeddings table; refuses when the table holds only other models."""
    from pyspark.sql import functions as F

    weights = weights or resolve_config_weights(config)
    key = model_key(config.model.name, weights.checksum, config.preprocess.preprocess_id, config.model.normalize)
    table = spark.read.format("delta").load(config.output.embeddings_table)
    rows = table.where((F.col("model_key") == key) & F.col("embedding").isNotNull())
    if rows.limit(1).count() == 0:
        others = [r.asDict() for r in table.select("model_key", "model", "weights_checksum", "preprocess_id",
                                                    "normalized").distinct().limit(5).collect()]
        raise SimilarError(
            f"the embeddings table {config.output.embeddings_table} has no rows for this config's model "
            f"(model={config.model.name}, weights checksum={weights.checksum}, preprocessing="
            f"{config.preprocess.preprocess_id}, normalized={config.model.normalize}); "
            f"it holds: {others or 'nothing'}. Query with the model, weights and preprocessing the table was "
            "built with.")
    return rows


def query_by_id(rows: DataFrame, image_id: str) -> np.ndarray:
    """The stored embedding of ``image_id``."""
    from pyspark.sql import functions as F

    found = rows.where(F.col("image_id") == image_id).select("embedding").limit(1).collect()
    if not found:
        raise SimilarError(f"image_id {image_id!r} has no embedding for this model")
    return np.asarray(found[0][0], dtype=np.float32)


def query_by_image(config: AppConfig, content: bytes, weights: Weights) -> np.ndarray:
    """Embed an image file the way the table was built: stage 1's downscale, then the same model."""
    from image_embeddings.embedder import Embedder
    from image_embeddings.images import downscale

    pre = config.preprocess
    small = downscale(content, size=pre.size, mode=pre.mode, quality=pre.jpeg_quality, max_pixels=pre.max_pixels,
                      crop_fraction=pre.crop_fraction)
    if small.image is None:
        raise SimilarError(f"the query image cannot be used: {small.error}")
    result = Embedder(embedder_settings(config, weights), weights=weights).embed([small.image])
    if result.errors[0] is not None:
        raise SimilarError(f"the query image cannot be embedded: {result.errors[0]}")
    return result.embeddings[0]


def top_k(rows: DataFrame, query: np.ndarray, k: int, exclude: str | None = None,
          small_table_rows: int = SMALL_TABLE_ROWS) -> list[Neighbour]:
    """The ``k`` rows with the highest cosine to ``query``: in numpy for small tables, else scanned in Spark."""
    from pyspark.sql import functions as F

    q = np.asarray(query, dtype=np.float32)
    q = q / max(float(np.linalg.norm(q)), 1e-12)
    if exclude is not None:
        rows = rows.where(F.col("image_id") != exclude)
    if rows.limit(small_table_rows + 1).count() <= small_table_rows:
        collected = rows.select("image_id", "sha256", "embedding").collect()
        if not collected:
            return []
        matrix = np.asarray([r["embedding"] for r in collected], dtype=np.float32)
        scores = matrix @ q / np.maximum(np.linalg.norm(matrix, axis=1), 1e-12)
        order = np.argsort(-scores, kind="stable")[:k]
        return [Neighbour(collected[i]["image_id"], float(scores[i]), collected[i]["sha256"]) for i in order]
    scored = rows.withColumn("score", _cosine_column(F.col("embedding"), q))
    best = scored.orderBy(F.col("score").desc(), F.col("image_id")).limit(k).select("image_id", "score", "sha256")
    return [Neighbour(r["image_id"], float(r["score"]), r["sha256"]) for r in best.collect()]


def _cosine_column(embedding: Any, query: np.ndarray) -> Any:
    import pandas as pd
    from pyspark.sql.functions import pandas_udf

    def _score(vectors: pd.Series) -> pd.Series:
        matrix = np.stack(vectors.to_numpy()).astype(np.float32)
        norms = np.maximum(np.linalg.norm(matrix, axis=1), 1e-12)
        return pd.Series(matrix @ query / norms)

    _score.__annotations__ = {"vectors": pd.Series, "return": pd.Series}
    return pandas_udf(_score, "double")(embedding)  # type: ignore[call-overload]


def similar(spark: SparkSession, config: AppConfig, k: int = 10, image_id: str | None = None,
            image: bytes | None = None, small_table_rows: int = SMALL_TABLE_ROWS) -> list[Neighbour]:
    """Top-``k`` neighbours of a stored image (``image_id``) or of new image bytes (``image``)."""
    if (image_id is None) == (image is None):
        raise ValueError("give exactly one of image_id or image")
    weights = resolve_config_weights(config)
    rows = model_rows(spark, config, weights)
    if image_id is not None:
        return top_k(rows, query_by_id(rows, image_id), k, exclude=image_id, small_table_rows=small_table_rows)
    assert image is not None
    return top_k(rows, query_by_image(config, image, weights), k, small_table_rows=small_table_rows)
