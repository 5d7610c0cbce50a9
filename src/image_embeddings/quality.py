"""Embedding quality without labels: retrieval of augmented copies (``image-embeddings evaluate``), null and norm
statistics, and the drift figure each embed run records. The figures are computed in numpy on small samples;
only the sampling and the table statistics run in Spark."""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from image_embeddings.config import AppConfig

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

AUGMENTATIONS = ("flip", "crop", "brightness")
DRIFT_NEW_ROWS = 512  # this run's embeddings sampled for the drift figure
DRIFT_REFERENCE_ROWS = 512  # the table's earlier embeddings it is compared with
DRIFT_SPLIT_BYTES = 4 << 20  # scan split size while reading them


class EvaluateError(RuntimeError):
    """The table cannot be evaluated with this config; the message says why."""


def augment(thumbnail: bytes) -> dict[str, bytes]:
    """Label-free copies of a stored thumbnail at its own size: mirrored, centre 80% enlarged back, 30% brighter."""
    from PIL import Image, ImageEnhance

    with Image.open(io.BytesIO(thumbnail)) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    dx, dy = width // 10, height // 10
    copies = {
        "flip": image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "crop": image.crop((dx, dy, width - dx, height - dy)).resize((width, height), Image.Resampling.LANCZOS),
        "brightness": ImageEnhance.Brightness(image).enhance(1.3),
    }
    out = {}
    for name, copy in copies.items():
        buffer = io.BytesIO()
        copy.save(buffer, format="JPEG", quality=90)
        out[name] = buffer.getvalue()
    return out


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def retrieval_figures(originals: np.ndarray, queries: np.ndarray, owners: np.ndarray) -> dict[str, float]:
    """Each query (an augmented copy of original ``owners[i]``) searched among ``originals`` by cosine:
    recall@1 and @5 (the share whose own original ranks first, or in the top five), the mean cosine to its own
    original and to the others, and the gap between the two."""
    gallery, found = _unit(originals), _unit(queries)
    scores = found @ gallery.T
    own = scores[np.arange(len(found)), owners]
    rank = (scores > own[:, None]).sum(axis=1)  # how many originals score above its own
    others = (scores.sum(axis=1) - own) / max(len(gallery) - 1, 1)
    return {"recall_at_1": round(float((rank < 1).mean()), 4), "recall_at_5": round(float((rank < 5).mean()), 4),
            "same_image_cosine": round(float(own.mean()), 4),
            "different_image_cosine": round(float(others.mean()), 4),
            "gap": round(float(own.mean() - others.mean()), 4)}


def drift_figures(new: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """How far a run's new embeddings sit from the table's earlier ones.

    ``mean_cosine``: cosine between the two sets' mean embeddings (1.0 when they look alike on average).
    ``nearest_similarity``: mean over the new rows of the cosine to their nearest earlier row;
    ``nearest_similarity_reference``: the same for earlier rows among themselves (excluding each row itself),
    the level to compare it with. A nightly run of different-looking photos, or changed preprocessing, lowers
    the first two against the third.
    """
    if len(new) == 0 or len(reference) < 2:
        return {"new_rows": int(len(new)), "reference_rows": int(len(reference)),
                "note": "too few rows to compare"}
    a, b = _unit(new), _unit(reference)
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    mean_cosine = float(mean_a @ mean_b / max(np.linalg.norm(mean_a) * np.linalg.norm(mean_b), 1e-12))
    within = b @ b.T
    np.fill_diagonal(within, -np.inf)
    return {"new_rows": int(len(a)), "reference_rows": int(len(b)), "mean_cosine": round(mean_cosine, 4),
            "nearest_similarity": round(float((a @ b.T).max(axis=1).mean()), 4),
            "nearest_similarity_reference": round(float(within.max(axis=1).mean()), 4)}


def run_drift(new_rows: DataFrame, earlier: DataFrame | None, key: str) -> dict[str, Any]:
    """:func:`drift_figures` of a run's embeddings (up to :data:`DRIFT_NEW_ROWS`) against up to
    :data:`DRIFT_REFERENCE_ROWS` earlier ones of the same model identity. Reads that many rows, not the table."""
    from pyspark.sql import functions as F

    from image_embeddings.spark import session_conf

    new = [r[0] for r in new_rows.where(F.col("embedding").isNotNull()).select("embedding")
           .limit(DRIFT_NEW_ROWS).collect()]
    reference = []
    if earlier is not None:
        # Small scan splits: the limit's first task then reads about one data file, not a share of the whole table.
        with session_conf(earlier.sparkSession, {"spark.sql.files.maxPartitionBytes": str(DRIFT_SPLIT_BYTES)}):
            reference = [r[0] for r in earlier.where((F.col("model_key") == key) & F.col("embedding").isNotNull())
                         .select("embedding").limit(DRIFT_REFERENCE_ROWS).collect()]
    return drift_figures(np.asarray(new, dtype=np.float32), np.asarray(reference, dtype=np.float32))


def vector_statistics(rows: DataFrame) -> dict[str, Any]:
    """Rows, rows without an embedding (by error reason), and the embeddings' dimension and L2 norms, in one job."""
    from pyspark.sql import functions as F

    from image_embeddings.errors import reason_column

    norm = F.sqrt(F.aggregate("embedding", F.lit(0.0).cast("double"), lambda acc, x: acc + x * x))
    stats = rows.select(norm.alias("norm"), F.size("embedding").alias("dim"), "embedding").agg(
        F.count(F.lit(1)).alias("rows"), F.count("embedding").alias("embedded"),
        F.min("dim").alias("dim_min"), F.max("dim").alias("dim_max"),
        F.mean("norm").alias("norm_mean"), F.min("norm").alias("norm_min"), F.max("norm").alias("norm_max"),
        F.sum(F.when(F.col("embedding").isNotNull() & F.exists("embedding", lambda x: F.isnan(x)), 1)
              .otherwise(0)).alias("with_nan")).first()
    reasons = rows.where(F.col("embedding").isNull()).groupBy(reason_column(F.col("error")).alias("r")).count()
    assert stats is not None
    return {"rows": int(stats["rows"]), "null_embeddings": int(stats["rows"]) - int(stats["embedded"]),
            "null_by_reason": {r["r"] or "none": int(r["count"]) for r in reasons.collect()},
            "with_nan": int(stats["with_nan"] or 0),
            "dim": None if stats["dim_min"] is None else (int(stats["dim_min"]) if stats["dim_min"] == stats["dim_max"]
                                                           else [int(stats["dim_min"]), int(stats["dim_max"])]),
            "norm": {k: None if stats[f"norm_{k}"] is None else round(float(stats[f"norm_{k}"]), 5)
                     for k in ("mean", "min", "max")}}


def evaluate(spark: SparkSession, config: AppConfig, sample: int = 200, seed: int = 0) -> dict[str, Any]:
    """Evaluate the embeddings of this config's model: retrieval of augmented copies of ``sample`` stored images
    (embedded now with the same model and weights) among the sample's stored embeddings, plus statistics of
    every row of the model."""
    import time

    from pyspark.sql import functions as F

    from image_embeddings.embed import embedder_settings, model_key, resolve_config_weights
    from image_embeddings.embedder import Embedder
    from image_embeddings.similar import SimilarError, model_rows
    from image_embeddings.tables import in_ranges, path_ranges, read

    if sample < 2:
        raise EvaluateError("--sample: needs at least 2 images")
    started = time.monotonic()
    weights = resolve_config_weights(config)
    out = config.output
    try:
        rows = model_rows(spark, config, weights)
    except SimilarError as exc:
        raise EvaluateError(str(exc)) from None
    key = model_key(config.model.name, weights.checksum, config.preprocess.preprocess_id, config.model.normalize)
    every = read(spark, out.embeddings).where(F.col("model_key") == key)
    statistics = vector_statistics(every)
    chosen = (rows.select("image_id", "sha256", "embedding").orderBy(F.rand(seed)).limit(sample)
              .join(read(spark, out.images).select("image_id", "path"), "image_id"))
    picked = chosen.collect()
    paths = [r["path"] for r in picked]
    files = read(spark, out.files).select("path", "sha256", "image")
    thumbs = {(r["path"], r["sha256"]): r["image"]
              for r in files.where(in_ranges("path", path_ranges(paths))).where(F.col("image").isNotNull()).collect()}
    picked = [r for r in picked if (r["path"], r["sha256"]) in thumbs]
    if len(picked) < 2:
        raise EvaluateError(f"fewer than 2 embedded images with a stored thumbnail in {out.embeddings_table}")
    originals = np.asarray([r["embedding"] for r in picked], dtype=np.float32)
    embedder = Embedder(embedder_settings(config, weights), weights=weights)
    queries: dict[str, list[bytes]] = {name: [] for name in AUGMENTATIONS}
    for r in picked:
        for name, data in augment(bytes(thumbs[(r["path"], r["sha256"])])).items():
            queries[name].append(data)
    per_augmentation = {}
    all_queries, all_owners = [], []
    for name, images in queries.items():
        result = embedder.embed(images)
        ok = np.array([e is None for e in result.errors])
        owners = np.arange(len(images))[ok]
        per_augmentation[name] = retrieval_figures(originals, result.embeddings[ok], owners)
        all_queries.append(result.embeddings[ok])
        all_owners.append(owners)
    overall = retrieval_figures(originals, np.concatenate(all_queries), np.concatenate(all_owners))
    return {"table": out.embeddings_table, "model": config.model.name, "weights": config.model.weights,
            "weights_checksum": weights.checksum, "model_key": key,
            "sample": len(picked), "gallery": len(picked), "seed": seed, "augmentations": list(AUGMENTATIONS),
            **overall, "by_augmentation": per_augmentation, "statistics": statistics,
            "device": embedder.device, "precision": embedder.precision,
            "duration_s": round(time.monotonic() - started, 1)}


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The evaluation in a few lines for a terminal."""
    s = result["statistics"]
    lines = [f"{result['model']} ({result['weights']}, {result['weights_checksum'][:19]}) on {result['table']}",
             f"  retrieval of {len(result['augmentations'])} augmented copies ({', '.join(result['augmentations'])}) "
             f"of {result['sample']} images among their {result['gallery']} originals:",
             f"  recall@1 {result['recall_at_1']:.3f}, recall@5 {result['recall_at_5']:.3f}, cosine to own original "
             f"{result['same_image_cosine']:.3f} vs others {result['different_image_cosine']:.3f} "
             f"(gap {result['gap']:.3f})"]
    for name, fig in result["by_augmentation"].items():
        lines.append(f"    {name:<10} recall@1 {fig['recall_at_1']:.3f}, recall@5 {fig['recall_at_5']:.3f}, "
                     f"gap {fig['gap']:.3f}")
    norm = s["norm"]
    reasons = f" {s['null_by_reason']}" if s["null_by_reason"] else ""
    lines.append(f"  rows {s['rows']}, without embedding {s['null_embeddings']}{reasons}, with NaN {s['with_nan']}, "
                 f"dim {s['dim']}, norm mean {norm['mean']} (min {norm['min']}, max {norm['max']})")
    return lines
