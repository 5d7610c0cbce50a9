"""Credentials never reach what the package writes: refused inside any config value, scrubbed from every report,
log line, runs-table row, failure line, `status` and `check-config` output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from image_embeddings.core.redaction import is_secret_key, redact, scrub
from image_embeddings.testing.sample import write_sample

REPO = Path(__file__).resolve().parents[1]
KEY_ID = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # the shape of an AWS secret key, with '/' in it


def _cli(tmp_path: Path, command: str, *sets: str,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = [f"input.images={tmp_path / 'sample' / 'images'}", f"input.sales={tmp_path / 'sample' / 'sales'}",
            f"output.images_table={tmp_path / 'delta' / 'images'}",
            f"output.embeddings_table={tmp_path / 'delta' / 'embeddings'}",
            f"output.runs_table={tmp_path / 'delta' / 'runs'}", f"spark.ivy_dir={REPO / '.cache' / 'ivy'}"]
    args = [sys.executable, "-m", "image_embeddings", command, "--config", str(REPO / "conf" / "local.yaml"),
            *[a for s in (*base, *sets) for a in ("--set", s)]]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "IMAGE_EMBEDDINGS_LOG_DIR": str(tmp_path / "logs"), **(env or {})})


@pytest.mark.parametrize("setting", [
    f"model.weights=s3://{KEY_ID}:{SECRET}@bucket/w.pt",
    f"s3.endpoint=http://{KEY_ID}:{SECRET}@127.0.0.1:9000",
    f"input.images=s3a://{KEY_ID}:{SECRET}@bucket/raw",
    f"output.images_table=s3a://{KEY_ID}:{SECRET}@bucket/delta/images",
    f"index.location=s3://{KEY_ID}:{SECRET}@bucket/index",
    f"lease.location=s3://{KEY_ID}:{SECRET}@bucket/lease.json",
    f"output.runs_table=abfss://container:{SECRET}@account.dfs.core.windows.net/runs",
    f"spark.conf.spark.jars.repositories=https://deploy:{SECRET}@repo.example.com/maven",
    f"spark.conf.spark.hadoop.fs.s3a.encryption.key={SECRET}",
    f"spark.conf.spark.hadoop.fs.azure.account.key.acct.dfs.core.windows.net={SECRET}",
    f"spark.conf.spark.hadoop.fs.gs.auth.service.account.private.key={SECRET}",
])
def test_a_credential_in_any_value_is_refused_without_being_printed(tmp_path: Path, setting: str) -> None:
    done = _cli(tmp_path, "check-config", setting)
    key = setting.split("=", 1)[0]
    assert done.returncode == 2 and f"invalid configuration: {key}: " in done.stderr, done.stderr
    everything = done.stdout + done.stderr + "".join(p.read_text() for p in (tmp_path / "logs").glob("*"))
    assert SECRET not in everything and SECRET.split("/")[0] not in everything and KEY_ID not in everything


def test_scrub_masks_user_info_key_ids_and_secret_shaped_values_only() -> None:
    text = (f"s3a://{KEY_ID}:{SECRET}@bucket/x failed; key {KEY_ID}; secret {SECRET}; "
            "fs.s3a.secret.key=abc123 and \"password\": \"hunter2\"; http://user@host/x")
    clean = scrub(text)
    for leaked in (KEY_ID, SECRET, "abc123", "hunter2", "user@"):
        assert leaked not in clean, clean
    kept = ("run ingest-20261207T010203Z-1a2b3c4d read s3a://bucket/raw/2026-12-07/photo_00012.jpg (sha256 "
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08) at http://127.0.0.1:9000")
    assert scrub(kept) == kept, "ordinary paths, ids, digests and endpoints are left alone"
    assert is_secret_key("fs.azure.account.key.acct.dfs.core.windows.net") and is_secret_key("fs.s3a.encryption.key")
    assert not is_secret_key("fs.s3a.aws.credentials.provider") and not is_secret_key("fs.s3a.encryption.algorithm")
    assert redact({"endpoint": f"https://u:{SECRET}@h", "n": 1}) == {"endpoint": "https://***@h", "n": 1}


@pytest.mark.xdist_group("processes")
def test_a_run_on_s3_leaves_no_credential_in_any_file_table_or_output(tmp_path: Path, s3_server: Any,
                                                                      s3_plan: Any) -> None:
    """The run's credentials come from the environment (the default provider chain): none of them reaches the
    log file, the report, the runs table or `status`, and a failure line that quotes a credential is scrubbed."""
    write_sample(tmp_path / "sample", with_variants=False)
    client = s3_server.client()
    client.create_bucket(Bucket="secrets")
    for path in sorted((tmp_path / "sample" / "images").glob("*.jpg"))[:3]:
        client.upload_file(str(path), "secrets", f"raw/{path.name}")
    s3 = [f"s3.endpoint={s3_plan.endpoint}", "s3.ssl=false", "input.images=s3a://secrets/raw",
          "output.runs_table=s3a://secrets/delta/runs", "output.images_table=s3a://secrets/delta/images"]
    report = tmp_path / "report.json"
    ran = subprocess.run(
        [sys.executable, "-m", "image_embeddings", "ingest", "--config", str(REPO / "conf" / "local.yaml"),
         "--report", str(report), *[a for s in (
             f"input.sales={tmp_path / 'sample' / 'sales'}", f"output.embeddings_table={tmp_path / 'emb'}",
             f"spark.ivy_dir={REPO / '.cache' / 'ivy'}", *s3) for a in ("--set", s)]],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, **s3_plan.env(), "IMAGE_EMBEDDINGS_LOG_DIR": str(tmp_path / "logs")})
    assert ran.returncode == 0, ran.stderr[-3000:]
    status = _cli(tmp_path, "status", *s3, env=s3_plan.env())
    assert status.returncode == 0, status.stderr[-3000:]
    runs = [bytes(o) for o in _objects(client, "secrets", "delta/runs/")]
    written = [ran.stdout, ran.stderr, status.stdout, status.stderr, report.read_text(),
               *[p.read_text(errors="replace") for p in (tmp_path / "logs").glob("*")]]
    assert "ingest" in status.stdout and runs
    for secret in (s3_plan.secret_key, s3_plan.access_key):
        assert not [w for w in written if secret in w], f"{secret} leaked"
        assert not [r for r in runs if secret.encode() in r], f"{secret} leaked into the runs table"


def _objects(client: Any, bucket: str, prefix: str) -> list[bytes]:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return [client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed]
