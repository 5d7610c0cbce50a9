"""The nearest-neighbour index, `similar` on it and exactly, and the neighbours table, on synthetic embeddings
with cluster structure and the real schema (local Spark and Delta; the index also on the test S3 server)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from image_embeddings.cli import main
from image_embeddings.core.tables import merge_changes
from image_embeddings.search.index import existed_before, load_index, update_index
from image_embeddings.search.kinds import choose_type, list_count, vector_ids
from image_embeddings.search.manifest import read_manifest
from image_embeddings.search.neighbours import update_neighbours
from image_embeddings.search.rows import config_key
from image_embeddings.search.similar import search, top_k
from image_embeddings.search.store import Store, store_for
from image_embeddings.testing.sample import clustered_vector, synthetic_embeddings

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = 40


def _config(make_config: Any, tmp_path: Path, *sets: str) -> Any:
    return make_config(tmp_path / "in", tmp_path / "sales", "model.weights=random:0", *sets,
                       tables=tmp_path / "delta")


def _write(spark: Any, config: Any, start: int, count: int, seed: int = 0, delete: range = range(0)) -> None:
    key = config_key(config)
    rows = synthetic_embeddings(spark, key, start, count, CLUSTERS, seed=seed)
    gone = spark.createDataFrame([(f"syn{i:08d}", key) for i in delete], "image_id string, model_key string")
    merge_changes(spark, config.output.embeddings_table, rows, gone, ["image_id", "model_key"])


def _exact(vectors: dict[str, np.ndarray], query: np.ndarray, k: int, exclude: str | None = None) -> list[str]:
    names = [n for n in vectors if n != exclude]
    scores = np.stack([vectors[n] for n in names]) @ (query / np.linalg.norm(query))
    return [names[i] for i in np.argsort(-scores, kind="stable")[:k]]


def test_ids_types_and_change_feed_bookkeeping() -> None:
    ids = vector_ids([f"img{i}" for i in range(10_000)])
    assert ids.dtype == np.int64 and (ids >= 0).all() and len(set(ids.tolist())) == 10_000
    assert vector_ids(["img7"])[0] == ids[7], "ids are stable across calls (and processes: no Python hash)"
    settings = type("S", (), {"type": "auto", "exact_below": 50_000, "pq_above": 5_000_000})()
    assert [choose_type(n, settings) for n in (10, 49_999, 50_000, 5_000_000, 5_000_001)] == [  # type: ignore[arg-type]
        "flat", "flat", "ivf_sq8", "ivf_sq8", "ivf_pq"]
    assert list_count("flat", 10**6) == 1 and list_count("ivf_sq8", 300_000) == 512
    # a: changed (had one before); b: new; c: new then deleted; d: its old row was an error (no embedding)
    changes = [("a", "update_postimage", 3, True), ("a", "update_preimage", 3, True), ("b", "insert", 4, True),
               ("c", "insert", 3, True), ("c", "delete", 5, True), ("d", "update_preimage", 4, False),
               ("d", "update_postimage", 4, True)]
    assert existed_before(changes) == {"a": True, "b": False, "c": False, "d": False}


def test_store_writes_whole_files_locally(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "idx"))
    assert store.read("manifest.json") is None and store.names() == []
    store.write("a.bin", b"x" * 10)
    store.write("a.bin", b"y")
    assert store.read("a.bin") == b"y" and store.names() == ["a.bin"]
    store.delete(["a.bin", "missing"])
    assert store.names() == []


def test_index_build_update_search_and_staleness(spark: Any, make_config: Any, tmp_path: Path) -> None:
    config = _config(make_config, tmp_path, "index.type=ivf_flat", "index.nprobe=64")
    _write(spark, config, 0, 2_400)
    vectors = {f"syn{i:08d}": clustered_vector(i, CLUSTERS) for i in range(2_400)}

    built = update_index(spark, config)
    assert built["action"] == "built" and built["rows"] == 2_400 and built["type"] == "ivf_flat"
    store = store_for(config, config_key(config))
    base = {n: (Path(store.location) / n).read_bytes() for n in store.names() if n.startswith("base-")}
    loaded = load_index(store, config.index.nprobe)
    queries = [f"syn{i:08d}" for i in range(0, 2_400, 120)]
    hits = 0
    for q in queries:
        _, names, _ = loaded.search(vectors[q][None, :], 11)
        hits += len(set(names[0][1:]) & set(_exact(vectors, vectors[q], 10, exclude=q)))
    assert hits / (10 * len(queries)) >= 0.95, "recall@10 against exact search"

    result = search(spark, config, k=5, image_id="syn00000007")
    assert result.path == "index" and "ivf_flat index of 2,400 rows covering table version 0" in result.detail
    exact = search(spark, config, k=5, image_id="syn00000007", use_index=False)
    assert exact.path == "exact" and [n.image_id for n in exact.neighbours] == _exact(
        vectors, vectors["syn00000007"], 5, exclude="syn00000007")
    assert [n.image_id for n in result.neighbours] == [n.image_id for n in exact.neighbours]

    # A night: 30 new rows, 10 removed, 5 changed. The update writes one small segment; the base is untouched.
    _write(spark, config, 2_400, 30)
    _write(spark, config, 100, 5, seed=9, delete=range(200, 210))
    stale = search(spark, config, k=3, image_id="syn00002405")
    assert stale.path == "exact" and "the index covers table version 0, the table is at 2" in stale.detail
    updated = update_index(spark, config)
    assert (updated["action"], updated["changed"], updated["added"], updated["rows"]) == ("updated", 45, 35, 2_420)
    assert {n: (Path(store.location) / n).read_bytes() for n in base} == base
    delta = [n for n in store.names() if n.startswith("delta-v0-v2") and n.endswith(".faiss")]
    assert len(delta) == 1
    base_faiss = next(n for n in base if n.endswith(".faiss") and not n.endswith(".trained.faiss"))
    assert (Path(store.location) / delta[0]).stat().st_size * 20 < len(base[base_faiss])
    loaded = load_index(store, config.index.nprobe)
    assert loaded.index.ntotal == 2_420 == len(loaded.image_ids)
    _, names, _ = loaded.search(np.stack([clustered_vector(i, CLUSTERS) for i in range(200, 210)]), 20)
    assert not {f"syn{i:08d}" for i in range(200, 210)} & {n for row in names for n in row}, "removed rows gone"
    scores, names, _ = loaded.search(clustered_vector(103, CLUSTERS, seed=9)[None, :], 1)
    assert names[0] == ["syn00000103"] and scores[0][0] > 0.999, "a changed row is found by its new vector"

    # A commit that changes no rows keeps the index fresh; an update then only moves the covered version.
    spark.sql(f"OPTIMIZE delta.`{config.output.embeddings_table}`")
    assert search(spark, config, k=3, image_id="syn00000001").path == "index"
    assert update_index(spark, config)["action"] == "fresh"
    assert read_manifest(store).version == 3  # type: ignore[union-attr]

    # Past the drift threshold an update builds a new base. The old files stay, retired, for the grace period (a
    # reader may have read the old manifest); a later write past it deletes them, never a file still named.
    _write(spark, config, 3_000, 600)
    old = {n for n in store.names() if n.startswith(("base-v0", "delta-"))}
    rebuilt = update_index(spark, config)
    assert rebuilt["action"] == "built" and "645 rows changed since the base of 2400 rows" in rebuilt["reason"]
    assert rebuilt["rows"] == 3_020 and old <= set(store.names())
    assert set(read_manifest(store).retired) == old  # type: ignore[union-attr]
    assert update_index(spark, config, full=True, grace_s=0)["rows"] == 3_020
    named = set(read_manifest(store).checksums)  # type: ignore[union-attr]
    assert set(store.names()) == named | {"manifest.json"} and len(named) == 3


def test_exact_search_scores_in_tasks_and_on_the_driver_alike(spark: Any, make_config: Any, tmp_path: Path) -> None:
    config = _config(make_config, tmp_path)
    _write(spark, config, 0, 600)
    rows = spark.read.format("delta").load(config.output.embeddings_table).repartition(7)
    query = clustered_vector(5, CLUSTERS)
    on_driver = top_k(rows, query, 8, small_table_rows=10_000)
    in_tasks = top_k(rows, query, 8, small_table_rows=0)
    assert [n.image_id for n in in_tasks] == [n.image_id for n in on_driver]
    assert np.allclose([n.score for n in in_tasks], [n.score for n in on_driver], atol=1e-5)


def test_neighbours_table_full_then_incremental(spark: Any, make_config: Any, tmp_path: Path) -> None:
    config = _config(make_config, tmp_path, "index.type=flat")
    _write(spark, config, 0, 800)
    path = config.index.neighbours_for(config.output.embeddings_table)
    first = update_neighbours(spark, config, k=5)
    assert first["action"] == "full" and first["rows_written"] == 800

    _write(spark, config, 800, 8)
    _write(spark, config, 40, 2, seed=5, delete=range(60, 64))
    second = update_neighbours(spark, config, k=5)
    assert second["action"] == "updated" and second["changed"] == 14 and second["rows_removed"] == 4
    assert second["rows_written"] < 400, "only the changed rows and their neighbourhoods are rewritten"

    vectors = {f"syn{i:08d}": clustered_vector(i, CLUSTERS) for i in range(808) if not 60 <= i < 64}
    vectors.update({f"syn{i:08d}": clustered_vector(i, CLUSTERS, seed=5) for i in (40, 41)})
    table = {r["image_id"]: [n["image_id"] for n in r["neighbours"]]
             for r in spark.read.format("delta").load(path).collect()}
    assert set(table) == set(vectors), "a row per current image, none for removed ones"
    removed = {f"syn{i:08d}" for i in range(60, 64)}
    assert not removed & {n for found in table.values() for n in found}, "removed images are in no list"
    recall = np.mean([len(set(found) & set(_exact(vectors, vectors[i], 5, exclude=i))) / 5
                      for i, found in table.items()])
    assert recall >= 0.95, f"every list matches exact search after the update (recall {recall:.3f})"
    assert update_neighbours(spark, config, k=5)["action"] == "fresh"
    other = update_neighbours(spark, config, k=3)
    assert (other["action"], other["reason"], other["rows_written"]) == ("full", "k changed from 5", 804)
    assert {len(r[0]) for r in spark.read.format("delta").load(path).select("neighbours").collect()} == {3}


def test_index_on_s3_and_the_commands(spark: Any, make_config: Any, s3_server: Any, tmp_path: Path,
                                      capsys: Any) -> None:
    s3_server.client().create_bucket(Bucket="vectors")
    sets = ["model.weights=random:0", "index.location=s3a://vectors/index", "index.type=flat"]
    config = _config(make_config, tmp_path, *sets)
    _write(spark, config, 0, 300)
    args = ["--config", str(REPO / "conf" / "local.yaml"), "--set", f"s3.endpoint={s3_server.endpoint}",
            "--set", "s3.ssl=false", "--set", f"output.embeddings_table={config.output.embeddings_table}",
            "--set", f"output.images_table={config.output.images_table}",
            "--set", f"output.runs_table={config.output.runs_table}",
            "--set", f"spark.ivy_dir={REPO / '.cache' / 'ivy'}", *[a for s in sets for a in ("--set", s)]]
    assert main(["index", *args]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("index built (no index yet): flat, 300 rows of model resnet50-") and \
        "at s3a://vectors/index/resnet50-" in line
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket="vectors")["Contents"]]
    names = sorted(k.rsplit("/", 1)[1] for k in keys)
    assert len(names) == 4 and names[3] == "manifest.json" and re.fullmatch(r"base-v0-[0-9a-f]{8}", names[0][:16])
    assert [n[16:] for n in names[:3]] == [".faiss", ".ids.parquet", ".trained.faiss"]
    manifest = json.loads(s3_server.client().get_object(Bucket="vectors", Key=next(
        k for k in keys if k.endswith("manifest.json")))["Body"].read())
    assert manifest["version"] == 0 and manifest["rows"] == 300 and manifest["type"] == "flat"

    assert main(["similar", *args, "--id", "syn00000003", "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert "searched with the flat index of 300 rows covering table version 0" in out
    assert main(["similar", *args, "--id", "syn00000003", "--k", "3", "--exact"]) == 0
    assert "searched exactly: asked for (--exact)" in capsys.readouterr().out

    assert main(["neighbours", *args, "--k", "4"]) == 0
    out = capsys.readouterr().out
    assert "neighbours (k=4) of model resnet50-" in out and "written for every image (no earlier run): 300 rows" in out
    runs = spark.read.format("delta").load(config.output.runs_table).select("stage").collect()
    assert sorted(r[0] for r in runs) == ["index", "neighbours"]


@pytest.mark.parametrize("key,value", [("index.type", "hnsw"), ("index.nprobe", "0"),
                                       ("index.rebuild_fraction", "0")])
def test_bad_index_settings_fail_naming_the_key(make_config: Any, tmp_path: Path, key: str, value: str) -> None:
    from image_embeddings.core.config import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _config(make_config, tmp_path, f"{key}={value}")
