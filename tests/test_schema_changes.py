"""A table altered between two runs: incremental runs never replace the images table from a subset of rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from image_embeddings.core.tables import IncompatibleTableError, sql_table, table_version
from image_embeddings.ingest.stage import run_ingest
from image_embeddings.testing.sample import encode, photo, write_sample


def _sales(folder: Path, frame: pd.DataFrame) -> None:
    for old in folder.glob("*.parquet"):
        old.unlink()
    frame.to_parquet(folder / "part-00000.parquet", index=False)


@pytest.fixture
def first_run(spark: Any, make_config: Any, tmp_path: Path) -> tuple[Any, list[str], Path]:
    ids = write_sample(tmp_path / "sample", with_variants=False)
    config = make_config(tmp_path / "sample" / "images", tmp_path / "sample" / "sales")
    assert run_ingest(spark, config).status == "succeeded"
    return config, ids, tmp_path / "sample"


def _new_photos(sample: Path, *names: str) -> None:
    for name in names:
        (sample / "images" / "new").mkdir(parents=True, exist_ok=True)
        (sample / "images" / "new" / f"{name}.jpg").write_bytes(encode(photo("coffee")[:, ::-1]))


def test_a_column_someone_added_and_two_new_photos_keep_every_row(spark: Any, first_run: Any) -> None:
    config, ids, sample = first_run
    table = sql_table(config.output.images_table)
    spark.sql(f"ALTER TABLE {table} ADD COLUMNS (note STRING)")  # what the package's own error text suggests
    spark.sql(f"UPDATE {table} SET note = 'checked' WHERE image_id = 'astronaut'")
    _new_photos(sample, "new_a", "new_b")
    sales = pd.read_parquet(next((sample / "sales").glob("*.parquet")))
    _sales(sample / "sales", pd.concat([sales, pd.DataFrame({
        "image_id": ["new_a", "new_b"], "product_id": ["P9", "P10"], "units_sold": [1, 2], "revenue": [1.0, 2.0]})]))

    report = run_ingest(spark, config)
    assert report.metrics["files_new"] == 2
    rows = {r["image_id"]: r for r in spark.read.format("delta").load(config.output.images_table).collect()}
    assert set(rows) == {*ids, "new_a", "new_b"}, "no row lost"
    assert rows["astronaut"]["note"] == "checked", "the column someone added keeps its values"
    assert rows["new_a"]["units_sold"] == 1 and rows["new_a"]["note"] is None

    # The next night with nothing new writes nothing: the extra column is not a difference to write.
    version = table_version(spark, config.output.images_table)
    again = run_ingest(spark, config)
    assert again.metrics["images_upserted"] == 0 and table_version(spark, config.output.images_table) == version


def test_a_sales_column_added_is_filled_for_every_row(spark: Any, first_run: Any) -> None:
    config, ids, sample = first_run
    sales = pd.read_parquet(next((sample / "sales").glob("*.parquet")))
    sales["category"] = ["shoes" if i % 2 else "bags" for i in range(len(sales))]
    _sales(sample / "sales", sales)
    _new_photos(sample, "new_a")

    report = run_ingest(spark, config)
    assert report.metrics["images_columns_added"] == ["category"]
    assert report.metrics["images_sync"].startswith("full")
    rows = spark.read.format("delta").load(config.output.images_table).collect()
    joined = [r for r in rows if r["image_id"] in set(sales["image_id"])]
    assert {r["image_id"] for r in rows} == set(ids), "every row kept (new_a has no sales row: inner join)"
    assert all(r["category"] in ("shoes", "bags") for r in joined)


def test_a_retyped_sales_column_fails_clearly_and_leaves_the_table(spark: Any, first_run: Any) -> None:
    config, ids, sample = first_run
    sales = pd.read_parquet(next((sample / "sales").glob("*.parquet")))
    sales["units_sold"] = sales["units_sold"].astype(str)
    _sales(sample / "sales", sales)
    before = table_version(spark, config.output.images_table)
    with pytest.raises(IncompatibleTableError, match=r"units_sold \(bigint in the table, string now\)"):
        run_ingest(spark, config)
    assert table_version(spark, config.output.images_table) == before
    assert spark.read.format("delta").load(config.output.images_table).count() == len(ids)


def test_a_needed_column_dropped_fails_clearly_and_leaves_the_table(spark: Any, first_run: Any) -> None:
    config, ids, sample = first_run
    path = config.output.images_table
    (spark.read.format("delta").load(path).drop("width").write.format("delta").mode("overwrite")
     .option("overwriteSchema", "true").save(path))  # someone rewrote the table without a column
    before = table_version(spark, path)
    _new_photos(sample, "new_a")
    with pytest.raises(IncompatibleTableError, match="lacks column"):
        run_ingest(spark, config)
    assert table_version(spark, path) == before
    assert spark.read.format("delta").load(path).count() == len(ids)
