"""Shared fixtures: one local SparkSession (with Delta and S3A) per test run, and a local MinIO server started
only when a test uses S3: tests on tiny frames and local tables need no server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from image_embeddings.config import AppConfig, load_config

REPO = Path(__file__).resolve().parents[1]
LOCAL_CONF = REPO / "conf" / "local.yaml"


@dataclass(frozen=True)
class S3Plan:
    """Where the test S3 server will listen and its credentials, fixed before any JVM starts (S3A reads the
    credentials from the JVM's environment); the server itself starts only for tests that ask for it."""

    port: int
    access_key: str
    secret_key: str

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="session")
def s3_plan() -> Iterator[S3Plan]:
    """The test S3 server's address and credentials, exported for boto3 and Spark's S3A; no process yet."""
    import secrets

    from image_embeddings.s3server import reserved_port

    # Planned now, bound when a test first needs the server: a port no outgoing connection can take meanwhile.
    plan = S3Plan(reserved_port(), "test" + secrets.token_hex(4), secrets.token_hex(16))
    saved = {k: os.environ.get(k) for k in plan.env()}
    os.environ.update(plan.env())
    yield plan
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def s3_server(s3_plan: S3Plan, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real MinIO on 127.0.0.1, started for the tests that use S3, at the planned address."""
    from image_embeddings import s3server

    try:
        server = s3server.start(tmp_path_factory.mktemp("minio") / "data", port=s3_plan.port,
                                access_key=s3_plan.access_key, secret_key=s3_plan.secret_key)
    except FileNotFoundError as exc:
        pytest.fail(f"the tests need a local S3 server: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def base_overrides(s3_plan: S3Plan) -> list[str]:
    """Overrides that point conf/local.yaml at the test S3 server (which tests using S3 start: ``s3_server``)."""
    return [f"s3.endpoint={s3_plan.endpoint}", "s3.ssl=false"]


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
        f"spark.conf.spark.local.dir={scratch}/local", f"spark.conf.spark.sql.warehouse.dir={scratch}/warehouse",
        # This JVM runs for the whole suite: the optimizing JIT tier pays for itself here (conf/local.yaml turns it
        # off for single runs). Five runs of the soak test's pipeline took 31 s each with C1 only, 17 s with C2.
        "spark.conf.spark.driver.extraJavaOptions=-XX:+UseSerialGC"])
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


def pytest_unconfigure(config: pytest.Config) -> None:
    """Keep pytest's summary the last line: triton (which torchvision imports) prints hundreds of nanobind
    "leaked ..." lines to stderr when the interpreter shuts down. An exit handler, which runs after pytest has
    restored its captured file descriptors and before modules are torn down, points stderr at /dev/null then."""
    import atexit
    import sys

    def silence() -> None:
        if "triton" in sys.modules:
            sys.stderr.flush()
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)

    atexit.register(silence)
