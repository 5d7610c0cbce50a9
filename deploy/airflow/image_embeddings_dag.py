"""Nightly image embeddings: wait for the day's upload -> ingest -> embed -> neighbours and maintain.

The run date is the day whose upload a night processes: the UTC day before the night's scheduled time
(`image_embeddings.ops.deploy.run_date_for`, which the Databricks job uses too), or `params.run_date` of a manual run.
The schedule is an explicit CronTriggerTimetable, so Airflow 2.11 and 3.x give a night the same
data_interval_end whatever their defaults for cron strings. Runs the jobs as EMR steps (ingest and maintain
optionally as EMR Serverless job runs) or as one run of the Databricks job deployed from the bundle, chosen by
`runner` in settings.yaml beside this file.

After a successful embed, two tasks run, neither waiting for the other: `neighbours` (the nearest-neighbour index
and the neighbours table brought to the embeddings table's new version; the embed environment: torch and faiss)
and `maintain` (OPTIMIZE and VACUUM of the Delta tables). Neither changes the embeddings table's rows.
Every run is idempotent, so a retry submits its step or job run again; the Databricks run is found again by its
token and repaired. The arguments come from `image_embeddings.ops.deploy`, the code that renders deploy/.
Install the package (no extras) in the Airflow environment: `pip install spark-image-embeddings`.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import time
from pathlib import Path
from typing import Any

import yaml

try:  # Airflow 3: the task SDK
    from airflow.sdk import DAG, CronTriggerTimetable, Param, task
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.decorators import task
    from airflow.models.param import Param
    from airflow.timetables.trigger import CronTriggerTimetable

from image_embeddings.ops.deploy import (
    SERVERLESS_STAGES,
    emr_serverless_job,
    emr_step,
    idempotency_token,
    ingest_dates,
    run_date_for,
)

SETTINGS_FILE = Path(os.environ.get("IMAGE_EMBEDDINGS_DAG_SETTINGS", Path(__file__).with_name("settings.yaml")))
SETTINGS: dict[str, Any] = yaml.safe_load(SETTINGS_FILE.read_text())
RUNNER = SETTINGS["runner"]
if RUNNER not in ("emr", "databricks"):
    raise ValueError(f"{SETTINGS_FILE}: runner must be emr or databricks, got {RUNNER!r}")
TIMEOUT = dt.timedelta(hours=SETTINGS["timeout_hours"])
POLL = int(SETTINGS.get("poll_seconds", 60))
UPLOAD = SETTINGS["upload"]
TRAILING_DAYS = int(SETTINGS.get("trailing_days", 2))
# One meaning for every runner and Airflow version: the day before the night's scheduled time, in UTC.
RUN_DATE = "{{ params.run_date or upload_day(data_interval_end) }}"
# A waiter gives up after this many polls: the task's own timeout, not the provider's 30-minute default.
WAITER = {"waiter_delay": POLL, "waiter_max_attempts": max(1, math.ceil(TIMEOUT.total_seconds() / POLL))}


def upload_key(day: str) -> str:
    """The S3 key of a day's completion marker."""
    return f"{UPLOAD['prefix'].format(date=day).strip('/')}/{UPLOAD['marker']}"


def _wait_for_upload() -> Any:
    """Wait for the day's marker, not its first file: ingest never reads half an upload."""
    from airflow.providers.amazon.aws.sensors.s3 import S3KeySensor

    return S3KeySensor(
        task_id="wait_for_upload", bucket_name=UPLOAD["bucket"], bucket_key=upload_key(RUN_DATE),
        aws_conn_id=UPLOAD["aws_conn_id"], mode="reschedule", poke_interval=POLL,
        timeout=dt.timedelta(hours=UPLOAD["timeout_hours"]).total_seconds(), retries=0)


@task(task_id="ingest_days")
def _ingest_days(run_date: str, serverless: bool) -> list[dict[str, Any]]:
    """The run date and the earlier days whose upload is complete, as the keyword arguments of one ingest each."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    hook = S3Hook(aws_conn_id=UPLOAD["aws_conn_id"])
    days = ingest_dates(run_date, TRAILING_DAYS, lambda day: hook.check_for_key(upload_key(day), UPLOAD["bucket"]))
    prefix = SETTINGS["emr"]["s3_prefix"]
    if serverless:
        return [{"name": job["name"], "job_driver": job["jobDriver"]}
                for job in (emr_serverless_job("ingest", prefix, day) for day in days)]
    return [{"steps": [emr_step("ingest", prefix, day)]} for day in days]


def _emr_operator(stage: str, serverless: bool) -> tuple[Any, dict[str, Any]]:
    """The operator class of one EMR stage and its arguments: submit and wait in one task, so a retry submits
    the step or job run again instead of polling the failed one."""
    from airflow.providers.amazon.aws.operators.emr import EmrAddStepsOperator, EmrServerlessStartJobOperator

    emr = SETTINGS["emr"]
    common = {"task_id": stage, "aws_conn_id": emr["aws_conn_id"], "wait_for_completion": True, **WAITER}
    if not serverless:
        return EmrAddStepsOperator, {**common, "job_flow_id": emr["cluster_id"]}
    config = emr["serverless"]
    overrides = {"monitoringConfiguration": {"s3MonitoringConfiguration": {"logUri": config["log_uri"]}}}
    return EmrServerlessStartJobOperator, {**common, "application_id": config["application_id"],
                                           "execution_role_arn": config["execution_role_arn"],
                                           "configuration_overrides": overrides}


def _emr_run(stage: str, serverless: bool) -> Any:
    """One run of a stage after ingest, for the run date."""
    operator, kwargs = _emr_operator(stage, serverless)
    prefix = SETTINGS["emr"]["s3_prefix"]
    if serverless:
        job = emr_serverless_job(stage, prefix, RUN_DATE)
        return operator(**kwargs, name=job["name"], job_driver=job["jobDriver"])
    return operator(**kwargs, steps=[emr_step(stage, prefix, RUN_DATE)])


def emr_tasks() -> Any:
    """ingest_days -> ingest (one mapped task per day, one at a time) -> embed -> neighbours and maintain."""
    on_serverless = set(SETTINGS["emr"].get("serverless_stages") or ())
    if not on_serverless <= set(SERVERLESS_STAGES):
        raise ValueError(f"{SETTINGS_FILE}: emr.serverless_stages may hold only {', '.join(SERVERLESS_STAGES)} "
                         f"(embed and neighbours need the cluster's GPUs), got {sorted(on_serverless)}")
    days = _ingest_days(RUN_DATE, "ingest" in on_serverless)
    operator, kwargs = _emr_operator("ingest", "ingest" in on_serverless)
    # One day at a time: the tables' lease would make a second ingest wait, and a failed ingest step cancels
    # the steps queued behind it on the cluster.
    ingest = operator.partial(**kwargs, max_active_tis_per_dagrun=1).expand_kwargs(days)
    embed = _emr_run("embed", False)
    ingest >> embed >> [_emr_run("neighbours", False), _emr_run("maintain", "maintain" in on_serverless)]
    return days


def databricks_tasks() -> Any:
    """One run of the deployed job (its tasks ingest, embed, neighbours, maintain), found again by a retry."""
    from airflow.providers.databricks.operators.databricks import DatabricksRunNowOperator

    class NightlyRunNow(DatabricksRunNowOperator):
        """run-now with a token per DAG run (not per try): a retry finds the run an earlier try started and waits
        for it, and when that run ended failed, repairs it (its failed tasks and those after them run again)
        rather than starting a second run beside it."""

        def execute(self, context: Any) -> None:
            hook = self._hook
            self.run_id = hook.run_now({"job_id": int(self.job_id), "job_parameters": self.job_parameters,
                                        "idempotency_token": self.idempotency_token})
            state = hook.get_run_state(self.run_id)
            if state.is_terminal and not state.is_successful:
                repair = {"run_id": self.run_id, "rerun_all_failed_tasks": True, "rerun_dependent_tasks": True,
                          "job_parameters": self.job_parameters}
                latest = hook.get_latest_repair_id(self.run_id)
                if latest is not None:
                    repair["latest_repair_id"] = latest
                self.log.info("Databricks run %s ended %s: repairing it", self.run_id, state)
                hook.repair_run(repair)
                time.sleep(self.polling_period_seconds)  # the repaired run leaves its terminal state first
            while not (state := hook.get_run_state(self.run_id)).is_terminal:
                self.log.info("Databricks run %s: %s", self.run_id, state)
                time.sleep(self.polling_period_seconds)
            if not state.is_successful:
                raise RuntimeError(f"Databricks run {self.run_id} ended {state}; a retry repairs it")

    dbx = SETTINGS["databricks"]
    if not dbx.get("job_id"):
        raise ValueError(f"{SETTINGS_FILE}: databricks.job_id is not set (the id of the bundle's deployed job)")
    return NightlyRunNow(
        task_id="nightly", databricks_conn_id=dbx["conn_id"], job_id=str(dbx["job_id"]),
        job_parameters={"run_date": RUN_DATE, "trailing_days": str(TRAILING_DAYS)},
        idempotency_token="{{ run_token(dag.dag_id, run_id, 'nightly') }}", polling_period_seconds=POLL,
        databricks_retry_limit=int(dbx.get("api_retries", 3)))


with DAG(
    dag_id="image_embeddings_nightly",
    description=__doc__.splitlines()[0],
    schedule=CronTriggerTimetable(SETTINGS["schedule"], timezone="UTC"),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=3 * TIMEOUT,
    default_args={"owner": "data-engineering", "retries": SETTINGS["retries"],
                  "retry_delay": dt.timedelta(minutes=SETTINGS["retry_delay_minutes"]), "execution_timeout": TIMEOUT},
    params={"run_date": Param("", type="string", pattern=r"^(\d{4}-\d{2}-\d{2})?$",
                              description="the day to process (YYYY-MM-DD); empty: the day before the night")},
    user_defined_macros={"upload_day": run_date_for, "run_token": idempotency_token},
    tags=["image-embeddings"],
) as dag:
    _wait_for_upload() >> (emr_tasks() if RUNNER == "emr" else databricks_tasks())
