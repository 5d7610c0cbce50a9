"""A nearest-neighbour index (faiss) of one model's rows of the embeddings table, stored beside the table.

An index location (``index.location``, default ``<embeddings_table>_index``; local or ``s3a://``) holds one folder
per model key::

    manifest.json                   the table version covered, the index type, the segments in order, the sha256
                                    of every file it names and the files it retired (and when)
    base-v12-1a2b3c4d.faiss         the base segment: every vector of version 12, filled per Spark partition
    base-v12-1a2b3c4d.ids.parquet   its vector ids with image_id and sha256
    base-v12-1a2b3c4d.trained.faiss the trained, empty index that every later segment starts from
    delta-v12-v15-5e6f7a8b.faiss    an update: the current vectors of the image_ids that changed in versions 13-15
    delta-v12-v15-5e6f7a8b.ids.parquet  their ids (kind ``add``) and every changed image_id's id (kind ``remove``)

A full build trains the coarse quantizer on a sample and fills the base per partition (merged on the driver).
An update reads the table's change data feed since the covered version and writes one small segment: its cost
follows the night's changed rows, not the table. Loading applies the segments in order (removals, then
additions). Once the rows changed since the base pass ``index.rebuild_fraction`` of it (its clusters drift), or
when the change feed cannot be read, an update builds a new base instead.

The folder is shared by builds, updates and readers. Every writer writes new files under names no other writer
uses (a random suffix), then replaces the manifest only if it is still the one it read (a compare-and-swap: a
conditional put on S3, a check under a lock file locally); otherwise it fails and leaves the other writer's
manifest whole. A file the manifest stops naming is retired, and deleted by a later write only once
:data:`GRACE_SECONDS` have passed, so a reader that read the previous manifest can still load it. Names in a
manifest must be plain file names in the folder, and every file is checked against its recorded sha256 when
loaded: a damaged index is an error, never a wrong answer.

The index's parts live beside this module: the folder's storage and names (:mod:`.store`), the index type and its
file forms (:mod:`.kinds`), filling from Spark (:mod:`.fill`) and the manifest (:mod:`.manifest`); here: building
and updating it from the table, loading it once per process, searching, and the command's line.
"""

from __future__ import annotations

import io
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from image_embeddings.core.config import AppConfig
from image_embeddings.core.lease import leased
from image_embeddings.core.vectors import unit_rows
from image_embeddings.search.fill import (
    LOCAL_FILL_ROWS,
    ORDER,
    fill,
    fill_from_feed,
    model_table,
    vector_batches,
)
from image_embeddings.search.kinds import (
    _deserialize,
    _ids_table,
    _parquet,
    _serialize,
    choose_type,
    list_count,
    new_index,
    vector_ids,
)
from image_embeddings.search.manifest import Manifest, ManifestRead, _files, read_manifest, read_state, write_manifest
from image_embeddings.search.store import REBUILD, IndexDamagedError, Store, VectorIndexError, sha256_hex, store_for

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import SparkSession

    from image_embeddings.core.tables import Table

log = logging.getLogger(__name__)
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which of its builds loads is no news

# Delta operations that change no rows: an index covering the version before them is still fresh.
NO_DATA_CHANGE = ("OPTIMIZE", "VACUUM START", "VACUUM END", "SET TBLPROPERTIES", "UNSET TBLPROPERTIES")










# ---------------------------------------------------------------------------------------------------------
# names and storage













# ---------------------------------------------------------------------------------------------------------
# vectors and index types






















# ---------------------------------------------------------------------------------------------------------
# Spark side: the rows of one model, their vectors on the driver, partial indexes per partition
















# ---------------------------------------------------------------------------------------------------------
# manifest, build, update




















def build_index(spark: SparkSession, config: AppConfig, version: int, reason: str,
                grace_s: float | None = None) -> dict[str, Any]:
    """Train on a sample of the rows at ``version`` and fill a new base segment; replaces the previous index
    (whose files are retired, see :func:`write_manifest`)."""
    started = time.perf_counter()
    settings = config.index
    rows, key = model_table(spark, config, version)
    store = store_for(config, key)
    read = read_state(store, lenient=True)  # read before the work: a writer that replaces it meanwhile wins
    n = rows.count()
    kind = choose_type(n, settings)
    nlist = min(list_count(kind, n), max(1, n))
    # faiss wants about 40 points per list; product quantizers 10,000 or so; an exact index needs none.
    sample_size = 1 if kind == "flat" else min(n, settings.train_rows, max(40 * nlist, 10_000))
    sample = rows.sample(fraction=min(1.0, 1.2 * sample_size / max(n, 1)), seed=17).limit(sample_size)
    training = np.concatenate([v for _, _, v in vector_batches(sample)] or [np.zeros((0, 0), np.float32)])
    if not len(training):  # a sampled fraction of a tiny sample can come back empty
        training = np.concatenate([v for _, _, v in vector_batches(rows.limit(sample_size))]
                                  or [np.zeros((0, 0), np.float32)])
    if not len(training):
        raise VectorIndexError(f"the embeddings table {config.output.embeddings_table} has no embedded rows for "
                               f"model {key} at version {version}")
    index = new_index(kind, training.shape[1], nlist)
    index.train(training)
    trained = _serialize(index)
    merged, ids = fill(spark, rows, trained)
    manifest, written = commit_base(store, read, key, config.output.embeddings_table, version, trained, merged, ids,
                                    kind=kind, nlist=nlist, grace_s=grace_s)
    seconds = time.perf_counter() - started
    log.info("index built for model %s at table version %d: %s, %d rows, %d lists, %.1f s (%s)", key, version,
             kind, manifest.rows, nlist, seconds, reason)
    return {"action": "built", "reason": reason, "model_key": key, "version": version, "type": kind,
            "rows": manifest.rows, "nlist": nlist, "elapsed_s": round(seconds, 3), "location": store.location,
            "bytes": written}


def commit_base(store: Store, read: ManifestRead, key: str, table: str, version: int, trained: bytes, index: Any,
                ids: Any, *, kind: str, nlist: int, grace_s: float | None = None) -> tuple[Manifest, int]:
    """Write a base segment (the ``trained`` empty index, the filled ``index`` and its ``ids``) under new names,
    then a manifest naming only it (:func:`write_manifest`); returns the manifest and the bytes written."""
    _check_unique(ids)
    name = f"base-v{version}-{secrets.token_hex(4)}"  # never a name that a live or retired manifest uses
    files = {f"{name}.trained.faiss": trained, f"{name}.faiss": _serialize(index), f"{name}.ids.parquet": _parquet(ids)}
    for file_name, data in files.items():
        store.write(file_name, data)
    now = time.time()
    rows = int(index.ntotal)
    manifest = Manifest(model_key=key, table=table, version=version, type=kind, nlist=nlist, dim=int(index.d),
                        trained=f"{name}.trained.faiss", base_rows=rows, rows=rows,
                        segments=[{"name": name, "added": rows, "removed": 0, "from_version": None,
                                   "to_version": version}],
                        built_at=now, updated_at=now, checksums={n: sha256_hex(d) for n, d in files.items()})
    write_manifest(store, manifest, read, list(files), grace_s)
    return manifest, sum(len(data) for data in files.values())


def commit_update(store: Store, read: ManifestRead, version: int, touched: Sequence[str], existed: int,
                  delta: Any = None, ids: Any = None, grace_s: float | None = None) -> tuple[Manifest, int]:
    """Append a segment to the manifest ``read`` (``delta`` holding the vectors ``ids`` adds; removing the
    ``touched`` image_ids, ``existed`` of which were indexed) and move it to ``version``; with nothing touched
    only the covered version moves. Returns the manifest and the vectors added."""
    import pyarrow as pa

    manifest = read.manifest
    assert manifest is not None, "an update starts from a manifest"
    added = 0
    written: list[str] = []
    if touched:
        _check_unique(ids)
        name = f"delta-v{manifest.version}-v{version}-{secrets.token_hex(4)}"
        removed = _ids_table(vector_ids(touched), touched, [None] * len(touched), "remove")
        for file_name, data in ((f"{name}.faiss", _serialize(delta)),
                                (f"{name}.ids.parquet", _parquet(pa.concat_tables([removed, ids])))):
            store.write(file_name, data)
            manifest.checksums[file_name] = sha256_hex(data)
            written.append(file_name)
        added = int(delta.ntotal)
        manifest.segments.append({"name": name, "added": added, "removed": len(touched),
                                  "from_version": manifest.version, "to_version": version})
        manifest.rows += added - existed
    manifest.version = version
    manifest.changed_since_base += len(touched)
    manifest.updated_at = time.time()
    write_manifest(store, manifest, read, written, grace_s)
    return manifest, added


def _check_unique(ids: Any) -> None:
    import pyarrow.compute as pc

    if len(pc.unique(ids.column("id"))) != ids.num_rows:
        raise VectorIndexError("two image_ids share a 63-bit vector id (or an image_id is duplicated for one model); "
                               "the index cannot tell them apart")


def update_index(spark: SparkSession, config: AppConfig, full: bool = False,
                 grace_s: float | None = None) -> dict[str, Any]:
    """Bring the index of this config's model to the embeddings table's current version.

    Writes one segment with the changed image_ids (read from the change data feed since the covered version),
    or a new base when asked (``full``), when there is none, when the feed cannot be read, or once the rows
    changed since the base pass ``index.rebuild_fraction`` of it. Files no longer named are deleted after
    ``grace_s`` (default :data:`GRACE_SECONDS`) by a later write.
    """
    from image_embeddings.core.tables import table_version
    from image_embeddings.search.rows import config_key

    table = config.output.embeddings
    version = table_version(spark, table)
    if version is None:
        raise VectorIndexError(f"there is no embeddings table at {table} yet: run stage 2 first")
    key = config_key(config)
    if full:  # before reading the manifest: a full build also replaces one that cannot be used
        return build_index(spark, config, version, "asked for (--full)", grace_s)
    store = store_for(config, key)
    read = read_state(store)
    manifest = read.manifest
    if manifest is None:
        return build_index(spark, config, version, "no index yet", grace_s)
    if manifest.version == version:
        return {"action": "fresh", "model_key": key, "version": version, "type": manifest.type,
                "rows": manifest.rows, "location": store.location}
    if manifest.version > version:
        return build_index(spark, config, version, f"the index covers version {manifest.version}, newer than "
                                                   f"the table's {version} (table restored?)", grace_s)
    started = time.perf_counter()
    changes = _changes(spark, config, key, manifest.version, version)
    if isinstance(changes, str):
        return build_index(spark, config, version, changes, grace_s)
    night, before = changes
    touched = sorted(before)
    if manifest.changed_since_base + len(touched) > config.index.rebuild_fraction * max(manifest.base_rows, 1):
        return build_index(spark, config, version, f"{manifest.changed_since_base + len(touched)} rows changed "
                                                   f"since the base of {manifest.base_rows} rows (threshold "
                                                   f"{config.index.rebuild_fraction:.0%})", grace_s)
    delta = ids = None
    if touched:
        try:
            trained = _verified(store, manifest, manifest.trained)
        except IndexDamagedError:
            return build_index(spark, config, version, f"the trained index {manifest.trained} is missing or "
                                                       "damaged", grace_s)
        delta, ids = _fill_changed(spark, config, version, night, touched, trained)
    previous_version = manifest.version
    manifest, added = commit_update(store, read, version, touched, sum(before.values()), delta, ids, grace_s)
    seconds = time.perf_counter() - started
    log.info("index of model %s updated from table version %d to %d: %d image_ids changed, %d vectors added, "
             "%.1f s", key, previous_version, version, len(touched), added, seconds)
    return {"action": "updated" if touched else "fresh", "model_key": key, "from_version": previous_version,
            "version": version, "type": manifest.type, "changed": len(touched), "added": added,
            "rows": manifest.rows, "elapsed_s": round(seconds, 3), "location": store.location,
            "segments": len(manifest.segments)}


def _changes(spark: SparkSession, config: AppConfig, key: str, covered: int, version: int
             ) -> tuple[Any, dict[str, bool]] | str:
    """Model ``key``'s change feed after version ``covered`` up to ``version``: (its rows with vectors when few
    enough, else None; for each changed image_id whether it was indexed before), or why to build a base instead."""
    from pyspark.sql import functions as F

    from image_embeddings.core.tables import MAX_LITERAL_KEYS, change_feed

    feed = change_feed(spark, config.output.embeddings, covered + 1, version).where(F.col("model_key") == key)
    try:  # a night's changes: one Arrow collect of the feed, vectors included; more: their keys only
        night: Any = feed.select("image_id", "sha256", "_change_type", "_commit_version", "embedding") \
            .limit(LOCAL_FILL_ROWS + 1).toPandas()
        found: list[Any]
        if len(night) <= LOCAL_FILL_ROWS:
            found = list(zip(night["image_id"], night["_change_type"], night["_commit_version"],
                             night["embedding"].notna(), strict=True))
        else:
            night = None
            found = feed.select("image_id", "_change_type", "_commit_version", F.col("embedding").isNotNull()) \
                .limit(4 * MAX_LITERAL_KEYS + 1).collect()
    except Exception as exc:  # not enabled for those versions, or vacuumed
        return f"the change feed after version {covered} is unreadable: {str(exc).splitlines()[0][:200]}"
    before = existed_before([(r[0], r[1], int(r[2]), bool(r[3])) for r in found])
    if len(found) > 4 * MAX_LITERAL_KEYS or len(before) > MAX_LITERAL_KEYS:
        return f"more than {MAX_LITERAL_KEYS:,} image_ids changed"
    return night, before


def _fill_changed(spark: SparkSession, config: AppConfig, version: int, night: Any, touched: list[str],
                  trained: bytes) -> tuple[Any, Any]:
    """The current vectors of the ``touched`` image_ids in copies of the ``trained`` index."""
    from pyspark.sql import functions as F

    from image_embeddings.core.tables import in_ranges, key_ranges

    if night is not None:  # the feed's last image of each changed row is its current vector
        return fill_from_feed(night, trained)
    rows, _ = model_table(spark, config, version, check=False)  # the manifest names this model
    return fill(spark, rows.where(in_ranges("image_id", key_ranges(touched)) & F.col("image_id").isin(touched)),
                trained)




def existed_before(changes: list[tuple[str, str, int, bool]]) -> dict[str, bool]:
    """For each image_id in the change feed rows (image_id, change type, version, has embedding): whether it had
    an embedding before the first of its changes (then its first row is a preimage or a delete)."""
    first: dict[str, tuple[int, int, str, bool]] = {}
    for image_id, kind, version, has in changes:
        entry = (version, ORDER.get(kind, 1), kind, has)
        if image_id not in first or entry < first[image_id]:
            first[image_id] = entry
    return {i: e[2] in ("update_preimage", "delete") and e[3] for i, e in first.items()}


def _verified(store: Store, manifest: Manifest, name: str) -> bytes:
    """The bytes of a file the manifest names, checked against its recorded sha256 (when it has one)."""
    data = store.read(name)
    if data is None:
        raise IndexDamagedError(f"the index at {store.location} is damaged: it lacks {name}; {REBUILD}")
    expected = manifest.checksums.get(name)
    if expected is not None and sha256_hex(data) != expected:
        raise IndexDamagedError(f"the index at {store.location} is damaged: {name} ({len(data):,} bytes) does not "
                                f"match the sha256 its manifest records (corrupted, truncated or replaced); {REBUILD}")
    return data


def _decoded(store: Store, manifest: Manifest, name: str) -> Any:
    """A verified segment file, deserialized (a faiss index or an ids table)."""
    import pyarrow.parquet as pq

    data = _verified(store, manifest, name)
    try:
        return pq.read_table(io.BytesIO(data)) if name.endswith(".parquet") else _deserialize(data)
    except Exception as exc:  # an unverified (format-1) file can still be broken
        raise IndexDamagedError(f"the index at {store.location} is damaged: {name} cannot be read "
                                f"({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}); "
                                f"{REBUILD}") from exc


# ---------------------------------------------------------------------------------------------------------
# loading and searching


@dataclass
class LoadedIndex:
    """An index with its segments applied, ready to search."""

    index: Any
    manifest: Manifest
    image_ids: pd.Series  # vector id -> image_id
    sha256: pd.Series     # vector id -> sha256

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, list[list[str]], list[list[str | None]]]:
        """Top-``k`` (scores, image_ids, sha256s) of each query row by cosine."""
        q = unit_rows(queries)
        scores, ids = self.index.search(q, k)
        names, shas = [], []
        for row in ids:
            found = row[row >= 0]
            names.append(self.image_ids.reindex(found).tolist())
            shas.append(self.sha256.reindex(found).tolist())
        return scores, names, shas

    def within(self, queries: Any, threshold: float, limit: int) -> set[str]:
        """The image_ids whose cosine to any query row exceeds ``threshold`` (at most ``limit`` per query, the
        nearest first)."""
        lims, scores, ids = self.index.range_search(unit_rows(queries), float(threshold))
        found: set[str] = set()
        for i in range(len(lims) - 1):
            part_ids, part_scores = ids[lims[i]:lims[i + 1]], scores[lims[i]:lims[i + 1]]
            if len(part_ids) > limit:
                part_ids = part_ids[np.argsort(-part_scores, kind="stable")[:limit]]
            found.update(self.image_ids.reindex(part_ids).dropna().tolist())
        return found


def load_index(store: Store, nprobe: int) -> LoadedIndex:
    """Read the base and apply every later segment: its removals, then its additions.

    Each file is checked against the sha256 the manifest records: a missing, corrupted or replaced file is an
    :class:`IndexDamagedError` (a search must not answer from it). Files of a format-1 manifest (no checksums)
    load unverified.
    """
    import pandas as pd

    manifest = read_manifest(store)
    if manifest is None:
        raise VectorIndexError(f"there is no index at {store.location}")
    unverified = [n for n in _files(manifest)[1:] if n not in manifest.checksums]
    if unverified:
        log.warning("the index at %s has no checksums of %s (written by an earlier release): loading them "
                    "unverified; `image-embeddings index --full` records them", store.location, unverified)
    index = None
    maps: list[pd.DataFrame] = []
    for segment in manifest.segments:
        part = _decoded(store, manifest, f"{segment['name']}.faiss")
        ids = _decoded(store, manifest, f"{segment['name']}.ids.parquet").to_pandas()
        removed = ids.loc[ids["kind"] == "remove", "id"].to_numpy(np.int64)
        if index is None:
            index = part
        else:
            if len(removed):
                index.remove_ids(removed)
            index.merge_from(part, 0)
        maps.append(ids[ids["kind"] == "add"])
        if len(removed):
            maps = [m[~m["id"].isin(removed)] for m in maps[:-1]] + [maps[-1]]
    assert index is not None
    index.nprobe = min(nprobe, manifest.nlist)
    table = pd.concat(maps).drop_duplicates("id", keep="last").set_index("id")
    return LoadedIndex(index, manifest, table["image_id"], table["sha256"])


def is_fresh(spark: SparkSession, table: Table, covered: int) -> tuple[bool, int]:
    """Whether no commit after version ``covered`` changed rows (OPTIMIZE, VACUUM and property changes do not),
    and the table's latest version. Reads the last 50 commit infos of the Delta log, no data."""
    from image_embeddings.core.tables import history as table_history

    history = [(int(r[0]), str(r[1])) for r in table_history(spark, table, 50).select("version", "operation").collect()]
    latest = max(v for v, _ in history)
    later = [op for v, op in history if v > covered]
    if covered > latest or len(later) < latest - covered:  # restored, or more commits than were read
        return False, latest
    return all(op in NO_DATA_CHANGE for op in later), latest


_LOADED: dict[tuple[str, int], LoadedIndex] = {}


def cached_index(store: Store, version: int, nprobe: int) -> LoadedIndex:
    """The index covering ``version``, loaded once per Python process (Spark reuses its Python workers)."""
    key = (store.location, version)
    if key not in _LOADED:
        loaded = load_index(store, nprobe)
        if loaded.manifest.version != version:
            raise VectorIndexError(f"the index at {store.location} moved to table version "
                                   f"{loaded.manifest.version} while a job expected {version}")
        _LOADED.clear()
        _LOADED[key] = loaded
    return _LOADED[key]


@leased("index")
def run_index(spark: SparkSession, config: AppConfig, full: bool = False, run_id: str | None = None,
              report_file: str | None = None, run_date: str | None = None) -> Any:
    """:func:`update_index` with a run report (also appended to the runs table)."""
    from image_embeddings.core.report import run_reported

    def work(report: Any) -> None:
        with report.step("index"):
            report.metrics.update(update_index(spark, config, full=full))

    return run_reported("index", work, spark, config.output.runs, run_id, report_file, run_date, rate=None)


def index_line(metrics: dict[str, Any]) -> str:
    """One line saying what ``image-embeddings index`` did."""
    what = {"built": f"built ({metrics.get('reason')})", "updated": "updated", "fresh": "already fresh"}
    line = (f"index {what.get(metrics['action'], metrics['action'])}: {metrics['type']}, {metrics['rows']:,} rows "
            f"of model {metrics['model_key']}, table version {metrics['version']}")
    if metrics["action"] == "updated":
        line += f" (from {metrics['from_version']}: {metrics['changed']:,} image_ids changed, " \
                f"{metrics['added']:,} vectors added, {metrics['segments']} segments)"
    if "bytes" in metrics:
        line += f", {metrics['bytes'] / 1e6:,.1f} MB"
    if "elapsed_s" in metrics:
        line += f", {metrics['elapsed_s']:.1f} s"
    return f"{line}; at {metrics['location']}"
