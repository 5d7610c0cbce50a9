"""Pure helpers of the table layer and of stage 2's planning: no Spark session needed."""

from __future__ import annotations

from image_embeddings.core.tables import key_ranges, path_ranges, ranges_sql, sql_string, table_features

EMBEDDINGS = ("image_id", "model_key", "sha256", "embedding")
FILES = ("path", "image_id", "image")


def test_table_features_on_delta_4_and_3_1_use_deletion_vectors_where_merge_supports_them() -> None:
    for version in ((4, 0), (3, 1), (3, 2)):
        assert table_features(EMBEDDINGS, version) == {
            "delta.enableChangeDataFeed": "true", "delta.enableDeletionVectors": "true"}
        # MERGE on a table with deletion vectors and a `path` column fails (delta-io/delta#5296).
        assert table_features(FILES, version) == {"delta.enableChangeDataFeed": "true"}


def test_table_features_fall_back_on_delta_3_0_without_merge_deletion_vectors() -> None:
    assert table_features(EMBEDDINGS, (3, 0)) == {"delta.enableChangeDataFeed": "true"}
    assert table_features(EMBEDDINGS, (0, 0)) == {"delta.enableChangeDataFeed": "true"}, "unknown: the safe side"


def test_path_ranges_cover_every_path_one_range_per_folder() -> None:
    paths = ["s3a://b/raw/2026-12-02/b.jpg", "s3a://b/raw/2026-12-02/a.jpg", "s3a://b/raw/2026-01-05/x.png"]
    assert path_ranges(paths) == [("s3a://b/raw/2026-01-05/x.png", "s3a://b/raw/2026-01-05/x.png"),
                                  ("s3a://b/raw/2026-12-02/a.jpg", "s3a://b/raw/2026-12-02/b.jpg")]


def test_path_ranges_merge_folders_past_the_limit_and_still_cover_every_path() -> None:
    paths = [f"file:/in/day{d:03d}/img{i}.jpg" for d in range(100) for i in range(3)]
    ranges = path_ranges(paths, limit=8)
    assert len(ranges) <= 8
    assert all(any(lo <= p <= hi for lo, hi in ranges) for p in paths)
    assert ranges == sorted(ranges) and all(lo <= hi for lo, hi in ranges)


def test_key_ranges_one_per_value_until_the_limit_then_merged_and_never_missing_one() -> None:
    ids = [f"img{i:04d}" for i in (7, 3, 3, 9000, 12)]
    assert key_ranges(ids) == [("img0003", "img0003"), ("img0007", "img0007"), ("img0012", "img0012"),
                               ("img9000", "img9000")]
    many = [f"img{i:05d}" for i in range(0, 10_000, 7)]
    ranges = key_ranges(many, limit=5)
    assert len(ranges) == 5 and ranges == sorted(ranges)
    assert all(any(lo <= k <= hi for lo, hi in ranges) for k in many)
    assert key_ranges([]) == []


def test_ranges_sql_is_the_same_condition_as_in_ranges() -> None:
    assert ranges_sql("t.image_id", [("a", "b"), ("it's", "z")]) == (
        "((t.image_id >= 'a' AND t.image_id <= 'b') OR (t.image_id >= 'it\\'s' AND t.image_id <= 'z'))")
    assert ranges_sql("t.image_id", []) == "false"


def test_sql_string_escapes_quotes_and_backslashes() -> None:
    assert sql_string("s3a://b/it's\\x/") == "'s3a://b/it\\'s\\\\x/'"
