"""This machine's processes, read from /proc (Linux): for the tests that kill a Spark process on purpose."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name (so field 1 is the parent); [] once it has ended."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def children(pid: int) -> list[int]:
    """Every process below ``pid``."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            parents[int(entry.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        kids = [p for p, parent in parents.items() if parent == current]
        found += kids
        frontier += kids
    return found


def cmdline(pid: int) -> str:
    """The command line of ``pid``; "" once it has ended."""
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def cpu_seconds(pid: int) -> float:
    """User and system CPU time ``pid`` has used; 0 once it has ended."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else 0.0


def python_workers(pid: int) -> list[int]:
    """The Spark Python workers below ``pid``: the processes a pyspark daemon forked (same command line).

    Only below ``pid``: under pytest-xdist, other sessions' workers come and go beside ours.
    """
    daemons = {p for p in children(pid) if "pyspark.daemon" in cmdline(p)}
    return sorted(p for p in daemons if (fields := _stat(p)) and int(fields[1]) in daemons)


@contextlib.contextmanager
def standalone_cluster(folder: Path, worker_opts: list[str], memory: str = "3g"
                       ) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """A Spark standalone master and one one-core worker per entry of ``worker_opts`` (its ``SPARK_WORKER_OPTS``)
    on loopback, from the installed pyspark's ``spark-class``: (master URL, processes started). Every process they
    started is killed afterwards."""
    import pyspark

    from image_embeddings.testing.s3server import free_port

    home = Path(pyspark.__file__).parent
    port = free_port()
    env = {**os.environ, "SPARK_HOME": str(home), "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable,
           "SPARK_WORKER_DIR": str(folder / "work"), "SPARK_LOG_DIR": str(folder / "logs")}
    log = open(folder / "cluster.log", "wb")  # noqa: SIM115 - closed below
    started: list[subprocess.Popen[bytes]] = []

    def start(opts: str, *args: str) -> None:
        started.append(subprocess.Popen([str(home / "bin" / "spark-class"), *args],
                                        env={**env, "SPARK_WORKER_OPTS": opts} if opts else env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True))

    try:
        start("", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
              "--webui-port", str(free_port()))
        master = f"spark://127.0.0.1:{port}"
        for opts in worker_opts:
            start(opts, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1", "--cores", "1", "--memory",
                  memory, "--webui-port", str(free_port()), master)
        deadline = time.monotonic() + 120
        while (folder / "cluster.log").read_text(errors="replace").count(
                "Successfully registered with master") < len(worker_opts):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {len(worker_opts)} workers to register")
            time.sleep(0.2)
        yield master, started
    finally:
        for process in started:
            for pid in reversed([process.pid, *children(process.pid)]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.wait(timeout=30)
        log.close()


@contextlib.contextmanager
def connect_server(folder: Path, packages: tuple[str, ...], ivy_dir: Path, python_path: str,
                   conf: dict[str, str] | None = None, timeout: float = 240) -> Iterator[str]:
    """A Spark Connect server (``local[2]``, Delta's SQL extension and catalog) on a free loopback port, started
    from the installed pyspark's own jars with ``spark-submit``: yields its ``sc://`` URL and is killed afterwards,
    with every process it started. Its Python workers run this interpreter with ``python_path`` on their path.

    A server that does not start fails with its log's last lines.
    """
    import pyspark

    from image_embeddings.testing.s3server import free_port

    home = Path(pyspark.__file__).parent
    port = free_port()
    settings = {
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.connect.grpc.binding.address": "127.0.0.1", "spark.connect.grpc.binding.port": str(port),
        "spark.jars.ivy": str(ivy_dir), "spark.local.dir": str(folder / "local"),
        "spark.ui.enabled": "false", "spark.driver.memory": "2g", **(conf or {})}
    command = [str(home / "bin" / "spark-submit"), "--class", "org.apache.spark.sql.connect.service.SparkConnectServer",
               "--master", "local[2]", "--packages", ",".join(packages),
               *[arg for key, value in settings.items() for arg in ("--conf", f"{key}={value}")], "spark-internal"]
    env = {**os.environ, "SPARK_HOME": str(home), "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable,
           "PYTHONPATH": python_path}
    env.pop("SPARK_REMOTE", None)
    env.pop("SPARK_CONNECT_MODE_ENABLED", None)
    logfile = folder / "connect-server.log"
    log = open(logfile, "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              cwd=folder)
    try:
        deadline = time.monotonic() + timeout
        while "Spark Connect server started at" not in logfile.read_text(errors="replace"):
            if server.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-25:])
                ended = server.poll() is not None
                state = f"exited with {server.returncode}" if ended else f"not up in {timeout:.0f} s"
                raise AssertionError(f"the Spark Connect server {state} ({' '.join(command[:3])} ...); "
                                     f"last lines of {logfile}:\n{tail}")
            time.sleep(0.5)
        yield f"sc://127.0.0.1:{port}"
    finally:
        for pid in reversed([server.pid, *children(server.pid)]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        server.wait(timeout=30)
        log.close()
