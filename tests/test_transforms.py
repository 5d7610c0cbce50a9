"""Unit tests of the pure stage 1 transforms in ``image_embeddings.ingest.stage`` on tiny in-memory DataFrames."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from image_embeddings.ingest.stage import (
    IngestError,
    _escape_glob,
    _uri_to_path,
    fingerprint,
    join_sales,
    plan_files,
    read_sales,
    resolve_duplicates,
    select_extensions,
    with_image_id,
)

T1 = datetime(2024, 1, 1, 12, 0, 0)
T2 = datetime(2024, 6, 1, 12, 0, 0)
LISTING_SCHEMA = "path STRING, file_size LONG, modification_time TIMESTAMP, image_id STRING"
FILES_SCHEMA = ("path STRING, image_id STRING, file_size LONG, modification_time TIMESTAMP, error STRING, "
                "preprocess_id STRING")


def rows(df: Any) -> list[tuple[Any, ...]]:
    """Collected rows as plain tuples, sorted, so comparisons ignore row order (chispa style)."""
    return sorted((tuple(r) for r in df.collect()), key=repr)


def ordered(expected: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return sorted(expected, key=repr)


def paths_df(spark: Any, paths: list[str]) -> Any:
    return spark.createDataFrame([(p,) for p in paths], "path STRING")


# ---------------------------------------------------------------------------------------------------------
# pure Python helpers


def test_uri_to_path_unquotes_file_uris_to_the_scan_form() -> None:
    assert _uri_to_path("file:///tmp/a%20b%5B1%5D.jpg") == "file:/tmp/a b[1].jpg"
    assert _uri_to_path("file:///x.jpg") == "file:/x.jpg"


def test_uri_to_path_keeps_s3a_uris_but_unquotes_them() -> None:
    assert _uri_to_path("s3a://bucket/dir/a%20b%5B1%5D.jpg") == "s3a://bucket/dir/a b[1].jpg"
    assert _uri_to_path("s3a://bucket/plain.jpg") == "s3a://bucket/plain.jpg"


def test_escape_glob_escapes_hadoop_glob_characters() -> None:
    assert _escape_glob("file:/x/a[1].jpg") == "file:/x/a\\[1\\].jpg"
    assert _escape_glob("s3a://b/{x}*?.jpg") == "s3a://b/\\{x\\}\\*\\?.jpg"
    assert _escape_glob("file:/x/a\\b.jpg") == "file:/x/a\\\\b.jpg"
    assert _escape_glob("file:/x/plain name.jpg") == "file:/x/plain name.jpg"


# ---------------------------------------------------------------------------------------------------------
# select_extensions

EXTENSION_PATHS = [
    "file:/d/x.jpg", "file:/d/IMG_1.JPG", "file:/d/a.Jpeg", "file:/d/a.jpg.txt", "file:/d/jpg",
    "s3a://b/sub/jpg", "file:/d/a.png", "file:/d/B.PNG", "file:/d.jpg/readme", "file:/d/ajpg",
]


@pytest.mark.parametrize(("extensions", "expected"), [
    (("jpg", "jpeg"), ["file:/d/x.jpg", "file:/d/IMG_1.JPG", "file:/d/a.Jpeg"]),
    (("png",), ["file:/d/a.png", "file:/d/B.PNG"]),
    ((".PNG", ".jpg"), ["file:/d/x.jpg", "file:/d/IMG_1.JPG", "file:/d/a.png", "file:/d/B.PNG"]),
], ids=["default-like", "custom", "leading-dot"])
def test_select_extensions(spark: Any, extensions: tuple[str, ...], expected: list[str]) -> None:
    kept = select_extensions(paths_df(spark, EXTENSION_PATHS), extensions)
    assert rows(kept) == ordered((p,) for p in expected)


# ---------------------------------------------------------------------------------------------------------
# with_image_id


def test_with_image_id_default_pattern_takes_the_stem(spark: Any) -> None:
    df = paths_df(spark, ["s3a://b/x/IMG_001.JPG", "file:/a/b.c.jpg", "file:/a.d/plain.png", "file:/a/README",
                          "file:/a/.jpg", "file:/a/b."])
    out = with_image_id(df, r"^(.+)\.[^.]+$")
    assert out.columns == ["path", "image_id"]
    assert rows(out) == ordered([
        ("s3a://b/x/IMG_001.JPG", "IMG_001"),
        ("file:/a/b.c.jpg", "b.c"),
        ("file:/a.d/plain.png", "plain"),
        ("file:/a/README", None),
        ("file:/a/.jpg", None),
        ("file:/a/b.", None),
    ])


def test_with_image_id_custom_pattern_matches_the_file_name_only(spark: Any) -> None:
    df = paths_df(spark, ["s3a://b/sku-42_front.jpg", "file:/x/sku-7_.png", "s3a://b/SKU-42_x.jpg",
                          "s3a://b/sku-9_dir/photo.jpg", "s3a://b/sku-x_1.jpg"])
    assert rows(with_image_id(df, r"^sku-(\d+)_")) == ordered([
        ("s3a://b/sku-42_front.jpg", "42"),
        ("file:/x/sku-7_.png", "7"),
        ("s3a://b/SKU-42_x.jpg", None),
        ("s3a://b/sku-9_dir/photo.jpg", None),
        ("s3a://b/sku-x_1.jpg", None),
    ])


# ---------------------------------------------------------------------------------------------------------
# plan_files

SCOPE = "file:/data/img"


def test_plan_files_without_a_files_table_marks_everything_new(spark: Any) -> None:
    listing = spark.createDataFrame([
        ("file:/data/img/a.jpg", 10, T1, "a"),
        ("file:/data/img/sub/b.jpg", 0, None, "b"),
        ("file:/data/img/README", 5, T1, None),
    ], LISTING_SCHEMA)
    plan = plan_files(listing, None, SCOPE, "p1", 100)
    assert plan.columns == ["path", "file_size", "modification_time", "image_id", "status"]
    assert rows(plan) == ordered([
        ("file:/data/img/a.jpg", 10, T1, "a", "new"),
        ("file:/data/img/sub/b.jpg", 0, None, "b", "new"),
        ("file:/data/img/README", 5, T1, None, "new"),
    ])


def _plan_inputs(spark: Any) -> tuple[Any, Any]:
    d = "file:/data/img/"
    listing = spark.createDataFrame([
        (d + "new.jpg", 10, T1, "new"),
        (d + "same.jpg", 10, T1, "same"),
        (d + "sub/deep.jpg", 10, T1, "deep"),
        (d + "size.jpg", 11, T1, "size"),
        (d + "mtime.jpg", 10, T2, "mtime"),
        (d + "prep.jpg", 10, T1, "prep"),
        (d + "unreadable.jpg", 10, T1, "unreadable"),
        (d + "big_now_ok.jpg", 100, T1, "big_now_ok"),
        (d + "big_still.jpg", 101, T1, "big_still"),
        (d + "broken.jpg", 10, T1, "broken"),
        (d + "empty.jpg", 0, None, "empty"),
    ], LISTING_SCHEMA)
    files = spark.createDataFrame([
        (d + "same.jpg", "same", 10, T1, None, "p1"),
        (d + "sub/deep.jpg", "deep", 10, T1, None, "p1"),
        (d + "size.jpg", "size", 10, T1, None, "p1"),
        (d + "mtime.jpg", "mtime", 10, T1, None, "p1"),
        (d + "prep.jpg", "prep", 10, T1, None, "p0"),
        (d + "unreadable.jpg", "unreadable", 10, T1, "unreadable: the file vanished", "p1"),
        (d + "big_now_ok.jpg", "big_now_ok", 100, T1, "too_large: 100 bytes > input.max_file_bytes 50", "p1"),
        (d + "big_still.jpg", "big_still", 101, T1, "too_large: 101 bytes > input.max_file_bytes 50", "p1"),
        (d + "broken.jpg", "broken", 10, T1, "decode: not an image", "p1"),
        (d + "empty.jpg", "empty", 0, None, "empty: no bytes", "p1"),
        (d + "gone.jpg", "gone", 10, T1, None, "p1"),
        (d + "sub/gone_too.jpg", "gone_too", 10, T1, "unreadable: x", "p1"),
        ("file:/data/img2/a.jpg", "sibling", 10, T1, None, "p1"),
        ("file:/data/img", "scope_itself", 10, T1, None, "p1"),
        ("s3a://other/img/x.jpg", "elsewhere", 10, T1, None, "p1"),
    ], FILES_SCHEMA)
    return listing, files


LISTED_STATUS = [
    ("new.jpg", 10, T1, "new", "new"),
    ("same.jpg", 10, T1, "same", "unchanged"),
    ("sub/deep.jpg", 10, T1, "deep", "unchanged"),
    ("size.jpg", 11, T1, "size", "changed"),
    ("mtime.jpg", 10, T2, "mtime", "changed"),
    ("prep.jpg", 10, T1, "prep", "changed"),
    ("unreadable.jpg", 10, T1, "unreadable", "retry"),
    ("big_now_ok.jpg", 100, T1, "big_now_ok", "retry"),
    ("big_still.jpg", 101, T1, "big_still", "unchanged"),
    ("broken.jpg", 10, T1, "broken", "unchanged"),
    ("empty.jpg", 0, None, "empty", "unchanged"),
]
REMOVED = [
    ("gone.jpg", None, None, "gone", "removed"),
    ("sub/gone_too.jpg", None, None, "gone_too", "removed"),
]


def _expected(entries: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return ordered(("file:/data/img/" + name, *rest) for name, *rest in entries)


@pytest.mark.parametrize("scope", [SCOPE, SCOPE + "/"], ids=["scope", "scope-with-slash"])
def test_plan_files_statuses(spark: Any, scope: str) -> None:
    listing, files = _plan_inputs(spark)
    plan = plan_files(listing, files, scope, "p1", 100)
    assert plan.columns == ["path", "file_size", "modification_time", "image_id", "status"]
    # Rows outside the scope (the sibling folder file:/data/img2, the scope path itself, another bucket)
    # are neither listed nor removed: they do not appear at all.
    assert rows(plan) == _expected(LISTED_STATUS + REMOVED)


def test_plan_files_without_deletion_tracking_reports_no_removals(spark: Any) -> None:
    listing, files = _plan_inputs(spark)
    plan = plan_files(listing, files, SCOPE, "p1", 100, track_deletions=False)
    assert rows(plan) == _expected(LISTED_STATUS)


def test_plan_files_too_large_is_retried_only_within_the_limit(spark: Any) -> None:
    listing, files = _plan_inputs(spark)
    lowered = plan_files(listing, files, SCOPE, "p1", 99).where("path like '%big%'").select("path", "status")
    assert rows(lowered) == ordered([
        ("file:/data/img/big_now_ok.jpg", "unchanged"),
        ("file:/data/img/big_still.jpg", "unchanged"),
    ])


def test_plan_files_replans_a_file_whose_image_id_changed(spark: Any) -> None:
    # A new input.image_id_pattern gives other ids: those files are planned again, with the listed id.
    listing = spark.createDataFrame([
        ("file:/data/img/a.jpg", 10, T1, "a_new"),
        ("file:/data/img/b.jpg", 10, T1, None),
    ], LISTING_SCHEMA)
    files = spark.createDataFrame([
        ("file:/data/img/a.jpg", "a_old", 10, T1, None, "p1"),
        ("file:/data/img/b.jpg", "b_old", 10, T1, None, "p1"),
    ], FILES_SCHEMA)
    assert rows(plan_files(listing, files, SCOPE, "p1", 100).select("path", "image_id", "status")) == [
        ("file:/data/img/a.jpg", "a_new", "changed"),
        ("file:/data/img/b.jpg", None, "changed"),
    ]


# ---------------------------------------------------------------------------------------------------------
# resolve_duplicates


def test_resolve_duplicates(spark: Any) -> None:
    files = spark.createDataFrame([
        ("file:/1/a.jpg", "a", T1, 1),
        ("file:/2/a.jpg", "a", T2, 2),
        ("file:/3/a.jpg", "a", T1, 3),
        ("file:/z/b.jpg", "b", T1, 4),
        ("file:/y/b.jpg", "b", T1, 5),
        ("file:/x/b.jpg", "b", T1, 6),
        ("file:/c.jpg", "c", T1, 7),
        ("file:/a/d.jpg", "d", None, 8),
        ("file:/b/d.jpg", "d", T1, 9),
        ("file:/n1.jpg", None, T2, 10),
        ("file:/n2.jpg", None, T2, 11),
    ], "path STRING, image_id STRING, modification_time TIMESTAMP, n INT")
    out = resolve_duplicates(files)
    assert out.columns == ["path", "image_id", "modification_time", "n", "duplicate_files"]
    assert rows(out) == ordered([
        ("file:/2/a.jpg", "a", T2, 2, 2),  # latest modification time wins
        ("file:/x/b.jpg", "b", T1, 6, 2),  # a tie goes to the smallest path
        ("file:/c.jpg", "c", T1, 7, 0),
        ("file:/b/d.jpg", "d", T1, 9, 1),  # a zero-byte file (no modification time) loses
    ])
    assert dict(out.dtypes)["duplicate_files"] == "int"


# ---------------------------------------------------------------------------------------------------------
# join_sales


def _images_and_sales(spark: Any) -> tuple[Any, Any]:
    images = spark.createDataFrame([("a", "file:/a.jpg"), ("b", "file:/b.jpg")], "image_id STRING, path STRING")
    sales = spark.createDataFrame([("a", 1.5), ("c", 3.0)], "image_id STRING, price DOUBLE")
    return images, sales


def test_join_sales_inner(spark: Any) -> None:
    images, sales = _images_and_sales(spark)
    joined = join_sales(images, sales, "inner")
    assert joined.columns == ["image_id", "path", "price"]
    assert rows(joined) == [("a", "file:/a.jpg", 1.5)]


def test_join_sales_left(spark: Any) -> None:
    images, sales = _images_and_sales(spark)
    assert rows(join_sales(images, sales, "left")) == ordered([
        ("a", "file:/a.jpg", 1.5),
        ("b", "file:/b.jpg", None),
    ])


def test_join_sales_rejects_clashing_columns(spark: Any) -> None:
    images = spark.createDataFrame([("a", "file:/a.jpg", 3)], "image_id STRING, path STRING, width INT")
    sales = spark.createDataFrame([("a", "x", 1, 2.0)], "image_id STRING, path STRING, width INT, price DOUBLE")
    with pytest.raises(IngestError, match=r"^sales columns path, width clash with image columns"):
        join_sales(images, sales, "left")
    with pytest.raises(IngestError, match=r"^sales columns path clash"):
        join_sales(images, sales.drop("width"), "inner")


# ---------------------------------------------------------------------------------------------------------
# fingerprint

FP_SCHEMA = ("label STRING, image_id STRING, price DOUBLE, n INT, image BINARY, updated_at TIMESTAMP, "
             "updated_run_id STRING")
FP_BASE = ("a", 1.0, 1, b"x", T1, "r1")


def test_fingerprint(spark: Any) -> None:
    variants: dict[str, tuple[Any, ...]] = {
        "base": FP_BASE,
        "same": FP_BASE,
        "image": ("a", 1.0, 1, b"y", T1, "r1"),
        "updated_at": ("a", 1.0, 1, b"x", T2, "r1"),
        "updated_run_id": ("a", 1.0, 1, b"x", T1, "r2"),
        "all_excluded": ("a", 1.0, 1, None, T2, "r2"),
        "image_id": ("b", 1.0, 1, b"x", T1, "r1"),
        "price": ("a", 2.0, 1, b"x", T1, "r1"),
        "price_null": ("a", None, 1, b"x", T1, "r1"),
        "n": ("a", 1.0, 2, b"x", T1, "r1"),
    }
    df = spark.createDataFrame([(label, *values) for label, values in variants.items()], FP_SCHEMA)
    data = df.drop("label")
    fps = {r["label"]: (r["fp"], r["fp_no_price"]) for r in df.select(
        "label", fingerprint(data).alias("fp"), fingerprint(data, exclude=("price",)).alias("fp_no_price")
    ).collect()}
    base, base_no_price = fps["base"]
    assert isinstance(base, int)
    assert [k for k, (fp, _) in fps.items() if fp == base] == [
        "base", "same", "image", "updated_at", "updated_run_id", "all_excluded"]
    changed = [fps[k][0] for k in ("image_id", "price", "price_null", "n")]
    assert len({base, *changed}) == 5
    # With a custom exclude list only the listed columns are ignored (image and update columns now count).
    assert [k for k, (_, fp) in fps.items() if fp == base_no_price] == ["base", "same", "price", "price_null"]


def test_fingerprint_sees_a_value_move_between_null_columns(spark: Any) -> None:
    df = spark.createDataFrame([(1, None), (None, 1)], "a INT, b INT")
    first, second = (r[0] for r in df.select(fingerprint(df)).collect())
    assert first != second


# ---------------------------------------------------------------------------------------------------------
# read_sales


def _parquet(tmp_path: Path, frame: pd.DataFrame) -> str:
    location = tmp_path / "sales.parquet"
    frame.to_parquet(location, index=False)
    return str(location)


def test_read_sales_renames_the_key_and_casts_it_to_string(spark: Any, tmp_path: Path) -> None:
    location = _parquet(tmp_path, pd.DataFrame({"sku": [1, 22], "price": [1.5, 2.0]}))
    sales = read_sales(spark, location, "sku")
    assert sales.dtypes == [("image_id", "string"), ("price", "double")]
    assert rows(sales) == [("1", 1.5), ("22", 2.0)]


def test_read_sales_casts_an_image_id_key(spark: Any, tmp_path: Path) -> None:
    location = _parquet(tmp_path, pd.DataFrame({"image_id": [7], "units": [3]}))
    assert read_sales(spark, location, "image_id").dtypes == [("image_id", "string"), ("units", "bigint")]


def test_read_sales_missing_key(spark: Any, tmp_path: Path) -> None:
    location = _parquet(tmp_path, pd.DataFrame({"sku": [1], "price": [1.5]}))
    with pytest.raises(IngestError, match=r"^input\.sales_key: column 'nope' is not in the sales table "
                                          r"\(columns: sku, price\)$"):
        read_sales(spark, location, "nope")


def test_read_sales_key_and_image_id_both_present(spark: Any, tmp_path: Path) -> None:
    location = _parquet(tmp_path, pd.DataFrame({"sku": [1], "image_id": ["x"]}))
    with pytest.raises(IngestError, match=r"^input\.sales_key: the sales table has both 'sku' and 'image_id'"):
        read_sales(spark, location, "sku")


def test_read_sales_unreadable_location(spark: Any, tmp_path: Path) -> None:
    with pytest.raises(IngestError, match=r"^input\.sales: cannot read Parquet at "):
        read_sales(spark, str(tmp_path / "missing"), "sku")


def test_extensions_glob_is_case_insensitive() -> None:
    import fnmatch

    from image_embeddings.ingest.stage import extensions_glob

    glob = extensions_glob(("jpg", ".PNG", "webp"))
    assert glob == "*.{[jJ][pP][gG],[pP][nN][gG],[wW][eE][bB][pP]}"
    # Hadoop's {a,b} alternation, spelled out for Python's fnmatch, which knows only the classes.
    patterns = ["*." + alt for alt in glob[3:-1].split(",")]
    for name, listed in (("IMG_1.JPG", True), ("a.Png", True), ("b.webp", True), ("c.jpg.txt", False),
                         ("d.jpeg", False), ("e.gif", False)):
        assert any(fnmatch.fnmatchcase(name, p) for p in patterns) == listed, name


def test_local_frame_keeps_values_types_and_instants(spark) -> None:  # type: ignore[no-untyped-def]
    import datetime as dt

    from image_embeddings.core.spark import local_frame

    at = dt.datetime(2026, 11, 23, 5, 40, 1, 250000, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    df = local_frame(spark, [("a b[1].jpg", None, at, 1.5), ("c", "x", None, None)],
                     "path STRING, note STRING, at TIMESTAMP, seconds DOUBLE")
    assert df.dtypes == [("path", "string"), ("note", "string"), ("at", "timestamp"), ("seconds", "double")]
    rows = sorted(df.collect(), key=lambda r: r["path"])
    assert [r["path"] for r in rows] == ["a b[1].jpg", "c"]
    assert rows[0]["note"] is None and rows[1]["note"] == "x"
    assert rows[1]["at"] is None and rows[1]["seconds"] is None and rows[0]["seconds"] == 1.5
    # The same instant: 03:40:01.25 UTC (the session's time zone is UTC).
    assert df.where("path = 'a b[1].jpg'").selectExpr("cast(at as string)").first()[0] == "2026-11-23 03:40:01.25"


def test_tests_on_tiny_frames_need_no_s3_server(tmp_path: Path) -> None:
    """Spark tests without S3 set up no MinIO: one run alone in a fresh pytest starts Spark and no S3 server."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "--setup-show", "-p", "no:cacheprovider",
                           f"{Path(__file__)}::test_with_image_id_default_pattern_takes_the_stem", "--basetemp",
                           str(tmp_path / "t")], capture_output=True, text=True, timeout=600, cwd=repo)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "SETUP    S spark" in done.stdout and "1 passed" in done.stdout
    assert "s3_server" not in done.stdout and not list((tmp_path / "t").glob("minio*"))


def _files_read(df: Any) -> int:
    """Bytes of the data files a query's scans read (Spark's `filesSize` metric), after running it."""
    df.collect()
    total = 0

    def walk(node: Any) -> None:
        nonlocal total
        metrics = node.metrics()
        if metrics.contains("filesSize"):
            total += int(metrics.apply("filesSize").value())
        children = node.children()
        for i in range(children.size()):
            walk(children.apply(i))

    walk(df._jdf.queryExecution().executedPlan())
    return total


def test_clustered_writes_bounded_key_ordered_files_that_key_ranges_prune(spark: Any, tmp_path: Path) -> None:
    from pyspark.sql import functions as F

    from image_embeddings.core.tables import clustered, in_ranges, key_ranges

    rows = spark.range(0, 2000).select(F.format_string("img%05d", (F.col("id") * 7919) % 2000).alias("image_id"),
                                       F.lit("x" * 64).alias("pad"))
    table = str(tmp_path / "t")
    clustered(rows, "image_id", 2000, 250).write.format("delta").save(table)
    t = spark.read.format("delta").load(table)
    files = (t.groupBy(F.input_file_name().alias("f"))
             .agg(F.min("image_id").alias("lo"), F.max("image_id").alias("hi"), F.count("*").alias("n"))
             .orderBy("lo").collect())
    assert len(files) == 8 and sum(f["n"] for f in files) == 2000 and max(f["n"] for f in files) <= 400
    assert all(a["hi"] < b["lo"] for a, b in zip(files, files[1:], strict=False)), "files hold disjoint key ranges"

    whole = _files_read(t)
    wanted = ["img00003", "img00004", "img01990"]
    ranged = t.where(in_ranges("image_id", key_ranges(wanted)))
    assert sorted(r["image_id"] for r in ranged.collect()) == wanted
    assert _files_read(ranged) * 3 < whole, "two of eight files read"
    # An IN list is pruned by its overall minimum and maximum only: here, every file.
    assert _files_read(t.where(F.col("image_id").isin(wanted))) == whole
