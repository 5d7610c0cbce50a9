"""One writer at a time per set of tables: the lease on local disks and on S3, raced by real processes, and two
`ingest` commands started at once against the same tables on the local S3 server."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from image_embeddings.core.lease import LeaseHeldError, LeaseSettings, S3LeaseStore, holding, store_for
from image_embeddings.testing.sample import write_sample

REPO = Path(__file__).resolve().parents[1]


def _race(location: str, endpoint: str | None, start: float, out: Any) -> None:
    """One process of the race: wait for the common start, try once to take the lease, report and hold it."""
    time.sleep(max(0.0, start - time.time()))
    try:
        with holding(LeaseSettings(location, wait_seconds=0, ttl_seconds=60, endpoint=endpoint), "race"):
            out.put("won")
            time.sleep(1.5)
    except LeaseHeldError:
        out.put("lost")


def _race_processes(location: str, endpoint: str | None, n: int = 4) -> list[str]:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start = time.time() + 3.0  # after every process has imported the package
    procs = [ctx.Process(target=_race, args=(location, endpoint, start, out)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    return sorted(results)


def test_a_local_lease_is_exclusive_waits_names_its_holder_and_is_released(tmp_path: Path) -> None:
    settings = LeaseSettings(str(tmp_path / "images_lease.json"), wait_seconds=0.5, ttl_seconds=60)
    with holding(settings, "ingest") as lease:
        assert lease is not None
        held = json.loads((tmp_path / "images_lease.json").read_text())
        assert held["command"] == "ingest" and held["owner"] == lease.owner
        with holding(settings, "embed"):  # nested in one process (run = ingest, then embed): the same lease
            pass
        assert (tmp_path / "images_lease.json").exists()
        other = store_for(settings)
        assert other is not None and other.create(b"{}") is None, "a second create must fail while it is held"
    assert not (tmp_path / "images_lease.json").exists(), "released on exit"


def test_a_second_process_waits_then_fails_naming_the_holder(tmp_path: Path) -> None:
    location = str(tmp_path / "lease.json")
    code = ("import sys, time\nfrom image_embeddings.core.lease import LeaseSettings, holding\n"
            f"with holding(LeaseSettings({location!r}, ttl_seconds=60), 'nightly'):\n"
            "    print('held', flush=True); time.sleep(30)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(LeaseHeldError) as failed, holding(LeaseSettings(location, wait_seconds=2), "ingest"):
            pytest.fail("the lease was taken while another process held it")
        assert time.monotonic() - started >= 2, "it waits lease.wait_seconds first"
        message = str(failed.value)
        assert f":{holder.pid}:" in message and "nightly run" in message and " since 20" in message
        assert "Nothing was written" in message and "lease.wait_seconds" in message
    finally:
        holder.kill()
        holder.wait()


def test_the_lease_of_a_killed_holder_is_taken_over_after_it_expires(tmp_path: Path) -> None:
    location = str(tmp_path / "lease.json")
    code = ("import os, signal\nfrom image_embeddings.core.lease import LeaseSettings, holding\n"
            f"with holding(LeaseSettings({location!r}, ttl_seconds=10), 'nightly'):\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    left = json.loads(Path(location).read_text())
    with pytest.raises(LeaseHeldError), holding(LeaseSettings(location, wait_seconds=0, ttl_seconds=10), "ingest"):
        pytest.fail("taken before it expired")
    with holding(LeaseSettings(location, wait_seconds=15, ttl_seconds=10), "ingest") as lease:
        assert lease is not None and json.loads(Path(location).read_text())["owner"] != left["owner"]


def test_the_holder_renews_its_lease_while_it_runs(tmp_path: Path) -> None:
    location = str(tmp_path / "lease.json")
    with holding(LeaseSettings(location, ttl_seconds=10), "embed"):
        first = json.loads(Path(location).read_text())["expires_at"]
        time.sleep(4.5)  # two heartbeats (every ttl / 5)
        renewed = json.loads(Path(location).read_text())["expires_at"]
        assert renewed > first
        store = store_for(LeaseSettings(location))
        assert store is not None and store.create(b"{}") is None, "still held after its first ttl"


def test_processes_racing_for_a_local_lease_one_wins(tmp_path: Path) -> None:
    assert _race_processes(str(tmp_path / "lease.json"), None) == ["lost", "lost", "lost", "won"]


def test_processes_racing_for_an_s3_lease_one_wins_by_conditional_put(s3_server: Any) -> None:
    s3 = s3_server.client()
    s3.create_bucket(Bucket="lease")
    location = "s3a://lease/delta/images_lease.json"
    assert _race_processes(location, s3_server.endpoint) == ["lost", "lost", "lost", "won"]
    store = S3LeaseStore(location, s3_server.endpoint, None)
    assert store.read() is None, "the winner released it"
    token = store.create(b'{"owner": "a"}')
    assert token is not None and store.create(b'{"owner": "b"}') is None
    assert store.replace('"not-the-etag"', b'{"owner": "b"}') is None, "a stale ETag changes nothing"
    renewed = store.replace(token, b'{"owner": "a", "beat": 2}')
    assert renewed is not None and store.read() == (b'{"owner": "a", "beat": 2}', renewed)
    store.delete(token)  # an old token deletes nothing
    assert store.read() is not None
    store.delete(renewed)
    assert store.read() is None


def _ingest(tmp_path: Path, s3_plan: Any, day: str, *extra: str) -> subprocess.Popen[str]:
    sets = [f"s3.endpoint={s3_plan.endpoint}", "s3.ssl=false", "input.images=s3a://shared/raw/{run_date}",
            "input.sales=s3a://shared/sales", "output.images_table=s3a://shared/delta/images",
            "output.embeddings_table=s3a://shared/delta/embeddings", "output.runs_table=s3a://shared/delta/runs",
            f"spark.ivy_dir={REPO / '.cache' / 'ivy'}", "spark.conf.spark.sql.shuffle.partitions=2", *extra]
    args = [sys.executable, "-m", "image_embeddings", "ingest", "--config", str(REPO / "conf" / "local.yaml"),
            "--run-date", day, "--log-level", "WARNING", "--log-file", str(tmp_path / f"{day}-{time.time()}.log")]
    env = {**os.environ, **s3_plan.env()}
    return subprocess.Popen([*args, *[a for s in sets for a in ("--set", s)]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)


@pytest.mark.xdist_group("processes")
def test_two_ingest_processes_at_once_lose_nothing_and_a_blocked_run_changes_nothing(
        spark: Any, s3_server: Any, s3_plan: Any, tmp_path: Path) -> None:
    s3 = s3_server.client()
    s3.create_bucket(Bucket="shared")
    ids = write_sample(tmp_path / "sample", with_variants=False)
    photos = sorted((tmp_path / "sample" / "images").rglob("*.jpg"))
    days = {"2026-12-01": photos[: len(photos) // 2], "2026-12-02": photos[len(photos) // 2:]}
    for day, files in days.items():
        for path in files:
            s3.upload_file(str(path), "shared", f"raw/{day}/{path.name}")
    s3.upload_file(str(next((tmp_path / "sample" / "sales").glob("*.parquet"))), "shared", "sales/part-0.parquet")

    # Two backfill days and a retry of the first beside it, started together: they take turns.
    runs = [_ingest(tmp_path, s3_plan, day) for day in (*days, "2026-12-01")]
    outcomes = [(p.wait(timeout=600), p.stderr.read() if p.stderr else "") for p in runs]
    assert [code for code, _ in outcomes] == [0, 0, 0], [err[-2000:] for _, err in outcomes]
    images = spark.read.format("delta").load("s3a://shared/delta/images")
    assert images.count() == len(ids) and images.select("image_id").distinct().count() == len(ids)
    files = spark.read.format("delta").load("s3a://shared/delta/images_files")
    assert files.count() == len(photos) and files.where("image IS NOT NULL").count() == len(photos)
    runs_rows = spark.read.format("delta").load("s3a://shared/delta/runs").where("status = 'succeeded'").count()
    assert runs_rows == 3, "every run's report row is there once"
    assert s3.list_objects_v2(Bucket="shared", Prefix="delta/images_lease.json").get("KeyCount", 0) == 0

    # A run that cannot get the lease within lease.wait_seconds says so in one line and changes nothing.
    from image_embeddings.core.tables import table_version

    before = [table_version(spark, f"s3a://shared/delta/{t}") for t in ("images", "images_files", "runs")]
    settings = LeaseSettings("s3a://shared/delta/images_lease.json", ttl_seconds=120, endpoint=s3_server.endpoint)
    with holding(settings, "nightly") as held:
        assert held is not None
        blocked = _ingest(tmp_path, s3_plan, "2026-12-02", "lease.wait_seconds=2")
        code, err = blocked.wait(timeout=300), blocked.stderr.read() if blocked.stderr else ""
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "ingest failed: another run holds the lease on these tables: nightly run" in lines[0]
    assert held.owner in lines[0] and "Nothing was written" in lines[0]
    assert [table_version(spark, f"s3a://shared/delta/{t}") for t in ("images", "images_files", "runs")] == before
