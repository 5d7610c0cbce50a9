"""Shared fixtures: one local MinIO server and one local SparkSession (with Delta and S3A) per test run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from image_embeddings.config import AppConfig, load_config

REPO = Path(__file__).resolve().parents[1]
LOCAL_CONF = REPO / "conf" / "local.yaml"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real MinIO on 127.0.0.1; its credentials are exported for boto3 and Spark's S3A."""
    from image_embeddings import s3server

    try:
        server = s3server.start(tmp_path_factory.mktemp("minio") / "data")
    except FileNotFoundError as exc:
        pytest.fail(f"the tests need a local S3 server: {exc}", pytrace=False)
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def base_overrides(s3_server: object) -> list[str]:
    """Overrides that point conf/local.yaml at the test S3 server."""
    return [f"s3.endpoint={s3_server.endpoint}", "s3.ssl=false"]  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def spark(base_overrides: list[str], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One local SparkSession for the whole run, created by the package's own factory."""
    from image_embeddings.spark import get_spark

    scratch = tmp_path_factory.mktemp("spark")
    config = load_config(LOCAL_CONF, [
        *base_overrides, f"input.images={scratch}/images", f"input.sales={scratch}/sales",
        f"output.images_table={scratch}/t/images", f"output.embeddings_table={scratch}/t/embeddings",
        f"output.runs_table={scratch}/t/runs", f"spark.ivy_dir={REPO / '.cache' / 'ivy'}",
        "spark.conf.spark.sql.shuffle.partitions=2", "spark.master=local[2,4]",  # 4 tries per task, as on a cluster
        f"spark.conf.spark.local.dir={scratch}/local"])
    session = get_spark(config)
    yield session
    session.stop()


@pytest.fixture
def make_config(base_overrides: list[str], tmp_path: Path):  # type: ignore[no-untyped-def]
    """Build a config from conf/local.yaml whose tables live in this test's temp folder."""

    def build(images: str | Path, sales: str | Path, *overrides: str, tables: str | Path | None = None
              ) -> AppConfig:
        where = str(tables) if tables is not None else str(tmp_path / "delta")
        return load_config(LOCAL_CONF, [
            *base_overrides, f"input.images={images}", f"input.sales={sales}",
            f"output.images_table={where}/images", f"output.embeddings_table={where}/embeddings",
            f"output.runs_table={where}/runs", f"spark.ivy_dir={REPO / '.cache' / 'ivy'}", *overrides])

    return build
