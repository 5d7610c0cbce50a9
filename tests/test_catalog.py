"""Tables by metastore name (``db.table``): the SQL primitives on the session's catalog, in-process, and the whole
job against a real Hive metastore (embedded Derby from pyspark's jars) in drivers of their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from image_embeddings.core.tables import (
    IncompatibleTableError,
    MissingSchemaError,
    TableRef,
    add_columns,
    append,
    commit_state,
    create,
    is_write_conflict,
    merge_changes,
    overwrite_where,
    read,
    read_changes,
    read_table,
    record_state,
    table_exists,
    table_location,
    table_properties,
    table_version,
    with_commit_retries,
)
from image_embeddings.testing.sample import encode, photo, write_sales

REPO = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).resolve().parent / "catalog_probe.py"


@pytest.fixture
def database(spark: Any) -> Any:
    """A fresh database in the test session's catalog, dropped afterwards."""
    name = "t" + uuid.uuid4().hex[:10]
    spark.sql(f"CREATE DATABASE {name}")
    yield name
    spark.sql(f"DROP DATABASE {name} CASCADE")


def _frame(spark: Any, rows: list[tuple[str, int]]) -> Any:
    return spark.createDataFrame(rows, "id string, n int")


def _rows(df: Any) -> list[tuple[Any, ...]]:
    return sorted(tuple(r) for r in df.collect())


def test_a_named_table_is_created_merged_time_travelled_and_change_fed(spark: Any, database: str) -> None:
    ref = TableRef.of(f"{database}.items")
    assert (table_exists(spark, ref), table_version(spark, ref), read_table(spark, ref)) == (False, None, None)
    merge_changes(spark, ref, _frame(spark, [("a", 1), ("b", 2)]), None, "id", metadata={"step": 1})
    assert table_version(spark, ref) == 0
    assert table_properties(spark, ref)["delta.enableChangeDataFeed"] == "true"
    # Managed: the catalog placed it in its warehouse, and knows it by name.
    assert spark.catalog.tableExists(f"{database}.items")
    assert "warehouse" in (table_location(spark, ref) or "")

    merge_changes(spark, ref, _frame(spark, [("b", 20), ("c", 3)]), _frame(spark, [("a", 0)]).select("id"), "id",
                  metadata={"step": 2})
    assert _rows(read(spark, ref)) == [("b", 20), ("c", 3)]
    assert _rows(read(spark, ref, 0)) == [("a", 1), ("b", 2)]
    changes = read_changes(spark, ref, 0, 1, ("id", "_change_type"))
    assert changes is not None
    assert _rows(changes) == [("a", "delete"), ("b", "update_postimage"), ("b", "update_preimage"), ("c", "insert")]
    assert commit_state(spark, ref) == (1, {"step": 2})

    # The same merge again changes nothing but is one more commit; a state record changes no rows.
    record_state(spark, ref, {"step": 3})
    assert commit_state(spark, ref) == (2, {"step": 3}) and _rows(read(spark, ref)) == [("b", 20), ("c", 3)]


def test_a_named_table_gains_columns_and_refuses_a_retyped_one_unchanged(spark: Any, database: str) -> None:
    from pyspark.sql import functions as F

    ref = TableRef.of(f"{database}.items")
    create(spark, ref, _frame(spark, [("a", 1)]))
    wider = _frame(spark, [("a", 1)]).withColumn("note", F.lit("x"))
    assert add_columns(spark, ref, read(spark, ref), wider, "output.images_table") == ["note"]
    assert read(spark, ref).columns == ["id", "n", "note"] and _rows(read(spark, ref)) == [("a", 1, None)]
    before = table_version(spark, ref)
    retyped = _frame(spark, [("a", 1)]).withColumn("n", F.col("n").cast("string"))
    with pytest.raises(IncompatibleTableError, match=r"column\(s\) changed type: n \(int in the table"):
        add_columns(spark, ref, read(spark, ref), retyped, "output.images_table")
    assert table_version(spark, ref) == before

    # Replacing the rows of a condition (Delta's replaceWhere: written rows outside it are refused), and a second
    # create that lost the race, as a commit conflict.
    create_more = _frame(spark, [("b", 2)]).withColumn("note", F.lit("kept"))
    merge_changes(spark, ref, create_more, None, "id")
    overwrite_where(_frame(spark, [("a", 9)]).withColumn("note", F.lit("y")), ref, "id = 'a'")
    assert _rows(read(spark, ref)) == [("a", 9, "y"), ("b", 2, "kept")]
    with pytest.raises(Exception, match="DELTA_REPLACE_WHERE_MISMATCH"):
        overwrite_where(_frame(spark, [("c", 1)]).withColumn("note", F.lit("n")), ref, "id = 'a'")
    assert _rows(read(spark, ref)) == [("a", 9, "y"), ("b", 2, "kept")]
    with pytest.raises(Exception) as lost:
        create(spark, ref, _frame(spark, [("q", 1)]))
    assert is_write_conflict(lost.value)


def test_a_first_merge_that_loses_the_create_race_merges_into_the_winner(spark: Any, database: str) -> None:
    ref = TableRef.of(f"{database}.items")
    attempts = []

    def commit() -> None:
        if not attempts:  # another writer creates the table between this writer's check and its create
            attempts.append("lost")
            create(spark, ref, _frame(spark, [("w", 1)]))
            create(spark, ref, _frame(spark, [("m", 2)]))
        merge_changes(spark, ref, _frame(spark, [("m", 2)]), None, "id")

    _, tries = with_commit_retries(str(ref), commit)
    assert tries == 2 and _rows(read(spark, ref)) == [("m", 2), ("w", 1)]


def test_an_external_named_table_lives_at_its_location(spark: Any, database: str, tmp_path: Path) -> None:
    ref = TableRef.of(f"{database}.runs", str(tmp_path / "external" / "runs"))
    for i in range(2):
        append(_frame(spark, [(f"r{i}", i)]), ref)
    assert (tmp_path / "external" / "runs" / "_delta_log").is_dir()
    assert table_location(spark, ref) == f"file:{tmp_path}/external/runs"
    kind = {r[0]: r[1] for r in spark.sql(f"DESCRIBE TABLE EXTENDED {ref.sql}").collect()}["Type"]
    assert kind == "EXTERNAL" and _rows(read(spark, ref)) == [("r0", 0), ("r1", 1)]
    # The same files read by path are the same table.
    assert _rows(read(spark, str(tmp_path / "external" / "runs"))) == [("r0", 0), ("r1", 1)]


def test_a_missing_database_and_a_table_of_another_format_are_refused(spark: Any, database: str) -> None:
    missing = TableRef.of("nodb_" + uuid.uuid4().hex[:8] + ".images")
    assert not table_exists(spark, missing)
    with pytest.raises(MissingSchemaError, match=r"the database \(schema\) nodb_\w+ does not exist .*\(CREATE SCHEMA"):
        merge_changes(spark, missing, _frame(spark, [("a", 1)]), None, "id")
    spark.sql(f"CREATE TABLE {database}.plain (id string, n int) USING parquet")
    with pytest.raises(IncompatibleTableError, match=rf"{database}.plain: is a parquet table, not a Delta table"):
        merge_changes(spark, f"{database}.plain", _frame(spark, [("a", 1)]), None, "id")


# ---------------------------------------------------------------------------------------------------------
# the whole job against Spark's own Hive metastore


def _probe(mode: str, root: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, str(PROBE), mode, str(root)], capture_output=True, text=True,
                          timeout=1200, cwd=root, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def metastore_runs(tmp_path_factory: pytest.TempPathFactory, base_overrides: list[str]) -> dict[str, Any]:
    """Three `run`s by name in one driver, then a second driver reading the same metastore."""
    root = tmp_path_factory.mktemp("metastore")
    names = ["astronaut", "coffee", "chelsea"]
    (root / "images").mkdir()
    for name in names:
        (root / "images" / f"{name}.jpg").write_bytes(encode(photo(name)))
    write_sales(root / "sales", [*names, "rocket"])
    sets = [*base_overrides, f"input.images={root}/images", f"input.sales={root}/sales",
            "output.images_table=shop.images", "output.embeddings_table=shop.embeddings",
            "output.runs_table=shop.runs", f"output.locations.shop.runs={root}/external/runs",
            f"lease.location={root}/lease.json", f"index.location={root}/index",
            f"spark.ivy_dir={REPO / '.cache' / 'ivy'}",
            "model.weights=random:0", "model.precision=fp32", "spark.class_archive_dir=",
            "spark.conf.spark.sql.catalogImplementation=hive",
            f"spark.conf.spark.hadoop.javax.jdo.option.ConnectionURL=jdbc:derby:;databaseName={root}/metastore_db;"
            "create=true",
            f"spark.conf.spark.sql.warehouse.dir={root}/warehouse",
            f"spark.conf.spark.driver.extraJavaOptions=-Dderby.system.home={root} -XX:TieredStopAtLevel=1 "
            "-XX:+UseSerialGC"]
    (root / "sets.json").write_text(json.dumps(sets))
    written = _probe("write", root)
    return {"root": root, "write": written, "read": _probe("read", root)}


def test_run_by_name_twice_writes_nothing_new_then_only_the_new_photo(metastore_runs: dict[str, Any]) -> None:
    root = metastore_runs["root"]
    first, second, third = metastore_runs["write"]["runs"]
    assert [r["code"] for r in (first, second, third)] == [0, 0, 0]
    reports = [json.loads((root / f"run{i}.json").read_text())["stages"] for i in (1, 2, 3)]
    assert reports[0]["ingest"]["metrics"]["files_decoded"] == 3 and reports[0]["embed"]["metrics"]["embedded"] == 3
    # The second run: nothing decoded or embedded, no data table written (only the runs table grew).
    assert (reports[1]["ingest"]["metrics"]["files_decoded"], reports[1]["embed"]["metrics"]["embedded"]) == (0, 0)
    assert {k: v for k, v in second["versions"].items() if k != "runs"} == {
        k: v for k, v in first["versions"].items() if k != "runs"}
    assert second["versions"]["runs"] == first["versions"]["runs"] + 2  # its ingest and embed reports
    # The third: one new photo, found through the files table's and the images table's change feeds by name.
    ingest, embed = reports[2]["ingest"]["metrics"], reports[2]["embed"]["metrics"]
    assert (ingest["files_decoded"], ingest["images_sync"]) == (1, "incremental")
    assert (embed["embedded"], embed["images_sync"]) == (1, "incremental")
    # Neighbours by name: every row at first (a replaceWhere by model), then the rows the change feed points at.
    assert (first["neighbours_code"], third["neighbours_code"]) == (0, 0)
    full, updated = (json.loads((root / f"neighbours{i}.json").read_text())["metrics"] for i in (1, 3))
    assert (full["action"], full["rows_written"], full["table"]) == ("full", 3, "shop.embeddings_neighbours")
    assert (updated["action"], updated["changed"]) == ("updated", 1)
    # Nothing was written under the working directory or as a folder named like the tables.
    assert not (root / "shop.images").exists() and not (root / "spark-warehouse").exists()
    assert (root / "warehouse" / "shop.db" / "images").is_dir()


def test_a_second_driver_reads_the_tables_by_name_from_the_metastore(metastore_runs: dict[str, Any]) -> None:
    root, found = metastore_runs["root"], metastore_runs["read"]
    assert found["tables"] == {"images": "MANAGED", "images_files": "MANAGED", "embeddings": "MANAGED",
                               "embeddings_neighbours": "MANAGED", "runs": "EXTERNAL"}
    assert found["runs_location"] == f"file:{root}/external/runs"
    assert (root / "external" / "runs" / "_delta_log").is_dir()
    assert found["embedded"] == ["astronaut", "chelsea", "coffee", "rocket"]
    assert found["neighbours"] == {"astronaut": 2, "chelsea": 2, "coffee": 2, "rocket": 2}
    assert (found["images_at_version_0"], found["images_now"]) == (3, 4)
    assert found["image_changes_after_0"] == [["rocket", "insert"]]


def test_status_and_maintain_by_name(metastore_runs: dict[str, Any]) -> None:
    found = metastore_runs["read"]
    assert found["status_code"] == 0, found["status"]
    status = found["status"]
    tables = {t["table"]: t for t in status["tables"]}
    assert {n: (t["path"], t["rows"]) for n, t in tables.items()} == {
        "files": ("shop.images_files", 4), "images": ("shop.images", 4), "embeddings": ("shop.embeddings", 4),
        "runs": ("shop.runs", 8)}
    assert [r["status"] for r in status["runs"]] == ["succeeded"] * 8
    assert found["maintain_code"] == 0, found["maintain"]
    assert "embeddings: shop.embeddings: version" in found["maintain"]
    assert {"OPTIMIZE", "VACUUM END"} <= set(found["history_after_maintain"])
