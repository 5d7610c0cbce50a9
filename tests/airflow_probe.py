"""Run with an Airflow environment (.venv-airflow: 2.11, .venv-airflow3: 3.x); prints what a test checks, as JSON.

    airflow_probe.py load DAG_FOLDER [SETTINGS...]   load the DAG (with each settings file), render its templates
                                                    for the night of 2026-11-24 02:00 UTC
    airflow_probe.py run DAG_FOLDER    run the DAG for real (dag.test) against stand-ins on loopback: moto's server
                                       for S3, EMR and EMR Serverless, and a small Databricks Jobs API

In `run`, the first attempt of the embed step, of the first ingest job run on EMR Serverless, and of the Databricks
job run fail, and the first poll of the Databricks run loses its connection: the DAG run must still succeed,
through retries that submit again (EMR) or find the same run by its token and repair it (Databricks).
moto keeps EMR steps RUNNING and Serverless job runs SUCCESS for ever; the test drives their states through moto's
backend in this process (ThreadedMotoServer), as EMR would.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

NIGHT = dt.datetime(2026, 11, 24, 2, 0, tzinfo=dt.timezone.utc)  # processes the upload of 2026-11-23
ACCOUNT, REGION, BUCKET = "123456789012", "us-east-1", "my-bucket"
AIRFLOW_3 = False
try:
    import airflow.sdk  # noqa: F401

    AIRFLOW_3 = True
except ImportError:
    pass


def load_dag(folder: str) -> tuple[Any, dict[str, str]]:
    """The nightly DAG from ``folder`` and the import errors."""
    from airflow.models import DagBag

    bag = DagBag(dag_folder=folder) if AIRFLOW_3 else DagBag(dag_folder=folder, include_examples=False)
    return bag.dags.get("image_embeddings_nightly"), {k: str(v) for k, v in bag.import_errors.items()}


def next_interval_end(dag: Any) -> str:
    """The data_interval_end the scheduler gives the first run after 2026-11-23 12:00 UTC."""
    from airflow.timetables.base import TimeRestriction

    timetable = dag.timetable
    if AIRFLOW_3:  # the scheduler's timetable of the SDK's, as the scheduler and dag.test make it
        from airflow.serialization.encoders import coerce_to_core_timetable

        timetable = coerce_to_core_timetable(timetable)
    info = timetable.next_dagrun_info(
        last_automated_data_interval=None,
        restriction=TimeRestriction(earliest=NIGHT - dt.timedelta(hours=14), latest=None, catchup=True))
    return info.data_interval.end.isoformat()


def probe_load(folder: str) -> dict[str, Any]:
    """Task graph, retries, timeouts, and the templated fields rendered as for the night of ``NIGHT``."""
    import pendulum

    dag, errors = load_dag(folder)
    out: dict[str, Any] = {"import_errors": errors, "airflow_3": AIRFLOW_3}
    if dag is None:
        return out
    out["tasks"] = {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks}
    out["retries"] = {t.task_id: t.retries for t in dag.tasks}
    out["timeouts"] = {t.task_id: t.execution_timeout.total_seconds() for t in dag.tasks if t.execution_timeout}
    out["sla"] = [t.task_id for t in dag.tasks if getattr(t, "sla", None)]
    out["next_interval_end"] = next_interval_end(dag)
    end = pendulum.instance(NIGHT)
    context = {"data_interval_end": end, "params": {"run_date": ""}, "run_id": "scheduled__2026-11-24T02:00:00+00:00",
               "dag": dag, "ds": end.to_date_string()}
    env = dag.get_template_env()
    out["rendered"] = {}
    for task in dag.tasks:
        if getattr(task, "partial_kwargs", None) is not None:  # mapped: its arguments come from ingest_days
            out["rendered"][f"{task.task_id}.mapped"] = True
            continue
        for field in task.template_fields:
            value = getattr(task, field, None)
            if value not in (None, "", [], {}) and not callable(value):
                out["rendered"][f"{task.task_id}.{field}"] = task.render_template(value, context, jinja_env=env)
    manual = {**context, "params": {"run_date": "2026-11-20"}}  # a manual run for a day given by hand
    first = dag.get_task("wait_for_upload")
    out["manual_bucket_key"] = first.render_template(first.bucket_key, manual, jinja_env=env)
    return out


class _Databricks(BaseHTTPRequestHandler):
    """The Jobs API calls the nightly task makes: run-now (with idempotency tokens), runs/get, runs/repair."""

    runs: dict[int, dict[str, Any]] = {}
    tokens: dict[str, int] = {}
    calls: list[str] = []

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _reply(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        path = urlsplit(self.path).path
        self.calls.append(f"POST {path.rsplit('/jobs/', 1)[-1]}")
        if path.endswith("/jobs/run-now"):
            run_id = self.tokens.get(body.get("idempotency_token", ""))
            if run_id is None:  # a new run; a known token gives the run it started
                run_id = len(self.runs) + 1
                self.runs[run_id] = {"body": body, "polls": 0, "attempt": 0, "repairs": [], "dropped": False}
                self.tokens[body["idempotency_token"]] = run_id
            self._reply({"run_id": run_id, "number_in_job": run_id})
        elif path.endswith("/jobs/runs/repair"):
            run = self.runs[body["run_id"]]
            run["repairs"].append(body)
            run.update(attempt=run["attempt"] + 1, polls=0)
            self._reply({"repair_id": 100 + len(run["repairs"])})
        else:
            self._reply({})

    def do_GET(self) -> None:
        query = parse_qs(urlsplit(self.path).query)
        run = self.runs[int(query["run_id"][0])]
        self.calls.append("GET runs/get")
        if not run["dropped"]:  # the first poll: the connection is lost, as when a worker's network fails
            run["dropped"] = True
            self.close_connection = True
            return
        run["polls"] += 1
        done = run["polls"] >= 2
        result = ("SUCCESS" if run["attempt"] else "FAILED") if done else ""
        state = {"life_cycle_state": "TERMINATED" if done else "RUNNING", "result_state": result,
                 "state_message": ""}
        history = [{"id": 1}] + [{"id": 100 + n} for n in range(1, len(run["repairs"]) + 1)]
        self._reply({"run_id": int(query["run_id"][0]), "state": state, "repair_history": history,
                     "run_page_url": "http://127.0.0.1/run", "tasks": []})


def _finish(name: str, fail_once: set[str], failed: set[str], success: str) -> str:
    """The end state of a step or job run: the first of each name in ``fail_once`` fails, the rest succeed."""
    if name in fail_once and name not in failed:
        failed.add(name)
        return "FAILED"
    return success


def _drive_emr(stop: threading.Event, fail_once: set[str]) -> None:
    """Move what EMR runs to its end, through moto's backend in this process."""
    from moto.emr.models import emr_backends
    from moto.emrserverless.models import emrserverless_backends

    failed: set[str] = set()
    while not stop.wait(0.2):
        for cluster in list(emr_backends[ACCOUNT][REGION].clusters.values()):
            for step in cluster.steps:
                if step.state in ("PENDING", "RUNNING"):
                    step.state = _finish(step.name, fail_once, failed, "COMPLETED")
        for runs in list(emrserverless_backends[ACCOUNT][REGION].job_runs.values()):
            for run in runs:
                if run.state == "RUNNING":
                    run.state = _finish(run.name, fail_once, failed, "SUCCESS")


def _aws_world(endpoint: str, repo: Path) -> dict[str, str]:
    """The bucket with the uploads' markers, the cluster of deploy/emr/cluster.json, a Serverless application."""
    import boto3

    kw = {"endpoint_url": endpoint, "region_name": REGION}
    s3 = boto3.client("s3", **kw)
    s3.create_bucket(Bucket=BUCKET)
    for day in ("2026-11-24", "2026-11-23", "2026-11-22"):  # complete uploads
        s3.put_object(Bucket=BUCKET, Key=f"raw-images/{day}/a.jpg", Body=b"jpeg")
        s3.put_object(Bucket=BUCKET, Key=f"raw-images/{day}/_SUCCESS", Body=b"")
    s3.put_object(Bucket=BUCKET, Key="raw-images/2026-11-21/a.jpg", Body=b"jpeg")  # never completed
    cluster = boto3.client("emr", **kw).run_job_flow(**json.loads((repo / "deploy/emr/cluster.json").read_text()))
    app = boto3.client("emr-serverless", **kw).create_application(
        name="image-embeddings", releaseLabel="emr-7.5.0", type="SPARK")
    return {"cluster_id": cluster["JobFlowId"], "application_id": app["applicationId"]}


def _settings(folder: str, runner: str, world: dict[str, str], out: Path) -> Path:
    """settings.yaml of the DAG folder for a quick run: one-second polls and retry delays, loopback connections."""
    import yaml

    settings = yaml.safe_load((Path(folder) / "settings.yaml").read_text())
    settings.update(runner=runner, retry_delay_minutes=1 / 60, poll_seconds=1, timeout_hours=0.05)
    settings["upload"].update(aws_conn_id="aws_test", timeout_hours=0.01)
    settings["emr"].update(cluster_id=world["cluster_id"], aws_conn_id="aws_test", serverless_stages=["ingest"])
    settings["emr"]["serverless"].update(application_id=world["application_id"],
                                         execution_role_arn=f"arn:aws:iam::{ACCOUNT}:role/image-embeddings")
    settings["databricks"].update(conn_id="databricks_test", job_id=42, api_retries=1)
    path = out / f"settings-{runner}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def _dag_test(folder: str, settings: Path, night: dt.datetime) -> dict[str, Any]:
    """One real run of the DAG (dag.test) for ``night``: its state and each task's tries."""
    os.environ["IMAGE_EMBEDDINGS_DAG_SETTINGS"] = str(settings)
    dag, errors = load_dag(folder)
    assert not errors, errors
    run = dag.test(logical_date=night) if AIRFLOW_3 else dag.test(execution_date=night)
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.dag_id == dag.dag_id,
                                                 TaskInstance.run_id == run.run_id).all()
        tries = {f"{t.task_id}[{t.map_index}]" if t.map_index >= 0 else t.task_id: [t.try_number, str(t.state)]
                 for t in tis}
    return {"state": str(run.state), "run_id": run.run_id, "tries": tries}


def _databricks_server() -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Databricks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def probe_run(folder: str) -> dict[str, Any]:
    """The DAG run on EMR (ingest on EMR Serverless) and on Databricks, against the stand-ins."""
    import moto.emrserverless.models as serverless
    from airflow.utils import db
    from moto.emr.models import emr_backends
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer

    serverless.JOB_STATUS = "RUNNING"  # moto's runs succeed at once; _drive_emr ends them
    aws = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    aws.start()
    host, port = aws.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    databricks = _databricks_server()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION=REGION)
    os.environ["AIRFLOW_CONN_AWS_TEST"] = json.dumps(
        {"conn_type": "aws", "extra": {"region_name": REGION, "endpoint_url": endpoint}})
    os.environ["AIRFLOW_CONN_DATABRICKS_TEST"] = json.dumps(
        {"conn_type": "databricks", "host": "127.0.0.1", "port": databricks.server_address[1], "schema": "http",
         "password": "token"})
    world = _aws_world(endpoint, Path(folder).resolve().parents[1])
    stop = threading.Event()
    threading.Thread(target=_drive_emr, args=(stop, {"image-embeddings embed 2026-11-23",
                                                     "image-embeddings ingest 2026-11-23"}), daemon=True).start()
    db.resetdb()
    started = time.monotonic()
    out: dict[str, Any] = {"emr": _dag_test(folder, _settings(folder, "emr", world, Path(os.environ["AIRFLOW_HOME"])),
                                            NIGHT)}
    out["emr"]["seconds"] = round(time.monotonic() - started, 1)
    out["emr"]["steps"] = [[s.name, s.state, s.args[-1]] for s in
                           emr_backends[ACCOUNT][REGION].clusters[world["cluster_id"]].steps]
    out["emr"]["serverless_runs"] = [
        [r.name, r.state, r.job_driver["sparkSubmit"]["entryPointArguments"]]
        for r in serverless.emrserverless_backends[ACCOUNT][REGION].job_runs[world["application_id"]]]
    started = time.monotonic()
    night = NIGHT + dt.timedelta(days=1)
    out["databricks"] = _dag_test(folder, _settings(folder, "databricks", world, Path(os.environ["AIRFLOW_HOME"])),
                                  night)
    out["databricks"]["seconds"] = round(time.monotonic() - started, 1)
    out["databricks"]["runs"] = {k: {"body": v["body"], "repairs": v["repairs"]} for k, v in _Databricks.runs.items()}
    out["databricks"]["calls"] = _Databricks.calls
    stop.set()
    return out


def main() -> int:
    mode, folder, settings = sys.argv[1], sys.argv[2], sys.argv[3:]
    if mode == "run":
        out: Any = probe_run(folder)
    else:  # the DAG as each settings file (none: the folder's own settings.yaml) makes it
        out = []
        for path in settings or [None]:
            if path:
                os.environ["IMAGE_EMBEDDINGS_DAG_SETTINGS"] = path
            out.append(probe_load(folder))
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
