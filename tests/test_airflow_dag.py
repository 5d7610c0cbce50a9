"""The nightly DAG in Airflow 2.11 and 3.x: loaded and rendered, then run for real against stand-ins on loopback.

Each test runs tests/airflow_probe.py in the Airflow environment under test (.venv-airflow, .venv-airflow3; both
set up by `make setup`), as a subprocess: Airflow is not installed in the package's own environment.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from image_embeddings.cli import nightly_main
from image_embeddings.ops.deploy import emr_serverless_job, emr_step, idempotency_token, run_date_for

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "deploy" / "airflow"
AIRFLOWS = [pytest.param(".venv-airflow", id="airflow2"), pytest.param(".venv-airflow3", id="airflow3")]
NIGHT_RUN_DATE = "2026-11-23"  # the upload the night of 2026-11-24 02:00 UTC processes


def _probe(venv: str, tmp_path: Path, *args: str, timeout: int = 300) -> Any:
    python = REPO / venv / "bin" / "python"
    assert python.exists(), f"the Airflow environment {venv} is missing: run `make setup`"
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__DATABASE__LOAD_DEFAULT_CONNECTIONS": "False",
           # No encryption of the test's connections (cryptography 45+ breaks Airflow 2.11's Fernet wrapper).
           "AIRFLOW__CORE__FERNET_KEY": ""}
    if venv == ".venv-airflow":
        env["AIRFLOW__CORE__EXECUTOR"] = "SequentialExecutor"  # Airflow 2 refuses SQLite with the LocalExecutor
    for name in ("PYTHONPATH", "AWS_ENDPOINT_URL", "IMAGE_EMBEDDINGS_DAG_SETTINGS"):
        env.pop(name, None)
    done = subprocess.run([str(python), str(REPO / "tests" / "airflow_probe.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=tmp_path)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _settings(tmp_path: Path, name: str, **changes: Any) -> str:
    settings = yaml.safe_load((DAGS / "settings.yaml").read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            settings[section][field] = value
        else:
            settings[section] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return str(path)


@pytest.mark.parametrize("venv", AIRFLOWS)
def test_dag_loads_and_renders_one_run_date(venv: str, tmp_path: Path) -> None:
    databricks = _settings(tmp_path, "databricks", runner="databricks", databricks__job_id=42)
    serverless = _settings(tmp_path, "serverless", emr__serverless_stages=["ingest", "maintain"])
    emr, dbx, sls = _probe(venv, tmp_path, "load", str(DAGS), str(DAGS / "settings.yaml"), databricks, serverless)
    assert emr["import_errors"] == dbx["import_errors"] == sls["import_errors"] == {}
    assert emr["airflow_3"] is (venv == ".venv-airflow3")
    # Submit and wait in one task per stage (a retry submits again); ingest is mapped over the days it reads.
    assert emr["tasks"] == {"wait_for_upload": ["ingest_days"], "ingest_days": ["ingest"], "ingest": ["embed"],
                            "embed": ["maintain", "neighbours"], "neighbours": [], "maintain": []}
    assert emr["rendered"]["ingest.mapped"] is True and emr["sla"] == []
    assert {k: v for k, v in emr["retries"].items() if k != "wait_for_upload"} == dict.fromkeys(
        ["ingest_days", "ingest", "embed", "neighbours", "maintain"], 2)
    assert set(emr["timeouts"].values()) == {6 * 3600.0}
    # The night of 2026-11-24 02:00 UTC: the same interval end in both versions, and the upload of the day before.
    assert emr["next_interval_end"] == "2026-11-24T02:00:00+00:00"
    assert run_date_for(emr["next_interval_end"]) == NIGHT_RUN_DATE
    assert emr["rendered"]["wait_for_upload.bucket_key"] == f"raw-images/{NIGHT_RUN_DATE}/_SUCCESS"
    assert emr["manual_bucket_key"] == "raw-images/2026-11-20/_SUCCESS", "params.run_date of a manual run"
    assert emr["rendered"]["ingest_days.op_args"] == [NIGHT_RUN_DATE, False]
    prefix = "s3://my-bucket/image-embeddings"
    for stage in ("embed", "neighbours", "maintain"):
        assert emr["rendered"][f"{stage}.steps"] == [emr_step(stage, prefix, NIGHT_RUN_DATE)]
    job = emr_serverless_job("maintain", prefix, NIGHT_RUN_DATE)
    assert sls["rendered"]["maintain.job_driver"] == job["jobDriver"]
    assert sls["rendered"]["maintain.name"] == job["name"]
    assert sls["rendered"]["embed.steps"] == [emr_step("embed", prefix, NIGHT_RUN_DATE)], "GPUs: on the cluster"
    # Databricks: one run of the deployed job, with the same date and a token per DAG run.
    assert dbx["tasks"] == {"wait_for_upload": ["nightly"], "nightly": []}
    assert dbx["rendered"]["nightly.job_parameters"] == {"run_date": NIGHT_RUN_DATE, "trailing_days": "2"}
    assert dbx["rendered"]["nightly.job_id"] == "42"
    assert dbx["rendered"]["nightly.idempotency_token"] == idempotency_token(
        "image_embeddings_nightly", "scheduled__2026-11-24T02:00:00+00:00", "nightly")
    source = (DAGS / "image_embeddings_dag.py").read_text()
    assert not re.search(r"\bsla\b|schedule_interval|execution_date|\{\{ ds \}\}", source), "removed in Airflow 3"


def test_databricks_job_reads_the_same_day_on_its_own_schedule(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import image_embeddings.cli

    calls: list[list[str]] = []
    monkeypatch.setattr(image_embeddings.cli, "main", lambda argv: calls.append(list(argv)) or 0)
    # The job's own trigger at 02:00 UTC on 2026-11-24 ({{job.trigger.time.iso_date}}), no run_date parameter.
    assert nightly_main(["embed", "--config", "c.yaml", "--run-date", "", "--night", "2026-11-24"]) == 0
    assert calls == [["embed", "--config", "c.yaml", "--run-date", NIGHT_RUN_DATE]]


@pytest.mark.parametrize("venv", AIRFLOWS)
def test_dag_run_retries_submit_again_and_repair(venv: str, tmp_path: Path) -> None:
    out = _probe(venv, tmp_path, "run", str(DAGS))
    emr, dbx = out["emr"], out["databricks"]
    assert emr["state"] == "success", emr
    # The embed step failed once: the retry submitted a new step, which completed.
    assert [s[:2] for s in emr["steps"] if " embed " in s[0]] == [
        [f"image-embeddings embed {NIGHT_RUN_DATE}", "FAILED"], [f"image-embeddings embed {NIGHT_RUN_DATE}",
                                                                 "COMPLETED"]]
    assert emr["tries"]["embed"] == [2, "success"]
    assert sorted(s[0] for s in emr["steps"] if " embed " not in s[0]) == [
        f"image-embeddings maintain {NIGHT_RUN_DATE}", f"image-embeddings neighbours {NIGHT_RUN_DATE}"]
    # Ingest on EMR Serverless: the day and the earlier day whose upload completed (2026-11-21 has no marker);
    # the day's first job run failed and its retry started a new one.
    runs = [(name, state) for name, state, _ in emr["serverless_runs"]]
    assert sorted(runs) == [("image-embeddings ingest 2026-11-22", "SUCCESS"),
                            (f"image-embeddings ingest {NIGHT_RUN_DATE}", "FAILED"),
                            (f"image-embeddings ingest {NIGHT_RUN_DATE}", "SUCCESS")]
    assert emr["tries"]["ingest[0]"] == [2, "success"] and emr["tries"]["ingest[1]"] == [1, "success"]
    assert "ingest[2]" not in emr["tries"]
    # Databricks: the first poll lost its connection, the run then failed; each retry found the same run by its
    # token (one run, three run-now calls) and the last repaired it.
    assert dbx["state"] == "success" and dbx["tries"]["nightly"] == [3, "success"], dbx
    assert list(dbx["runs"]) == ["1"] and dbx["calls"].count("POST run-now") == 3
    run = dbx["runs"]["1"]
    assert run["body"]["job_parameters"] == {"run_date": "2026-11-24", "trailing_days": "2"}
    assert run["body"]["idempotency_token"] == idempotency_token("image_embeddings_nightly", dbx["run_id"], "nightly")
    assert [r["rerun_all_failed_tasks"] for r in run["repairs"]] == [True]
