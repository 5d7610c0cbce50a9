"""Delta Lake readers and writers: every table access of the package goes through here.

A table is addressed by a :class:`TableRef`: a storage path (``s3://b/delta/images``, ``/data/images``) or a
metastore name (``db.images``, ``catalog.schema.images``) in the session's catalog. Everything here speaks to Delta
in SQL (``MERGE INTO``, ``DESCRIBE HISTORY``, ``DESCRIBE DETAIL``, ``ALTER TABLE``) and through the DataFrame
reader and writer, never through Delta's Python ``DeltaTable`` API: the same code then serves path tables and
named tables, in classic sessions and in Spark Connect sessions (where that API needs a server plugin).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from image_embeddings.core.tableref import Table, TableRef, table_ref

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, DataFrameWriter, Row, SparkSession

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
    return any(marker in text for marker in _CONFLICT_MARKERS)


# The same conflicts as they reach Python through py4j (the Java class or Delta's error class in the text); a first
# run that lost the race to create a table sees PATH_ALREADY_EXISTS or ProtocolChangedException.
_CONFLICT_MARKERS = ("PATH_ALREADY_EXISTS", "DELTA_PATH_EXISTS", "ConcurrentAppendException",
                     "ConcurrentDeleteReadException", "ConcurrentDeleteDeleteException", "ConcurrentWriteException",
                     "ConcurrentTransactionException", "ProtocolChangedException", "MetadataChangedException",
                     "DELTA_CONCURRENT_", "DELTA_PROTOCOL_CHANGED", "DELTA_METADATA_CHANGED",
                     # a named table another writer created meanwhile (Spark's catalog, not Delta, says so)
                     "TABLE_OR_VIEW_ALREADY_EXISTS", "TableAlreadyExistsException")


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


def sql_table(table: Table) -> str:
    """The table in Spark SQL (:attr:`TableRef.sql`)."""
    return table_ref(table).sql


# How "no such table" reaches Python, classic or Connect, Delta 3 or 4: a path without a Delta log, a name the
# catalog lacks (or a database it lacks).
_MISSING_MARKERS = ("DELTA_MISSING_DELTA_TABLE", "is not a Delta table", "DELTA_TABLE_NOT_FOUND",
                    "TABLE_OR_VIEW_NOT_FOUND", "NoSuchTableException", "SCHEMA_NOT_FOUND", "NoSuchDatabaseException",
                    "NoSuchNamespaceException", "PATH_NOT_FOUND", "DELTA_PATH_DOES_NOT_EXIST",
                    "java.io.FileNotFoundException", "DELTA_ONLY_OPERATION", "only supported for Delta tables")
_NO_SCHEMA_MARKERS = ("SCHEMA_NOT_FOUND", "NoSuchDatabaseException", "NoSuchNamespaceException")


def _says(exc: BaseException, markers: tuple[str, ...]) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return any(marker in text for marker in markers)


class MissingSchemaError(RuntimeError):
    """A named table's database (schema) does not exist in the session's catalog."""


def table_detail(spark: SparkSession, table: Table) -> Row | None:
    """``DESCRIBE DETAIL`` of a Delta table (format, location, properties, ...), None when there is none.

    A name that holds a table of another format is refused (:class:`IncompatibleTableError`): writing beside it
    would fail later, less clearly.
    """
    ref = table_ref(table)
    try:
        row = spark.sql(f"DESCRIBE DETAIL {ref.sql}").first()
    except Exception as exc:
        if _says(exc, _MISSING_MARKERS):
            return None
        raise
    if row is not None and str(row["format"] or "").lower() == "delta":
        return row
    if ref.is_name and row is not None:
        raise IncompatibleTableError(f"{ref}: is a {row['format']} table, not a Delta table. Nothing was changed. "
                                     "Name another table, or convert this one (CONVERT TO DELTA) and run again.")
    return None  # Delta 3 describes a folder without a Delta log as a non-Delta path


def table_exists(spark: SparkSession, table: Table) -> bool:
    """Return True when ``table`` is a Delta table (a path with a Delta log, or a name in the catalog)."""
    return table_detail(spark, table) is not None


def table_location(spark: SparkSession, table: Table) -> str | None:
    """Where the table's files are, as the catalog or the Delta log says; None when there is no table."""
    row = table_detail(spark, table)
    return None if row is None else str(row["location"])


def table_properties(spark: SparkSession, table: Table) -> dict[str, str]:
    """The table's properties (``DESCRIBE DETAIL``); empty when there is no table."""
    row = table_detail(spark, table)
    return {} if row is None else dict(row["properties"] or {})


def read(spark: SparkSession, table: Table, version: int | None = None) -> DataFrame:
    """The rows of a Delta table, at ``version`` (time travel) or the latest; fails when there is none."""
    ref = table_ref(table)
    if ref.is_name:
        if version is None:
            return spark.read.table(ref.sql)
        return spark.sql(f"SELECT * FROM {ref.sql} VERSION AS OF {int(version)}")
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", int(version))
    return reader.load(ref.value)


def read_table(spark: SparkSession, table: Table) -> DataFrame | None:
    """Read a Delta table, or return None when there is none yet."""
    if not table_exists(spark, table):
        return None
    return read(spark, table)


def history(spark: SparkSession, table: Table, limit: int | None = None) -> DataFrame:
    """``DESCRIBE HISTORY`` of a Delta table, newest commit first (the last ``limit`` commits, else all)."""
    text = f"DESCRIBE HISTORY {table_ref(table).sql}"
    return spark.sql(text if limit is None else f"{text} LIMIT {int(limit)}")


def table_version(spark: SparkSession, table: Table) -> int | None:
    """Return the latest version of a Delta table, or None when it does not exist."""
    try:
        row = history(spark, table, 1).select("version").first()
    except Exception as exc:
        if _says(exc, _MISSING_MARKERS):
            return None
        raise
    return None if row is None else int(row[0])


def _quoted(column: str) -> str:
    return "`" + column.replace("`", "``") + "`"


def merge_changes(spark: SparkSession, table: Table, upserts: DataFrame, deletes: DataFrame | None,
                  key: str | list[str], target_filter: str | None = None,
                  metadata: dict[str, Any] | None = None) -> None:
    """Insert or replace ``upserts`` and delete the ``key`` rows listed in ``deletes``, in one Delta commit.

    Creates the table from ``upserts`` when it does not exist yet (with :func:`table_features`). Readers see
    either the old version or the new one, never a part of the change. ``target_filter`` (SQL on the target,
    alias ``t``) narrows the files the MERGE may touch, so Delta skips the others; ``metadata`` is recorded with
    the commit (:func:`commit_state` reads it back). A SQL ``MERGE INTO`` with the changes as a temporary view.
    """
    from pyspark.sql import functions as F

    ref = table_ref(table)
    if not table_exists(spark, ref):
        create(spark, ref, upserts, metadata)
        return
    keys = [key] if isinstance(key, str) else key
    columns = [_quoted(c) for c in upserts.columns]
    source = upserts.withColumn("_delete", F.lit(False))
    if deletes is not None:
        source = source.unionByName(deletes.select(*keys).withColumn("_delete", F.lit(True)),
                                    allowMissingColumns=True)
    condition = " AND ".join(f"t.{_quoted(k)} = s.{_quoted(k)}" for k in keys)
    if target_filter:
        condition = f"({target_filter}) AND {condition}"
    view = f"image_embeddings_merge_{uuid.uuid4().hex}"
    statement = (f"MERGE INTO {ref.sql} AS t USING {view} AS s ON {condition} "
                 "WHEN MATCHED AND s._delete THEN DELETE "
                 f"WHEN MATCHED THEN UPDATE SET {', '.join(f'{c} = s.{c}' for c in columns)} "
                 f"WHEN NOT MATCHED AND NOT s._delete THEN INSERT ({', '.join(columns)}) "
                 f"VALUES ({', '.join(f's.{c}' for c in columns)})")
    source.createOrReplaceTempView(view)
    try:
        with _commit_metadata(spark, metadata):
            spark.sql(statement)
    finally:
        spark.catalog.dropTempView(view)


# Delta releases that write deletion vectors in MERGE, UPDATE and DELETE (3.1; reads since 2.3).
DELETION_VECTORS_SINCE = (3, 1)
STATE_KEY = "image_embeddings"


def delta_version(spark: SparkSession) -> tuple[int, int]:
    """The (major, minor) version of the Delta Lake jar this session runs, (0, 0) when it cannot tell."""
    try:
        text = str(spark._jvm.io.delta.VersionKt.getVersion())  # type: ignore[union-attr]
    except Exception:
        try:
            from importlib.metadata import version

            text = version("delta-spark")
        except Exception:
            return (0, 0)
    parts = re.findall(r"\d+", text)
    return (int(parts[0]), int(parts[1])) if len(parts) >= 2 else (0, 0)


def table_features(columns: list[str] | tuple[str, ...], delta: tuple[int, int]) -> dict[str, str]:
    """Table properties for a table this package creates, given its columns and the Delta version.

    Change data feed always (every supported Delta has it): later runs find what changed from it. Deletion
    vectors from Delta 3.1 on, so a MERGE marks replaced rows instead of rewriting whole files; not for tables
    with a column named ``path``, where Delta's MERGE with deletion vectors fails with ``AMBIGUOUS_REFERENCE``
    (delta-io/delta#5296).
    """
    features = {"delta.enableChangeDataFeed": "true"}
    if delta >= DELETION_VECTORS_SINCE and "path" not in columns:
        features["delta.enableDeletionVectors"] = "true"
    return features


def _save(writer: DataFrameWriter, ref: TableRef, creating: bool = True) -> None:
    """Write through ``writer`` to a path, or to a name in the session's catalog (``saveAsTable``), at the
    name's external location when it is created (managed without one)."""
    if not ref.is_name:
        writer.save(ref.value)
        return
    if creating and ref.location:
        from image_embeddings.core.uri import qualify

        writer = writer.option("path", qualify(ref.location))
    try:
        writer.saveAsTable(ref.sql)
    except Exception as exc:
        if _says(exc, _NO_SCHEMA_MARKERS):
            database = ref.value.rsplit(".", 1)[0]
            raise MissingSchemaError(
                f"{ref}: the database (schema) {database} does not exist in the session's catalog; nothing was "
                f"written. Create it (CREATE SCHEMA {database}) or name a table in an existing one.") from exc
        raise


def create(spark: SparkSession, table: Table, df: DataFrame, metadata: dict[str, Any] | None = None,
           mode: str = "error") -> None:
    """Write ``df`` as a new table (or, with ``mode="overwrite"``, replace one) with :func:`table_features`.

    ``"error"``, not its synonym ``"errorifexists"``, which a Spark Connect writer refuses.
    """
    from image_embeddings.core.spark import session_conf

    ref = table_ref(table)
    features = table_features(df.columns, delta_version(spark))
    defaults = {"spark.databricks.delta.properties.defaults." + k[len("delta."):]: v for k, v in features.items()}
    with session_conf(spark, defaults), _commit_metadata(spark, metadata):
        writer = df.write.format("delta").mode(mode)
        if mode == "overwrite":
            writer = writer.option("overwriteSchema", "true")
        _save(writer, ref)
    if mode == "overwrite":
        ensure_features(spark, ref)
    log.info("%s delta table %s (%s)", "created" if mode != "overwrite" else "rewrote", ref,
             ", ".join(f"{k}={v}" for k, v in sorted(features.items())))


def overwrite_where(df: DataFrame, table: Table, condition: str, metadata: dict[str, Any] | None = None) -> None:
    """Replace the rows matching ``condition`` (SQL) with ``df`` in one commit; create the table when needed."""
    from pyspark.sql import functions as F

    spark = df.sparkSession
    ref = table_ref(table)
    if not table_exists(spark, ref):
        create(spark, ref, df, metadata)
        return
    with _commit_metadata(spark, metadata):
        if ref.is_name:  # the DataFrameWriterV2's overwrite by condition is Delta's replaceWhere
            df.writeTo(ref.sql).overwrite(F.expr(condition))
        else:
            df.write.format("delta").mode("overwrite").option("replaceWhere", condition).save(ref.value)


def ensure_features(spark: SparkSession, table: Table) -> list[str]:
    """Turn on the :func:`table_features` an existing table lacks (a table of an older release); return them."""
    ref = table_ref(table)
    current = {r["key"]: r["value"] for r in spark.sql(f"SHOW TBLPROPERTIES {ref.sql}").collect()}
    columns = read(spark, ref).columns
    missing = {k: v for k, v in table_features(columns, delta_version(spark)).items() if current.get(k) != v}
    if missing:
        settings = ", ".join(f"'{k}' = '{v}'" for k, v in sorted(missing.items()))
        spark.sql(f"ALTER TABLE {ref.sql} SET TBLPROPERTIES ({settings})")
        log.info("upgraded delta table %s: %s", ref, settings)
    return sorted(missing)


@contextlib.contextmanager
def _commit_metadata(spark: SparkSession, metadata: dict[str, Any] | None) -> Iterator[None]:
    """Record ``metadata`` (as JSON under :data:`STATE_KEY`) in the commits made inside the block."""
    if metadata is None:
        yield
        return
    from image_embeddings.core.spark import session_conf

    text = json.dumps({STATE_KEY: metadata}, sort_keys=True, separators=(",", ":"))
    with session_conf(spark, {"spark.databricks.delta.commitInfo.userMetadata": text}):
        yield


def commit_state(spark: SparkSession, table: Table, match: Callable[[dict[str, Any]], bool] = lambda s: True,
                 limit: int = 200) -> tuple[int, dict[str, Any]] | None:
    """The newest commit of ``table`` whose recorded metadata satisfies ``match``: (version, metadata).

    Reads the Delta log's commit infos only (the last ``limit`` commits first, then all of them).
    """
    ref = table_ref(table)
    if not table_exists(spark, ref):
        return None
    for last in (limit, None):
        rows = history(spark, ref, last).select("version", "userMetadata").orderBy(
            "version", ascending=False).collect()
        for row in rows:
            try:
                state = json.loads(row["userMetadata"] or "{}").get(STATE_KEY)
            except (ValueError, AttributeError):
                continue
            if isinstance(state, dict) and match(state):
                return int(row["version"]), state
        if len(rows) < limit:
            break
    return None


def record_state(spark: SparkSession, table: Table, metadata: dict[str, Any]) -> None:
    """Record ``metadata`` in a commit of its own that changes no data (for runs that had nothing to write)."""
    ref = table_ref(table)

    def commit() -> None:
        with _commit_metadata(spark, metadata):
            spark.sql(f"ALTER TABLE {ref.sql} SET TBLPROPERTIES ('image_embeddings.state' = 'in commit info')")

    with_commit_retries(f"{ref} (state record)", commit)


def key_ranges(values: list[str], limit: int = 64, group: Callable[[str], str] | None = None
               ) -> list[tuple[str, str]]:
    """At most ``limit`` (first, last) ranges that cover ``values``: one per ``group`` (one per value without it)
    while there are few, else consecutive groups merged.

    A filter on these (:func:`in_ranges`) lets Delta skip the data files that hold none of the values, by their
    min/max statistics; an ``IN`` list would not: Delta prunes it by the list's overall minimum and maximum.
    """
    spans: dict[str, tuple[str, str]] = {}
    for value in sorted(set(values)):
        name = value if group is None else group(value)
        spans[name] = (spans[name][0], value) if name in spans else (value, value)
    ordered = list(spans.values())
    if len(ordered) <= limit:
        return ordered
    size = -(-len(ordered) // limit)
    return [(ordered[i][0], ordered[min(i + size, len(ordered)) - 1][1]) for i in range(0, len(ordered), size)]


def path_ranges(paths: list[str], limit: int = 64) -> list[tuple[str, str]]:
    """:func:`key_ranges` of file paths, one per folder while there are few folders: a night's files sit in the
    data files that night's run wrote."""
    return key_ranges(paths, limit, group=lambda path: path.rsplit("/", 1)[0])


def in_ranges(column: str, ranges: list[tuple[str, str]]) -> Column:
    """True where ``column`` falls in one of ``ranges`` (inclusive); False when there are none."""
    from functools import reduce

    from pyspark.sql import functions as F

    if not ranges:
        return F.lit(False)
    return reduce(lambda a, b: a | b, [(F.col(column) >= lo) & (F.col(column) <= hi) for lo, hi in ranges])


def ranges_sql(column: str, ranges: list[tuple[str, str]]) -> str:
    """:func:`in_ranges` as Spark SQL (for a MERGE's target condition)."""
    if not ranges:
        return "false"
    return "(" + " OR ".join(f"({column} >= {sql_string(lo)} AND {column} <= {sql_string(hi)})"
                             for lo, hi in ranges) + ")"


# Up to this many keys, lookups by key carry them as ranges (:func:`key_ranges`) that Delta prunes files by.
MAX_LITERAL_KEYS = 100_000


def literal_keys(keys: DataFrame, column: str, known: int | None = None) -> list[str] | None:
    """The distinct values of ``column`` in ``keys`` when there are at most :data:`MAX_LITERAL_KEYS`, else None."""
    if known is not None and known > MAX_LITERAL_KEYS:
        return None
    found = [r[0] for r in keys.select(column).where(f"`{column}` IS NOT NULL").distinct()
             .limit(MAX_LITERAL_KEYS + 1).collect()]  # one job: no separate count
    return None if len(found) > MAX_LITERAL_KEYS else found


def clustered(df: DataFrame, key: str, rows: int, rows_per_file: int) -> DataFrame:
    """``df`` range-partitioned and sorted by ``key`` into about ``rows / rows_per_file`` parts (data files).

    Each data file then holds a narrow range of keys: later lookups and MERGEs by key touch few, bounded files.
    """
    return df.repartitionByRange(max(1, -(-rows // rows_per_file)), key).sortWithinPartitions(key)


def sql_string(text: str) -> str:
    """``text`` as a Spark SQL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def change_feed(spark: SparkSession, table: Table, starting: int, ending: int | None = None) -> DataFrame:
    """The change data feed of ``table`` from version ``starting`` (to ``ending``, else the latest), unread."""
    ref = table_ref(table)
    reader = spark.read.format("delta").option("readChangeFeed", "true").option("startingVersion", int(starting))
    if ending is not None:
        reader = reader.option("endingVersion", int(ending))
    return reader.table(ref.sql) if ref.is_name else reader.load(ref.value)


def read_changes(spark: SparkSession, table: Table, after_version: int, to_version: int,
                 columns: tuple[str, ...]) -> DataFrame | None:
    """``columns`` of the change data feed of ``table`` for versions ``after_version + 1`` to ``to_version``, cached.

    None, with a warning, when the feed cannot be read (not enabled for those versions, or vacuumed): the
    caller then compares whole tables once.
    """
    from pyspark import StorageLevel

    try:
        changes = (change_feed(spark, table, after_version + 1, to_version).select(*columns)
                   .persist(StorageLevel.MEMORY_AND_DISK))
        changes.count()
    except Exception as exc:
        log.warning("change data feed of %s after version %d unreadable, comparing every row: %s", table,
                    after_version, str(exc).splitlines()[0][:300])
        return None
    return changes


def overwrite(df: DataFrame, table: Table) -> None:
    """Replace a table's content and schema in one commit."""
    _save(df.write.format("delta").mode("overwrite").option("overwriteSchema", "true"), table_ref(table))


def append(df: DataFrame, table: Table) -> None:
    """Append rows to a Delta table, creating it when needed; new columns extend an older table's schema."""
    ref = table_ref(table)
    creating = ref.location is not None and not table_exists(df.sparkSession, ref)
    _save(df.write.format("delta").mode("append").option("mergeSchema", "true"), ref, creating)


class IncompatibleTableError(RuntimeError):
    """A table lacks columns this version needs (written by an older version, or by something else)."""


def require_columns(df: DataFrame, path: Table, needed: tuple[str, ...], what: str) -> None:
    """Refuse, naming the missing columns, a table that cannot be extended in place; nothing is changed."""
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise IncompatibleTableError(
            f"{what} at {path} lacks column(s) {', '.join(missing)}: it was written by an older version of "
            "spark-image-embeddings or by another tool. Nothing was changed. Point the output at a new location, "
            "or add the columns (ALTER TABLE ... ADD COLUMNS) and run again.")


def add_columns(spark: SparkSession, path: Table, existing: DataFrame, target: DataFrame, what: str) -> list[str]:
    """Add the columns of ``target`` that the table lacks (rows kept, null there until written); return them.

    A column of both whose type differs is refused, naming it, before anything is written: the rows cannot be
    merged into it, and replacing the table from this run's rows could lose others.
    """
    have = {f.name.lower(): f.dataType.simpleString() for f in existing.schema.fields}
    retyped = [f"{f.name} ({have[f.name.lower()]} in the table, {f.dataType.simpleString()} now)"
               for f in target.schema.fields
               if f.name.lower() in have and have[f.name.lower()] != f.dataType.simpleString()]
    if retyped:
        raise IncompatibleTableError(
            f"{what} at {path}: column(s) changed type: {', '.join(retyped)}. Nothing was changed. Give the "
            "input column its earlier type again, or point the output at a new table location and run again.")
    missing = [f for f in target.schema.fields if f.name.lower() not in have]
    if not missing:
        return []
    columns = ", ".join(f"`{f.name.replace('`', '``')}` {f.dataType.simpleString()}" for f in missing)
    with_commit_retries(f"{path} (new columns)",
                        lambda: spark.sql(f"ALTER TABLE {sql_table(path)} ADD COLUMNS ({columns})"))
    log.info("%s at %s: added column(s) %s, rows kept", what, path, columns)
    return [f.name for f in missing]


@dataclass(frozen=True)
class ChangesSince:
    """A table's changes after the version a stage recorded. ``reason`` says why the stage must compare every row
    instead (None: it need not); ``changes`` is None when nothing changed (or a full pass is needed)."""

    reason: str | None
    changes: DataFrame | None = None


def changes_since(spark: SparkSession, table: Table, since: int, version: int, columns: tuple[str, ...],
                  what: str) -> ChangesSince:
    """The change data feed of ``table`` after version ``since`` up to ``version`` (``what``: the
    table's name in the reason), the one way every stage reads what changed since its recorded state."""
    if since > version:
        return ChangesSince(f"full: recorded {what} version is ahead of the table")
    if since == version:
        return ChangesSince(None)
    changes = read_changes(spark, table, since, version, columns)
    if changes is None:
        return ChangesSince("full: change data feed unavailable")
    return ChangesSince(None, changes)


@dataclass(frozen=True)
class KeyScope:
    """The rows whose ``column`` is among ``keys``' (a small, cached frame of that column), and ``ranges`` of
    those keys (None past :data:`MAX_LITERAL_KEYS`), so Delta and Parquet skip data files that cannot hold them."""

    keys: DataFrame
    column: str
    ranges: list[tuple[str, str]] | None

    def restrict(self, df: DataFrame) -> DataFrame:
        """``df``'s rows with one of the keys: by the ranges first, then by a broadcast semi-join."""
        from pyspark.sql import functions as F

        near = df if self.ranges is None else df.where(in_ranges(self.column, self.ranges))
        return near.join(F.broadcast(self.keys), self.column, "left_semi")


def key_scope(keys: DataFrame, column: str) -> KeyScope:
    """The :class:`KeyScope` of ``keys``, the one way every stage restricts its reads to changed keys."""
    ids = literal_keys(keys, column)
    return KeyScope(keys, column, None if ids is None else key_ranges(ids))
