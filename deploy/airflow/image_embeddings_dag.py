"""Nightly image embeddings: (wait for the day's upload) -> ingest -> embed -> neighbours and maintain, for `{{ ds }}`.

Runs the jobs as EMR steps or as Databricks runs, chosen by `runner` in settings.yaml beside this file.
After a successful embed, two tasks run, neither waiting for the other: `neighbours` (the nearest-neighbour index
and the neighbours table brought to the embeddings table's new version; the embed environment: torch and faiss)
and `maintain` (OPTIMIZE and VACUUM of the Delta tables). Neither changes the embeddings table's rows: when one
fails, the night's data is already committed and stays as it is; the DAG run shows the failure, and the next night
runs as usual (the next `neighbours` catches up from the change feed).
The step arguments come from `image_embeddings.deploy`, the same code that renders deploy/emr/steps.json.
Install the package (no extras) in the Airflow environment: `pip install spark-image-embeddings`.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

import yaml
from airflow import DAG

from image_embeddings.deploy import STAGES, UPSTREAM, databricks_job, databricks_task, emr_steps

SETTINGS_FILE = Path(os.environ.get("IMAGE_EMBEDDINGS_DAG_SETTINGS", Path(__file__).with_name("settings.yaml")))
SETTINGS: dict[str, Any] = yaml.safe_load(SETTINGS_FILE.read_text())
RUNNER = SETTINGS["runner"]
if RUNNER not in ("emr", "databricks"):
    raise ValueError(f"{SETTINGS_FILE}: runner must be emr or databricks, got {RUNNER!r}")
TIMEOUT = dt.timedelta(hours=SETTINGS["timeout_hours"])

default_args = {
    "owner": "data-engineering",
    "retries": SETTINGS["retries"],
    "retry_delay": dt.timedelta(minutes=SETTINGS["retry_delay_minutes"]),
    "execution_timeout": TIMEOUT,
    "sla": TIMEOUT,
}

with DAG(
    dag_id="image_embeddings_nightly",
    description=__doc__.splitlines()[0],
    schedule=SETTINGS["schedule"],
    start_date=dt.datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=3 * TIMEOUT,
    default_args=default_args,
    tags=["image-embeddings"],
) as dag:
    first: dict[str, Any] = {}  # each stage's first and last task
    last: dict[str, Any] = {}
    if RUNNER == "emr":
        from airflow.providers.amazon.aws.operators.emr import EmrAddStepsOperator
        from airflow.providers.amazon.aws.sensors.emr import EmrStepSensor

        emr = SETTINGS["emr"]
        for index, stage in enumerate(STAGES):
            add = EmrAddStepsOperator(
                task_id=stage, job_flow_id=emr["cluster_id"], aws_conn_id=emr["aws_conn_id"],
                steps=[emr_steps(emr["s3_prefix"], "{{ ds }}")[index]])
            wait = EmrStepSensor(
                task_id=f"{stage}_done", job_flow_id=emr["cluster_id"], aws_conn_id=emr["aws_conn_id"],
                step_id="{{ task_instance.xcom_pull(task_ids='" + stage + "')[0] }}", timeout=TIMEOUT.total_seconds())
            add >> wait
            first[stage], last[stage] = add, wait
    else:
        from airflow.providers.databricks.operators.databricks import DatabricksSubmitRunOperator

        dbx = SETTINGS["databricks"]
        job = databricks_job(dbx["workspace_dir"])
        clusters = {c["job_cluster_key"]: c["new_cluster"] for c in job["job_clusters"]}
        kinds = {t["task_key"]: t["job_cluster_key"] for t in job["tasks"]}  # neighbours: embed's (GPU) cluster
        for stage in STAGES:
            task = databricks_task(stage, dbx["workspace_dir"], "{{ ds }}")
            task.pop("depends_on", None)  # Airflow orders the runs
            cluster = (dbx.get("existing_cluster_ids") or {}).get(stage)
            if cluster:
                task["existing_cluster_id"] = cluster
            else:
                task["new_cluster"] = clusters[kinds[stage]]
            run: dict[str, Any] = {"run_name": f"image-embeddings {stage} {{{{ ds }}}}", "tasks": [task]}
            first[stage] = last[stage] = DatabricksSubmitRunOperator(
                task_id=stage, databricks_conn_id=dbx["conn_id"], json=run)
    for stage, upstream in UPSTREAM.items():
        last[upstream] >> first[stage]

    sensor = SETTINGS.get("upload_sensor")
    if sensor:
        from airflow.providers.amazon.aws.sensors.s3 import S3KeySensor

        wait_for_upload = S3KeySensor(
            task_id="wait_for_upload", bucket_name=sensor["bucket"], bucket_key=sensor["key"], wildcard_match=True,
            aws_conn_id=sensor["aws_conn_id"], mode="reschedule", poke_interval=300,
            timeout=dt.timedelta(hours=sensor["timeout_hours"]).total_seconds())
        wait_for_upload >> first[STAGES[0]]
