"""The drift figure each embed run records: this run's embeddings against earlier ones of the same model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from image_embeddings.core.vectors import unit_rows

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

DRIFT_NEW_ROWS = 512  # this run's embeddings sampled for the drift figure


DRIFT_REFERENCE_ROWS = 512  # the table's earlier embeddings it is compared with


DRIFT_SPLIT_BYTES = 4 << 20  # scan split size while reading them


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
    a, b = unit_rows(new), unit_rows(reference)
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    mean_cosine = float((unit_rows(mean_a) @ unit_rows(mean_b).T)[0, 0])
    within = b @ b.T
    np.fill_diagonal(within, -np.inf)
    return {"new_rows": int(len(a)), "reference_rows": int(len(b)), "mean_cosine": round(mean_cosine, 4),
            "nearest_similarity": round(float((a @ b.T).max(axis=1).mean()), 4),
            "nearest_similarity_reference": round(float(within.max(axis=1).mean()), 4)}


def run_drift(new_rows: DataFrame, earlier: DataFrame | None, key: str) -> dict[str, Any]:
    """:func:`drift_figures` of a run's embeddings (up to :data:`DRIFT_NEW_ROWS`) against up to
    :data:`DRIFT_REFERENCE_ROWS` earlier ones of the same model identity. Reads that many rows, not the table."""
    from pyspark.sql import functions as F

    from image_embeddings.core.spark import session_conf

    new = [r[0] for r in new_rows.where(F.col("embedding").isNotNull()).select("embedding")
           .limit(DRIFT_NEW_ROWS).collect()]
    reference = []
    if earlier is not None:
        # Small scan splits: the limit's first task then reads about one data file, not a share of the whole table.
        with session_conf(earlier.sparkSession, {"spark.sql.files.maxPartitionBytes": str(DRIFT_SPLIT_BYTES)}):
            reference = [r[0] for r in earlier.where((F.col("model_key") == key) & F.col("embedding").isNotNull())
                         .select("embedding").limit(DRIFT_REFERENCE_ROWS).collect()]
    return drift_figures(np.asarray(new, dtype=np.float32), np.asarray(reference, dtype=np.float32))
