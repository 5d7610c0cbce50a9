"""Nearest neighbours by cosine similarity, from the embeddings table of the configured model."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from image_embeddings.config import AppConfig
from image_embeddings.embed import embedder_settings, model_key, resolve_config_weights
from image_embeddings.embedder import Weights

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

SMALL_TABLE_ROWS = 2_000  # up to this many rows the exact search runs on the driver, in numpy


class SimilarError(RuntimeError):
    """The query cannot be answered from this table; the message says why."""


@dataclass(frozen=True)
class Neighbour:
    """One search result."""

    image_id: str
    score: float
    sha256: str | None


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
    from image_embeddings.tables import read

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
    """The ``k`` rows with the highest cosine to ``query``, searched exactly.

    Small tables are scored on the driver. Larger ones are scored where they lie: each Spark task keeps the best
    ``k`` of its rows, so the driver receives ``k`` rows per task whatever the table's size (never the table).
    """
    import pandas as pd
    from pyspark.sql import functions as F

    q = np.asarray(query, dtype=np.float32)
    q = q / max(float(np.linalg.norm(q)), 1e-12)
    if exclude is not None:
        rows = rows.where(F.col("image_id") != exclude)
    rows = rows.select("image_id", "sha256", "embedding")
    if rows.limit(small_table_rows + 1).count() <= small_table_rows:
        collected = rows.collect()
        if not collected:
            return []
        matrix = np.asarray([r["embedding"] for r in collected], dtype=np.float32)
        scores = matrix @ q / np.maximum(np.linalg.norm(matrix, axis=1), 1e-12)
        order = np.argsort(-scores, kind="stable")[:k]
        return [Neighbour(collected[i]["image_id"], float(scores[i]), collected[i]["sha256"]) for i in order]

    def best(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        ids: list[str] = []
        shas: list[str] = []
        kept = np.zeros(0, dtype=np.float64)
        for b in batches:
            if not len(b):
                continue
            matrix = np.stack(b["embedding"].to_numpy()).astype(np.float32)
            scores = (matrix @ q / np.maximum(np.linalg.norm(matrix, axis=1), 1e-12)).astype(np.float64)
            ids, shas = ids + b["image_id"].tolist(), shas + b["sha256"].tolist()
            kept = np.concatenate([kept, scores])
            order = np.argsort(-kept, kind="stable")[:k]
            ids, shas, kept = [ids[i] for i in order], [shas[i] for i in order], kept[order]
        if ids:
            yield pd.DataFrame({"image_id": pd.Series(ids, dtype=object), "sha256": pd.Series(shas, dtype=object),
                                "score": kept})

    found = rows.mapInPandas(best, "image_id string, sha256 string, score double").collect()  # type: ignore[arg-type]
    found.sort(key=lambda r: (-r["score"], r["image_id"]))
    return [Neighbour(r["image_id"], float(r["score"]), r["sha256"]) for r in found[:k]]


@dataclass(frozen=True)
class Search:
    """Neighbours and how they were found (``index`` or ``exact``, with the reason)."""

    neighbours: list[Neighbour]
    path: str
    detail: str


def search(spark: SparkSession, config: AppConfig, k: int = 10, image_id: str | None = None,
           image: bytes | None = None, small_table_rows: int = SMALL_TABLE_ROWS, use_index: bool = True) -> Search:
    """Top-``k`` neighbours of a stored image (``image_id``) or of new image bytes (``image``).

    With a fresh index of this model (one covering the table's current rows) the index answers; otherwise the
    search is exact, and ``detail`` says why.
    """
    if (image_id is None) == (image is None):
        raise ValueError("give exactly one of image_id or image")
    weights = resolve_config_weights(config)
    rows = model_rows(spark, config, weights)
    if image_id is not None:
        query = query_by_id(rows, image_id)
    else:
        assert image is not None
        query = query_by_image(config, image, weights)
    loaded, why = (None, "asked for (--exact)")
    if use_index:
        loaded, why = fresh_index(spark, config, config_key(config, weights))
    if loaded is not None:
        scores, names, shas = loaded.search(query[None, :], k + (1 if image_id is not None else 0))
        found = [Neighbour(n, float(s), h) for n, s, h in zip(names[0], scores[0], shas[0], strict=False)
                 if n != image_id][:k]
        m = loaded.manifest
        return Search(found, "index", f"{m.type} index of {m.rows:,} rows covering table version {m.version}")
    found = top_k(rows, query, k, exclude=image_id, small_table_rows=small_table_rows)
    return Search(found, "exact", why)


def fresh_index(spark: SparkSession, config: AppConfig, key: str) -> tuple[Any, str]:
    """The loaded index of model ``key`` when it covers the table's current rows, else (None, why not)."""
    from image_embeddings.vector_index import is_fresh, load_index, read_manifest, store_for

    store = store_for(config, key)
    manifest = read_manifest(store)
    if manifest is None:
        return None, f"no index at {store.location} (`image-embeddings index` builds one)"
    fresh, latest = is_fresh(spark, config.output.embeddings, manifest.version)
    if not fresh:
        return None, (f"the index covers table version {manifest.version}, the table is at {latest} "
                      "(`image-embeddings index` updates it)")
    return load_index(store, config.index.nprobe), ""


def similar(spark: SparkSession, config: AppConfig, k: int = 10, image_id: str | None = None,
            image: bytes | None = None, small_table_rows: int = SMALL_TABLE_ROWS) -> list[Neighbour]:
    """Top-``k`` neighbours (:func:`search`), logging which path found them."""
    found = search(spark, config, k, image_id=image_id, image=image, small_table_rows=small_table_rows)
    log.info("similar: %s search%s", found.path, f" ({found.detail})" if found.detail else "")
    return found.neighbours
