"""Stage 1 end to end against local Spark, local Delta and the local S3 server."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from image_embeddings.core.tables import table_version
from image_embeddings.ingest.stage import IngestError, run_ingest
from image_embeddings.testing.sample import PHOTOS, encode, photo, write_sales, write_sample

from hostile import cases, write_cases

REPO = Path(__file__).resolve().parents[1]
LIMIT = 2_000_000


def delta(spark: Any, path: str) -> dict[str, dict[str, Any]]:
    """Rows of a Delta table keyed by their first column."""
    rows = spark.read.format("delta").load(path).collect()
    return {r[0]: r.asDict() for r in rows}


def key_by(spark: Any, path: str, key: str) -> dict[str, dict[str, Any]]:
    return {r[key]: r.asDict() for r in spark.read.format("delta").load(path).collect()}


def test_mixed_folder_accounts_for_every_file(spark: Any, make_config: Any, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    all_cases = cases(big_bytes=LIMIT)
    write_cases(folder, all_cases)
    ids = [c.image_id for c in all_cases]
    write_sales(tmp_path / "sales", [i for i in ids if i != "zero"] + ["sold_but_no_image"])
    config = make_config(folder, tmp_path / "sales", f"input.max_file_bytes={LIMIT}")

    report = run_ingest(spark, config, report_file=str(tmp_path / "report.json"))

    m = report.metrics
    files = key_by(spark, config.output.files_table_path, "path")
    assert len(files) == len(all_cases), "every image file has exactly one row; notes.txt is not listed"
    for case in all_cases:
        row = files[f"file:{folder / case.relpath}"]
        reason = None if row["error"] is None else row["error"].split(":")[0]
        assert reason == case.reason, (case.relpath, row["error"])
        assert row["image_id"] == case.image_id
        assert row["file_size"] == len(case.content)
        if case.reason is None:
            assert (row["width"], row["height"]) == case.size, case.relpath
            with Image.open(io.BytesIO(row["image"])) as im:
                assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (224, 224))
        else:
            assert row["image"] is None
        if case.reason == "too_large":
            assert row["sha256"] is None, "a file over the byte limit is never read"
    expected_errors = {"empty": 1, "not_an_image": 1, "too_large": 1, "too_many_pixels": 1, "truncated": 1}
    assert m["errors"] == expected_errors
    assert m["errors_total"] == expected_errors
    assert m["files_listed"] == m["files_new"] == len(all_cases)
    assert m["files_decoded"] == len(all_cases) - 2, "neither the zero-byte nor the too-large file is read"
    assert m["bytes_read"] == sum(len(c.content) for c in all_cases if c.reason != "too_large")
    assert (m["joined"], m["images_without_sales"], m["sales_without_images"]) == (len(ids) - 1, 1, 1)

    images = key_by(spark, config.output.images_table, "image_id")
    assert set(images) == set(ids) - {"zero"}, "inner join: the image without sales is left out"
    assert images["astronaut"]["units_sold"] is not None
    assert images["text"]["error"].startswith("not_an_image")
    assert json.loads((tmp_path / "report.json").read_text())["metrics"]["errors"] == expected_errors
    runs = spark.read.format("delta").load(config.output.runs_table).collect()
    assert [(r.run_id, r.stage, r.status) for r in runs] == [(report.run_id, "ingest", "succeeded")]
    assert json.loads(runs[0].report)["metrics"]["files_listed"] == len(all_cases)

    left = make_config(folder, tmp_path / "sales", f"input.max_file_bytes={LIMIT}", "input.join=left",
                       tables=tmp_path / "left")
    run_ingest(spark, left)
    left_images = key_by(spark, left.output.images_table, "image_id")
    assert set(left_images) == set(ids), "left join keeps the image without sales"
    assert left_images["zero"]["units_sold"] is None


def test_real_photos_through_s3_incremental_and_idempotent(spark: Any, make_config: Any, s3_server: Any,
                                                           tmp_path: Path) -> None:
    local = tmp_path / "sample"
    ids = write_sample(local, with_variants=False)
    s3 = s3_server.client()
    s3.create_bucket(Bucket="photos")
    for path in sorted((local / "images").rglob("*.jpg")):
        s3.upload_file(str(path), "photos", f"raw/{path.name}")
    s3.upload_file(str(next((local / "sales").glob("*.parquet"))), "photos", "sales/part-0.parquet")
    config = make_config("s3a://photos/raw", "s3a://photos/sales", tables="s3a://photos/delta")

    first = run_ingest(spark, config)
    assert first.metrics["files_decoded"] == len(ids) == len(PHOTOS)
    assert first.metrics["errors"] == {}
    images = key_by(spark, config.output.images_table, "image_id")
    assert set(images) == set(ids)
    assert images["astronaut"]["path"] == "s3a://photos/raw/astronaut.jpg"
    astronaut = s3.get_object(Bucket="photos", Key="raw/astronaut.jpg")["Body"].read()
    assert images["astronaut"]["file_size"] == len(astronaut)
    versions = (table_version(spark, config.output.files_table_path),
                table_version(spark, config.output.images_table))

    rerun = run_ingest(spark, config)
    assert (rerun.metrics["files_unchanged"], rerun.metrics["files_decoded"], rerun.metrics["bytes_read"]) == (
        len(ids), 0, 0)
    assert (table_version(spark, config.output.files_table_path),
            table_version(spark, config.output.images_table)) == versions, "a rerun writes nothing"
    assert spark.read.format("delta").load(config.output.images_table).count() == len(ids)
    # The same folder written another way is the same folder: nothing is planned as new, nothing written.
    respelled = run_ingest(spark, make_config("s3a://photos//raw/./", "s3a://photos/sales/",
                                              tables="s3a://photos//delta/"))
    assert (respelled.metrics["input_images"], respelled.metrics["files_new"], respelled.metrics["files_decoded"],
            respelled.metrics["files_removed"]) == ("s3a://photos/raw", 0, 0, 0)
    assert (table_version(spark, config.output.files_table_path),
            table_version(spark, config.output.images_table)) == versions

    new = {"astronaut_flip": encode(photo("astronaut")[:, ::-1]), "coffee_gray": encode(photo("coffee") // 2)}
    for image_id, content in new.items():
        s3.put_object(Bucket="photos", Key=f"raw/new/{image_id}.jpg", Body=content)
    write_sales(local / "sales2", [*ids, *new])
    s3.upload_file(str(next((local / "sales2").glob("*.parquet"))), "photos", "sales/part-0.parquet")

    third = run_ingest(spark, config)
    assert third.metrics["files_new"] == 2
    assert third.metrics["files_decoded"] == 2, "only the new files are read and decoded"
    assert third.metrics["bytes_read"] == sum(len(c) for c in new.values())
    files = key_by(spark, config.output.files_table_path, "path")
    assert {r["run_id"] for p, r in files.items() if "/new/" not in p} == {first.run_id}
    assert {r["run_id"] for p, r in files.items() if "/new/" in p} == {third.run_id}
    assert set(key_by(spark, config.output.images_table, "image_id")) == set(ids) | set(new)


def test_changed_content_sales_duplicates_and_removals(spark: Any, make_config: Any, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    names = ("astronaut", "coffee", "rocket")
    for name in names:
        (folder / f"{name}.jpg").write_bytes(encode(photo(name)))
    write_sales(tmp_path / "sales", list(names), seed=1)
    config = make_config(folder, tmp_path / "sales")
    first = run_ingest(spark, config)
    before = key_by(spark, config.output.images_table, "image_id")
    thumbnails = key_by(spark, config.output.files_table_path, "path")
    assert "image" not in before["rocket"], "each thumbnail is stored once: in the files table"

    # Changed content: same name, other photo, newer modification time.
    (folder / "coffee.jpg").write_bytes(encode(photo("chelsea")))
    os.utime(folder / "coffee.jpg", (time.time() + 5, time.time() + 5))
    changed = run_ingest(spark, config)
    assert (changed.metrics["files_changed"], changed.metrics["files_decoded"]) == (1, 1)
    after = key_by(spark, config.output.images_table, "image_id")
    assert after["coffee"]["sha256"] != before["coffee"]["sha256"]
    assert after["coffee"]["width"] == 451 and after["coffee"]["run_id"] == changed.run_id
    assert after["rocket"]["run_id"] == first.run_id and after["rocket"] == before["rocket"]
    assert changed.metrics["images_sync"] == "incremental" and changed.metrics["images_upserted"] == 1
    rocket_file = after["rocket"]["path"]
    assert key_by(spark, config.output.files_table_path, "path")[rocket_file] == thumbnails[rocket_file]
    assert spark.read.format("delta").load(config.output.images_table).count() == 3

    # Changed sales values update rows without decoding anything.
    write_sales(tmp_path / "sales", list(names), seed=2)
    resold = run_ingest(spark, config)
    assert resold.metrics["files_decoded"] == 0
    assert resold.metrics["images_upserted"] == 3
    sold = key_by(spark, config.output.images_table, "image_id")
    expected = {r["image_id"]: r["units_sold"]
                for r in spark.read.parquet(str(tmp_path / "sales")).collect()}
    assert {k: v["units_sold"] for k, v in sold.items()} == expected
    assert sold["rocket"]["sha256"] == before["rocket"]["sha256"]

    # A second file with the same image_id: the newest wins, and the duplicate is counted.
    (folder / "more").mkdir()
    (folder / "more" / "rocket.png").write_bytes(encode(photo("camera"), fmt="PNG"))
    os.utime(folder / "more" / "rocket.png", (time.time() + 10, time.time() + 10))
    dup = run_ingest(spark, config)
    assert dup.metrics["duplicate_files"] == 1 and dup.metrics["files_decoded"] == 1
    rocket = key_by(spark, config.output.images_table, "image_id")["rocket"]
    assert rocket["path"].endswith("more/rocket.png") and rocket["duplicate_files"] == 1

    # Removing the winner brings the other file back; removing a file drops its row.
    (folder / "more" / "rocket.png").unlink()
    (folder / "astronaut.jpg").unlink()
    gone = run_ingest(spark, config)
    assert (gone.metrics["files_removed"], gone.metrics["files_decoded"]) == (2, 0)
    final = key_by(spark, config.output.images_table, "image_id")
    assert set(final) == {"coffee", "rocket"}
    assert final["rocket"]["path"].endswith("/rocket.jpg") and final["rocket"]["duplicate_files"] == 0
    assert len(key_by(spark, config.output.files_table_path, "path")) == 2
    runs = spark.read.format("delta").load(config.output.runs_table).count()
    assert runs == 5


def test_bad_sales_fails_clearly_and_records_the_failed_run(spark: Any, make_config: Any,
                                                            tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "astronaut.jpg").write_bytes(encode(photo("astronaut")))
    write_sales(tmp_path / "sales", ["astronaut", "astronaut"])
    config = make_config(folder, tmp_path / "sales")
    with pytest.raises(IngestError, match=r"duplicate values \('astronaut' x2\)"):
        run_ingest(spark, config, report_file=str(tmp_path / "r.json"))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "failed" and "duplicate values" in report["error"]
    runs = spark.read.format("delta").load(config.output.runs_table).collect()
    assert [r.status for r in runs] == ["failed"]

    missing = make_config(folder, tmp_path / "no_sales_here")
    with pytest.raises(IngestError, match="input.sales: cannot read Parquet"):
        run_ingest(spark, missing)


def test_command_line_and_spark_submit_entry_point(make_config: Any, tmp_path: Path) -> None:
    write_sample(tmp_path, with_variants=False)
    config = tmp_path / "c.yaml"
    config.write_text((REPO / "conf" / "local.yaml").read_text())
    sets = [f"input.images={tmp_path / 'images'}", f"input.sales={tmp_path / 'sales'}",
            f"output.images_table={tmp_path}/d/images", f"output.embeddings_table={tmp_path}/d/embeddings",
            f"output.runs_table={tmp_path}/d/runs", f"spark.ivy_dir={REPO / '.cache' / 'ivy'}"]
    args = [arg for s in sets for arg in ("--set", s)]
    bad = subprocess.run([sys.executable, "-m", "image_embeddings", "ingest", "--config", str(config),
                          "--set", "preprocess.sise=10"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert "preprocess.sise: unknown config key" in bad.stderr

    report = tmp_path / "report.json"
    ok = subprocess.run([sys.executable, str(REPO / "jobs" / "ingest_images.py"), "--config", str(config),
                         *args, "--report", str(report)], capture_output=True, text=True, timeout=600,
                        cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["status"] == "succeeded"
    assert data["metrics"]["files_decoded"] == len(PHOTOS)
    assert "run report: run_id=" in ok.stderr


def test_empty_folder_every_file_broken_and_missing_folder(spark: Any, make_config: Any, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    write_sales(tmp_path / "sales", ["a", "b"])
    config = make_config(folder, tmp_path / "sales")
    empty = run_ingest(spark, config)
    assert (empty.status, empty.metrics["files_listed"], empty.metrics["images"]) == ("succeeded", 0, 0)
    assert empty.metrics["sales_without_images"] == 2
    assert spark.read.format("delta").load(config.output.images_table).count() == 0, "empty tables exist"

    (folder / "a.jpg").write_bytes(b"not a jpeg")
    (folder / "b.png").write_bytes(encode(photo("rocket"), fmt="PNG")[:100])
    broken = run_ingest(spark, config)
    assert broken.status == "succeeded"
    assert broken.metrics["errors"] == {"not_an_image": 1, "truncated": 1}
    rows = key_by(spark, config.output.images_table, "image_id")
    assert {k: v["error"].split(":")[0] for k, v in rows.items()} == {"a": "not_an_image", "b": "truncated"}
    thumbnails = key_by(spark, config.output.files_table_path, "path")
    assert [v["image"] for v in thumbnails.values()] == [None, None]

    missing = make_config(tmp_path / "no_such_folder", tmp_path / "sales", tables=tmp_path / "other")
    with pytest.raises(IngestError, match="input.images: cannot list"):
        run_ingest(spark, missing)


def test_files_deleted_between_listing_and_reading_become_unreadable_rows(spark: Any, make_config: Any,
                                                                           tmp_path: Path, monkeypatch: Any) -> None:
    """A file deleted after the plan listed it: the run goes on, and the file gets an ``unreadable`` row (which a
    later run retries or, once the file is gone from the listing too, removes)."""
    import image_embeddings.ingest.stage as ingest

    folder = tmp_path / "images"
    folder.mkdir()
    names = ["astronaut", "coffee", "rocket", "camera", "chelsea"]
    for name in names[:3]:
        (folder / f"{name}.jpg").write_bytes(encode(photo(name)))
    write_sales(tmp_path / "sales", names)
    config = make_config(folder, tmp_path / "sales")
    real_read = ingest.read_planned

    def deleting(victim: str) -> Any:
        def read(spark: Any, root: str, paths: list[str] | None, *args: Any, **kwargs: Any) -> Any:
            (folder / victim).unlink()  # after the plan, before Spark reads
            return real_read(spark, root, paths, *args, **kwargs)
        return read

    # Every listed file is new: the run reads the folder.
    monkeypatch.setattr(ingest, "read_planned", deleting("rocket.jpg"))
    first = run_ingest(spark, config)
    files = key_by(spark, config.output.files_table_path, "path")
    assert first.status == "succeeded" and first.metrics["errors"] == {"unreadable": 1}
    assert files[f"file:{folder}/rocket.jpg"]["error"].startswith("unreadable: ")
    assert {p for p, r in files.items() if r["error"] is None} == {f"file:{folder}/{n}.jpg" for n in names[:2]}

    # Some files are known: the run reads a list of paths, one of which is gone by then.
    for name in names[3:]:
        (folder / f"{name}.jpg").write_bytes(encode(photo(name)))
    monkeypatch.setattr(ingest, "read_planned", deleting("camera.jpg"))
    second = run_ingest(spark, config)
    files = key_by(spark, config.output.files_table_path, "path")
    assert second.status == "succeeded" and second.metrics["files_decoded"] == 1
    assert second.metrics["errors"] == {"unreadable": 1}
    assert second.metrics["files_removed"] == 1 and f"file:{folder}/rocket.jpg" not in files  # no longer listed
    assert files[f"file:{folder}/camera.jpg"]["error"].startswith("unreadable: ")
    assert files[f"file:{folder}/chelsea.jpg"]["error"] is None

    # Nothing deleted this time: the deleted file leaves the table, the others are untouched.
    monkeypatch.setattr(ingest, "read_planned", real_read)
    third = run_ingest(spark, config)
    assert (third.metrics["files_removed"], third.metrics["files_decoded"], third.metrics["errors"]) == (1, 0, {})
    assert set(key_by(spark, config.output.images_table, "image_id")) == {"astronaut", "coffee", "chelsea"}
