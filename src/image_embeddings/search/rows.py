"""The embeddings rows of the configured model identity, which every search reads."""

from __future__ import annotations

from typing import TYPE_CHECKING

from image_embeddings.core.config import AppConfig
from image_embeddings.embed.embedder import Weights
from image_embeddings.embed.identity import model_key, resolve_config_weights

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession


class SimilarError(RuntimeError):
    """The query cannot be answered from this table; the message says why."""


def config_key(config: AppConfig, weights: Weights | None = None) -> str:
    """The model key of the rows this config writes (and may query)."""
    weights = weights or resolve_config_weights(config)
    return model_key(config.model.name, weights.checksum, config.preprocess.preprocess_id, config.model.normalize)


def model_rows(spark: SparkSession, config: AppConfig, weights: Weights | None = None,
               version: int | None = None, check: bool = True) -> DataFrame:
    """This config's rows of the embeddings table (at ``version``, else the latest); refuses (unless ``check`` is
    false) when the table holds only other models."""
    from pyspark.sql import functions as F

    weights = weights or resolve_config_weights(config)
    key = config_key(config, weights)
    from image_embeddings.core.tables import read

    table = read(spark, config.output.embeddings, version)
    rows = table.where((F.col("model_key") == key) & F.col("embedding").isNotNull())
    if check and rows.limit(1).count() == 0:
        others = [r.asDict() for r in table.select("model_key", "model", "weights_checksum", "preprocess_id",
                                                    "normalized").distinct().limit(5).collect()]
        raise SimilarError(
            f"the embeddings table {config.output.embeddings_table} has no rows for this config's model "
            f"(model={config.model.name}, weights checksum={weights.checksum}, preprocessing="
            f"{config.preprocess.preprocess_id}, normalized={config.model.normalize}); "
            f"it holds: {others or 'nothing'}. Query with the model, weights and preprocessing the table was "
            "built with.")
    return rows
