"""What an operator sees on the console: a quiet start, one line when a command fails, the traces in a file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from image_embeddings.core.errors import failure_line
from image_embeddings.testing.sample import write_sales

REPO = Path(__file__).resolve().parents[1]
NOISE = ("Ivy Default Cache", ":: resolution report", "WARNING: Using incubator modules", "NativeCodeLoader",
         "SparkStringUtils", "log4j", "\tat ", "Traceback", "py4j")


def _command(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "image_embeddings", "ingest", "--config", str(REPO / "conf" / "local.yaml"),
            "--set", f"input.images={tmp_path / 'no_such_folder'}", "--set", f"input.sales={tmp_path / 'sales'}",
            "--set", f"output.images_table={tmp_path / 'delta' / 'images'}",
            "--set", f"output.embeddings_table={tmp_path / 'delta' / 'embeddings'}",
            "--set", f"output.runs_table={tmp_path / 'delta' / 'runs'}",
            "--set", f"spark.ivy_dir={REPO / '.cache' / 'ivy'}", *extra]
    env = {**os.environ, "IMAGE_EMBEDDINGS_LOG_DIR": str(tmp_path / "logs")}
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)


def test_a_missing_folder_fails_in_one_line_with_the_details_in_a_file(tmp_path: Path) -> None:
    write_sales(tmp_path / "sales", ["a"])
    done = _command(tmp_path)
    assert done.returncode == 1
    console = (done.stdout + done.stderr).strip().splitlines()
    last = console[-1]
    [log_file] = (tmp_path / "logs").glob("ingest-*.log")
    assert " ERROR image_embeddings: ingest failed: input.images: cannot list " in last
    assert last.endswith(f"tables of the failed stage are at their previous versions; report in the runs table "
                         f"{tmp_path / 'delta' / 'runs'}; details in {log_file}")
    assert len(console) <= 6 and not [line for line in console if any(n in line for n in NOISE)], console
    details = log_file.read_text()
    assert "Traceback" in details and "PATH_NOT_FOUND" in details and "Ivy Default Cache" in details

    loud = _command(tmp_path, "--verbose")  # everything on the console, the trace included
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "Ivy Default Cache" in loud.stderr
    assert "details in" not in loud.stderr.strip().splitlines()[-1]


class _JavaThrowable:
    """Stands for a py4j JavaObject of a Java exception with a cause chain."""

    def __init__(self, name: str, message: str, cause: Any = None) -> None:
        self.name, self.message, self.cause = name, message, cause

    def getClass(self) -> Any:  # noqa: N802 - the Java API's names
        return type("C", (), {"getSimpleName": lambda _: self.name})()

    def getMessage(self) -> str:  # noqa: N802
        return self.message

    def getCause(self) -> Any:  # noqa: N802
        return self.cause

    def equals(self, other: Any) -> bool:
        return other is self


class Py4JJavaError(Exception):
    def __init__(self, java: _JavaThrowable) -> None:
        super().__init__("An error occurred while calling o123.save.\n: org.apache.spark.SparkException: ...")
        self.java_exception = java


def test_the_cause_of_a_jvm_failure_in_one_line() -> None:
    refused = _JavaThrowable("SparkException", "Job aborted due to stage failure: Task 0 in stage 3.0 failed 4 "
                             "times, most recent failure: Lost task 0.3\n\tat org.apache...", _JavaThrowable(
                                 "AWSClientIOException", "getFileStatus on s3a://flaky/delta/images: "
                                 "software.amazon.awssdk.core.exception.SdkClientException: Unable to execute HTTP "
                                 "request: Connect to 127.0.0.1:34659 [/127.0.0.1] failed: Connection refused",
                                 _JavaThrowable("ConnectException", "Connection refused")))
    assert failure_line(Py4JJavaError(refused)) == (
        "cannot reach the object store at 127.0.0.1:34659: connection refused")
    denied = _JavaThrowable("SparkException", "Job aborted", _JavaThrowable(
        "AccessDeniedException", "s3a://b/k: getFileStatus on s3a://b/k: Forbidden (Service: S3, Status Code: 403)\n"
        "more lines"))
    assert failure_line(Py4JJavaError(denied)) == (
        "AccessDeniedException: s3a://b/k: getFileStatus on s3a://b/k: Forbidden (Service: S3, Status Code: 403)")
    with pytest.raises(ValueError) as info:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise ValueError("outer\nsecond line") from inner
    assert failure_line(info.value) == "KeyError: 'inner'"


@pytest.mark.xdist_group("processes")
def test_the_store_stopped_mid_run_fails_in_few_lines(tmp_path: Path, s3_server: Any) -> None:
    """The object store goes away after the files table is written: the images table write and the runs-table
    append both fail, and the console still shows a handful of lines, the last naming the cause."""
    import threading
    import time

    from image_embeddings.testing import s3server
    from image_embeddings.testing.sample import PHOTOS, encode, photo

    server = s3server.start(tmp_path / "minio", access_key=s3_server.access_key, secret_key=s3_server.secret_key)
    port = int(server.endpoint.rsplit(":", 1)[1])
    client = server.client()
    client.create_bucket(Bucket="store")
    for name in PHOTOS[:4]:
        client.put_object(Bucket="store", Key=f"raw/{name}.jpg", Body=encode(photo(name), size=(320, 240)))
    write_sales(tmp_path / "sales", list(PHOTOS[:4]))

    def stop_after_the_files_commit() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            listed = client.list_objects_v2(Bucket="store", Prefix="delta/images_files/_delta_log/")
            if any(o["Key"].endswith(".json") for o in listed.get("Contents", [])):
                break
            time.sleep(0.05)
        server.stop()

    stopper = threading.Thread(target=stop_after_the_files_commit)
    stopper.start()
    args = [sys.executable, "-m", "image_embeddings", "ingest", "--config", str(REPO / "conf" / "local.yaml"),
            *[a for s in ("input.images=s3a://store/raw", f"input.sales={tmp_path / 'sales'}",
                          "output.images_table=s3a://store/delta/images",
                          "output.embeddings_table=s3a://store/delta/embeddings",
                          "output.runs_table=s3a://store/delta/runs", f"s3.endpoint={server.endpoint}", "s3.ssl=false",
                          "s3.max_attempts=1", "s3.retry_limit=0", f"lease.location={tmp_path / 'lease.json'}",
                          "spark.conf.spark.hadoop.fs.s3a.connection.establish.timeout=2s",
                          f"spark.ivy_dir={REPO / '.cache' / 'ivy'}") for a in ("--set", s)]]
    env = {**os.environ, **server.env(), "IMAGE_EMBEDDINGS_LOG_DIR": str(tmp_path / "logs")}
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    finally:
        stopper.join(timeout=60)
        server.stop()
    console = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 1, console[-20:]
    assert len(console) < 40 and not [line for line in console if any(n in line for n in NOISE)], console
    assert any("could not append the run report to s3a://store/delta/runs: cannot reach the object store" in line
               for line in console), console
    assert f"ingest failed: cannot reach the object store at 127.0.0.1:{port}: connection refused" in console[-1]
