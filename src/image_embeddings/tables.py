"""Delta Lake readers and writers: every table write of the package goes through here."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

log = logging.getLogger(__name__)

T = TypeVar("T")
COMMIT_ATTEMPTS = 4


class ConcurrentWriteError(RuntimeError):
    """Other writers kept committing to the same table; this run committed nothing there."""


def is_write_conflict(exc: BaseException) -> bool:
    """True for Delta's optimistic-concurrency conflicts, and for a table created by another writer meanwhile."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {"DeltaConcurrentModificationException", "ConcurrentAppendException", "ConcurrentWriteException",
                "ConcurrentDeleteReadException", "ConcurrentDeleteDeleteException", "ConcurrentTransactionException",
                "MetadataChangedException", "ProtocolChangedException"}:
        return True
    text = str(exc)
    return any(marker in text for marker in ("PATH_ALREADY_EXISTS", "DELTA_PATH_EXISTS", "ConcurrentAppendException",
                                             "ConcurrentDeleteReadException"))


def with_commit_retries(what: str, commit: Callable[[], T], attempts: int = COMMIT_ATTEMPTS) -> tuple[T, int]:
    """Run ``commit`` (which must recompute what it writes from the table as it is now) until it commits.

    A conflict with another writer (a notebook rerun beside the nightly job) is retried up to ``attempts`` times
    with a short back-off; past that a :class:`ConcurrentWriteError` says so. Returns the result and the attempt
    count. Delta's atomic commits mean a failed attempt leaves nothing behind.
    """
    for attempt in range(1, attempts + 1):
        try:
            return commit(), attempt
        except Exception as exc:
            if not is_write_conflict(exc):
                raise
            if attempt == attempts:
                raise ConcurrentWriteError(
                    f"{what}: another writer kept committing to the same table; gave up after {attempts} attempts "
                    "(nothing of this run was committed there; run it again)") from exc
            log.warning("%s: concurrent write conflict (%s), retrying (%d/%d)", what, type(exc).__name__, attempt,
                        attempts)
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def table_exists(spark: SparkSession, path: str) -> bool:
    """Return True when ``path`` holds a Delta table."""
    from delta.tables import DeltaTable

    return bool(DeltaTable.isDeltaTable(spark, path))


def read_table(spark: SparkSession, path: str) -> DataFrame | None:
    """Read a Delta table, or return None when there is none yet."""
    if not table_exists(spark, path):
        return None
    return spark.read.format("delta").load(path)


def table_version(spark: SparkSession, path: str) -> int | None:
    """Return the latest version of a Delta table, or None when it does not exist."""
    from delta.tables import DeltaTable

    if not table_exists(spark, path):
        return None
    row = DeltaTable.forPath(spark, path).history(1).select("version").first()
    return None if row is None else int(row[0])


def merge_changes(spark: SparkSession, path: str, upserts: DataFrame, deletes: DataFrame | None,
                  key: str | list[str]) -> None:
    """Insert or replace ``upserts`` and delete the ``key`` rows listed in ``deletes``, in one Delta commit.

    Creates the table from ``upserts`` when it does not exist yet. Readers see either the old version or
    the new one, never a part of the change.
    """
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    if not table_exists(spark, path):
        upserts.write.format("delta").mode("errorifexists").save(path)
        log.info("created delta table %s", path)
        return
    keys = [key] if isinstance(key, str) else key
    columns = upserts.columns
    source = upserts.withColumn("_delete", F.lit(False))
    if deletes is not None:
        source = source.unionByName(deletes.select(*keys).withColumn("_delete", F.lit(True)),
                                    allowMissingColumns=True)
    condition = " AND ".join(f"t.`{k}` = s.`{k}`" for k in keys)
    values: dict[str, str | Column] = {f"`{c}`": f"s.`{c}`" for c in columns}
    (
        DeltaTable.forPath(spark, path).alias("t")
        .merge(source.alias("s"), condition)
        .whenMatchedDelete(condition="s._delete")
        .whenMatchedUpdate(set=values)
        .whenNotMatchedInsert(condition="NOT s._delete", values=values)
        .execute()
    )


def overwrite(df: DataFrame, path: str) -> None:
    """Replace a table's content and schema in one commit."""
    df.write.format("delta").mode("overwrite").option("overwriteSchema", "true").save(path)


def append(df: DataFrame, path: str) -> None:
    """Append rows to a Delta table, creating it when needed; new columns extend an older table's schema."""
    df.write.format("delta").mode("append").option("mergeSchema", "true").save(path)


class IncompatibleTableError(RuntimeError):
    """A table lacks columns this version needs (written by an older version, or by something else)."""


def require_columns(df: DataFrame, path: str, needed: tuple[str, ...], what: str) -> None:
    """Refuse, naming the missing columns, a table that cannot be extended in place; nothing is changed."""
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise IncompatibleTableError(
            f"{what} at {path} lacks column(s) {', '.join(missing)}: it was written by an older version of "
            "spark-image-embeddings or by another tool. Nothing was changed. Point the output at a new location, "
            "or add the columns (ALTER TABLE ... ADD COLUMNS) and run again.")
