"""``image-embeddings maintain``: OPTIMIZE and VACUUM of the package's tables, against local Spark and Delta."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from image_embeddings.cli import main
from image_embeddings.core.config import AppConfig
from image_embeddings.ops.maintain import (
    RETENTION_CHECK,
    RETENTION_PROPERTY,
    MaintenanceError,
    RetentionTooShortError,
    interval_hours,
    run_maintain,
)

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "conf" / "local.yaml"


def _build_table(spark: Any, path: str, appends: int = 3) -> None:
    """A small Delta table of many small files: an initial write, appends and a merge (which rewrites a file)."""
    from delta.tables import DeltaTable

    for i in range(appends):
        spark.range(i * 10, i * 10 + 10).selectExpr("id", "CAST(id AS STRING) AS name").coalesce(1) \
            .write.format("delta").mode("append").save(path)
    changed = spark.range(0, 5).selectExpr("id", "CONCAT('changed-', CAST(id AS STRING)) AS name")
    (DeltaTable.forPath(spark, path).alias("t").merge(changed.alias("s"), "t.id = s.id")
     .whenMatchedUpdateAll().execute())


def _rows(spark: Any, path: str) -> list[tuple[int, str]]:
    return sorted((r["id"], r["name"]) for r in spark.read.format("delta").load(path).collect())


def _num_files(spark: Any, path: str) -> int:
    from delta.tables import DeltaTable

    return int(DeltaTable.forPath(spark, path).detail().select("numFiles").first()[0])


def _parquet_on_disk(path: str) -> int:
    return len(list(Path(path).glob("*.parquet")))


def _version(spark: Any, path: str) -> int:
    from delta.tables import DeltaTable

    return int(DeltaTable.forPath(spark, path).history(1).select("version").first()[0])


def _maintain_runs(spark: Any, config: AppConfig) -> list[Any]:
    return [r for r in spark.read.format("delta").load(config.output.runs_table).collect() if r["stage"] == "maintain"]


@pytest.fixture
def config(make_config: Any, spark: Any, tmp_path: Path) -> AppConfig:
    """A config whose files, images and embeddings tables exist (many small files each); no runs table yet."""
    built = make_config(tmp_path / "images", tmp_path / "sales", tables=tmp_path / "delta")
    for path in (built.output.files_table_path, built.output.images_table, built.output.embeddings_table):
        _build_table(spark, path)
    return built


def _cli_args(config: AppConfig, base_overrides: list[str], *extra: str) -> list[str]:
    out = config.output
    sets = [*base_overrides, f"input.images={config.input.images}", f"input.sales={config.input.sales}",
            f"output.images_table={out.images_table}", f"output.embeddings_table={out.embeddings_table}",
            f"output.runs_table={out.runs_table}", *extra]
    return ["maintain", "--config", str(LOCAL), *[a for s in sets for a in ("--set", s)]]


def test_optimize_compacts_and_vacuum_with_the_default_retention(spark: Any, config: AppConfig,
                                                                 tmp_path: Path) -> None:
    paths = {"files": config.output.files_table_path, "images": config.output.images_table,
             "embeddings": config.output.embeddings_table}
    rows = {name: _rows(spark, p) for name, p in paths.items()}
    files = {name: _num_files(spark, p) for name, p in paths.items()}
    versions = {name: _version(spark, p) for name, p in paths.items()}
    on_disk = {name: _parquet_on_disk(p) for name, p in paths.items()}
    assert all(n >= 3 for n in files.values()), files

    report = run_maintain(spark, config, report_file=str(tmp_path / "report.json"), run_date="2026-11-23")

    assert report.status == "succeeded" and report.stage == "maintain"
    tables = report.metrics["tables"]
    assert tables["runs"] == {"path": config.output.runs_table, "skipped": "does not exist yet"}
    for name, path in paths.items():
        assert _rows(spark, path) == rows[name], "OPTIMIZE changes no row"
        assert _num_files(spark, path) == 1 < files[name]
        entry = tables[name]
        assert entry["optimize"] == {"files_removed": files[name], "files_added": 1}
        assert entry["version_before"] == versions[name] and entry["version_after"] > versions[name]
        assert entry["version_after"] == _version(spark, path)
        # 168 hours keeps every file a version of the last week needs: nothing is deleted, time travel works.
        assert entry["vacuum_deleted_files"] in (0, None)
        assert _parquet_on_disk(path) == on_disk[name] + 1
        first = spark.read.format("delta").option("versionAsOf", 0).load(path).count()
        assert first == 10
    assert report.metrics["files_removed"] == sum(files.values()) and report.metrics["files_added"] == 3
    assert report.metrics["tables_maintained"] == 3 and report.metrics["tables_skipped"] == 1
    assert "images_per_second" not in report.metrics

    runs = _maintain_runs(spark, config)
    assert [(r["status"], r["run_date"]) for r in runs] == [("succeeded", "2026-11-23")]
    stored = json.loads(runs[0]["report"])
    assert stored["metrics"]["tables"]["images"]["optimize"]["files_removed"] == files["images"]
    assert json.loads((tmp_path / "report.json").read_text())["run_id"] == report.run_id


def test_short_retention_refused_without_the_flag_and_nothing_touched(
        spark: Any, config: AppConfig, base_overrides: list[str], caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    paths = [config.output.files_table_path, config.output.images_table, config.output.embeddings_table]
    before = [(_version(spark, p), _num_files(spark, p), _parquet_on_disk(p)) for p in paths]
    caplog.set_level(logging.ERROR, logger="image_embeddings")

    assert main(_cli_args(config, base_overrides, "maintenance.vacuum_retention_hours=1")) == 2

    errors = [r.getMessage() for r in caplog.records
              if r.name.startswith("image_embeddings") and r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert errors[0].startswith(
        "maintain refused: maintenance.vacuum_retention_hours: 1 is shorter than the 168 hours the files table at "
        f"{config.output.files_table_path} keeps deleted files (Delta's default delta.deletedFileRetentionDuration")
    assert errors[0].endswith("Set at least 168, or pass --allow-short-retention to do it anyway")
    assert [(_version(spark, p), _num_files(spark, p), _parquet_on_disk(p)) for p in paths] == before
    assert capsys.readouterr().out == ""
    runs = _maintain_runs(spark, config)
    assert [r["status"] for r in runs] == ["failed"]
    assert json.loads(runs[0]["report"])["error"].startswith("maintenance.vacuum_retention_hours: 1 is shorter than")


def test_a_tables_own_longer_retention_is_its_minimum(spark: Any, config: AppConfig) -> None:
    import dataclasses

    images = config.output.images_table
    spark.sql(f"ALTER TABLE delta.`{images}` SET TBLPROPERTIES ('{RETENTION_PROPERTY}' = 'interval 10 days')")
    week = dataclasses.replace(config, maintenance=dataclasses.replace(config.maintenance, optimize=False))
    before = _version(spark, images)
    with pytest.raises(RetentionTooShortError) as info:
        run_maintain(spark, week)
    assert str(info.value).startswith(
        f"maintenance.vacuum_retention_hours: 168 is shorter than the 240 hours the images table at {images} keeps "
        "deleted files (delta.deletedFileRetentionDuration = interval 10 days)")
    assert _version(spark, images) == before


def test_short_retention_with_the_flag_vacuums(spark: Any, config: AppConfig, base_overrides: list[str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    paths = {"files": config.output.files_table_path, "images": config.output.images_table,
             "embeddings": config.output.embeddings_table}
    rows = {name: _rows(spark, p) for name, p in paths.items()}
    assert all(_parquet_on_disk(p) >= 4 for p in paths.values())
    check_before = spark.conf.get(RETENTION_CHECK, None)

    assert main(_cli_args(config, base_overrides, "maintenance.vacuum_retention_hours=0")
                + ["--allow-short-retention", "--run-date", "2026-11-24"]) == 0

    assert spark.conf.get(RETENTION_CHECK, None) == check_before, "Delta's check is restored after the call"
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == f"runs: {config.output.runs_table}: does not exist yet, skipped"
    for name, path in paths.items():
        assert _rows(spark, path) == rows[name]
        assert _parquet_on_disk(path) == _num_files(spark, path) == 1, "only the compacted file is left"
        with pytest.raises(Exception, match="(?i)(FileNotFound|DELTA_FILE_NOT_FOUND|does not exist)"):
            spark.read.format("delta").option("versionAsOf", 0).load(path).collect()
        line = next(line for line in printed if line.startswith(f"{name}: "))
        assert "OPTIMIZE removed" in line and "VACUUM deleted" in line
    runs = _maintain_runs(spark, config)
    assert [(r["status"], r["run_date"]) for r in runs] == [("succeeded", "2026-11-24")]
    report = json.loads(runs[0]["report"])["metrics"]
    assert report["allow_short_retention"] is True and report["vacuum_retention_hours"] == 0
    deleted = report["tables"]["images"]["vacuum_deleted_files"]
    assert deleted is None or deleted >= 4


def test_a_failing_table_does_not_stop_the_others(spark: Any, config: AppConfig) -> None:
    images = config.output.images_table
    from urllib.parse import urlparse

    live = spark.read.format("delta").load(images).inputFiles()
    Path(urlparse(sorted(live)[0]).path).unlink()  # a file of the current version is gone: OPTIMIZE cannot read it
    others = [config.output.files_table_path, config.output.embeddings_table]
    rows = [_rows(spark, p) for p in others]

    with pytest.raises(MaintenanceError) as info:
        run_maintain(spark, config)

    assert str(info.value).startswith("maintenance failed on the images table(s): ")
    assert [_num_files(spark, p) for p in others] == [1, 1] and [_rows(spark, p) for p in others] == rows
    runs = _maintain_runs(spark, config)
    assert [r["status"] for r in runs] == ["failed"]
    stored = json.loads(runs[0]["report"])["metrics"]["tables"]
    assert "error" in stored["images"] and stored["files"]["optimize"]["files_added"] == 1


def test_cli_negative_retention_is_a_config_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="image_embeddings")
    assert main(["maintain", "--config", str(LOCAL), "--set", "maintenance.vacuum_retention_hours=-5"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.name == "image_embeddings" and r.levelno == logging.ERROR]
    assert errors == ["invalid configuration: maintenance.vacuum_retention_hours: must be >= 0, got -5"]


@pytest.mark.parametrize(("text", "hours"), [
    ("interval 7 days", 168.0), ("interval 1 week", 168.0), ("INTERVAL 2 DAYS 12 HOURS", 60.0),
    ("168 hours", 168.0), ("interval 90 minutes", 1.5), ("interval 3600 seconds", 1.0),
])
def test_interval_hours(text: str, hours: float) -> None:
    assert interval_hours(text) == pytest.approx(hours)


@pytest.mark.parametrize("text", ["", "interval", "7", "interval 1 month", "interval x days"])
def test_interval_hours_refuses_what_delta_would_not_take(text: str) -> None:
    with pytest.raises(ValueError):
        interval_hours(text)
