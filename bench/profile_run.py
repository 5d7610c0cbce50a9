"""Where a run's time goes inside Spark: our pipeline on N photos in a fresh process, profiled from outside.

    .venv/bin/python bench/profile_run.py [--photos 2000] [--runs 2]

Runs ``run_pipeline`` (conf/local.yaml, local[2]) like `make bench`'s child, with Spark's event log on, while it
samples the CPU time of every thread of the process tree from /proc every 0.25 s. Then, for the decode job of
stage 1 and the embed job of stage 2 of each run, it prints what the event log and the samples show: the job's
seconds and rate, its first tasks against the median task (a fresh Python worker's start), the JVM's CPU in its
tasks and in garbage collection, the CPU of each kind of thread over the job (JVM task threads, the JVM's own
threads, the Python workers' main threads, their other threads such as the model warm-up, the driver), and the
Python workers' page faults per image. Linux only (/proc). py-spy (in the dev extra) then shows which Python
code runs: ``py-spy record --subprocesses --format raw -o out.txt -- .venv/bin/python bench/profile_run.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    tree[int(handle.read().rsplit(")", 1)[1].split()[1])].append(int(entry))
            except OSError:
                pass
    return tree


def _kind(pid: int, tid: int, comm: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as handle:
            command = handle.read().replace("\0", " ")
    except OSError:
        return "gone"
    if command.split(" ")[0].endswith("java"):
        return "JVM task threads" if comm.startswith("Executor task") else "JVM other threads (JIT, GC, scheduler)"
    if "pyspark.daemon" in command or "pyspark.worker" in command:
        return "Python workers, main threads" if pid == tid else "Python workers, other threads (warm-up)"
    return "driver and launcher"


def sample(root: int, stop: threading.Event, out: list[tuple[float, dict[tuple[int, int, str], tuple[float, int]]]]
           ) -> None:
    """Every 0.25 s: (time, {(pid, tid, kind): (cpu seconds, minor page faults)}) for the process tree of ``root``."""
    while not stop.is_set():
        tree, todo, snap = _children(), [root], {}
        while todo:
            pid = todo.pop()
            todo.extend(tree.get(pid, []))
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                try:
                    with open(f"/proc/{pid}/task/{tid}/stat") as handle:
                        text = handle.read()
                except OSError:
                    continue
                comm, fields = text[text.index("(") + 1:text.rindex(")")], text.rsplit(")", 1)[1].split()
                kind = _kind(pid, int(tid), comm)
                snap[(pid, int(tid), kind)] = ((int(fields[11]) + int(fields[12])) / TICK, int(fields[7]))
        out.append((time.time(), snap))
        stop.wait(0.25)


def usage(samples: list[Any], start: float, end: float) -> tuple[dict[str, float], int]:
    """CPU seconds by kind of thread and the Python workers' minor page faults between ``start`` and ``end``."""
    inside = [s for s in samples if start <= s[0] <= end]
    if len(inside) < 2:
        return {}, 0
    first, last = inside[0][1], inside[-1][1]
    cpu: dict[str, float] = defaultdict(float)
    faults = 0
    for key, (seconds, minflt) in last.items():
        before = first.get(key, (0.0, 0))
        cpu[key[2]] += seconds - before[0]
        if key[2].startswith("Python"):
            faults += minflt - before[1]
    return dict(cpu), faults


def jobs(event_dir: Path) -> list[dict[str, Any]]:
    """The event log's jobs: start and end (epoch s), the source file that ran them, tasks with their figures."""
    logs = [f for f in sorted(event_dir.rglob("*")) if f.is_file() and not f.name.startswith(".")]  # not .crc
    events = [json.loads(line) for f in logs for line in f.open() if line.strip()]
    found: dict[int, dict[str, Any]] = {}
    stage_job: dict[int, int] = {}
    for e in events:
        if e["Event"] == "SparkListenerJobStart":
            site = " ".join(s["Stage Name"] for s in e["Stage Infos"])
            found[e["Job ID"]] = {"start": e["Submission Time"] / 1e3, "site": site, "tasks": []}
            stage_job.update({s: e["Job ID"] for s in e["Stage IDs"]})
        elif e["Event"] == "SparkListenerJobEnd":
            found[e["Job ID"]]["end"] = e["Completion Time"] / 1e3
        elif e["Event"] == "SparkListenerTaskEnd" and e["Stage ID"] in stage_job:
            info, metrics = e["Task Info"], e.get("Task Metrics") or {}
            found[stage_job[e["Stage ID"]]]["tasks"].append({
                "launch": info["Launch Time"] / 1e3, "seconds": (info["Finish Time"] - info["Launch Time"]) / 1e3,
                "run": metrics.get("Executor Run Time", 0) / 1e3, "jvm_cpu": metrics.get("Executor CPU Time", 0) / 1e9,
                "gc": metrics.get("JVM GC Time", 0) / 1e3})
    return [j for _, j in sorted(found.items()) if "end" in j]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=2, help="pipeline runs in the one process (the later ones warm)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "bench"))
    if args.child:
        from run import pipeline_child  # type: ignore[import-not-found]

        from image_embeddings.core import config as config_module

        events = args.child / "events"
        events.mkdir()
        load = config_module.load_config

        def with_event_log(path: Any = None, overrides: Any = (), **kwargs: Any) -> Any:
            return load(path, [*overrides, "spark.conf.spark.eventLog.enabled=true",
                               "spark.conf.spark.eventLog.compress=false",
                               f"spark.conf.spark.eventLog.dir={events.as_uri()}"], **kwargs)

        config_module.load_config = with_event_log  # type: ignore[assignment]
        print(json.dumps(pipeline_child("ours", args.child / "all", args.child / "weights.pth", args.runs)))
        return 0

    import subprocess

    from run import photo_folder  # type: ignore[import-not-found]

    from image_embeddings.testing.sample import trained_like_weights

    work = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    photo_folder(work / "all", args.photos)
    trained_like_weights(work / "weights.pth")
    child = subprocess.Popen([sys.executable, __file__, "--child", str(work), "--runs", str(args.runs)],
                             stdout=subprocess.PIPE, text=True, cwd=REPO)
    samples: list[Any] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(child.pid, stop, samples), daemon=True)
    sampler.start()
    output, _ = child.communicate()
    stop.set()
    sampler.join()
    if child.returncode != 0:
        print(f"the pipeline failed (exit {child.returncode}); its log is above", file=sys.stderr)
        return 1
    reports = json.loads(output.strip().splitlines()[-1])
    found = jobs(work / "events")
    for which, source, count in (("stage 1 decode", "ingest.py", "decoded"), ("stage 2 embed", "embed.py",
                                                                                "embedded")):
        mine = [j for j in found if source in j["site"]]
        # Each run's job of that stage with the most task time: the decode (or embed) job.
        busiest = sorted(sorted(mine, key=lambda j: -sum(t["run"] for t in j["tasks"]))[:args.runs],
                         key=lambda j: j["start"])
        for run, (job, report) in enumerate(zip(busiest, reports, strict=False)):
            seconds, tasks = job["end"] - job["start"], job["tasks"]
            median = statistics.median(t["seconds"] for t in tasks)
            firsts = [t["seconds"] for t in tasks if t["launch"] - job["start"] < 0.5]
            cpu, faults = usage(samples, job["start"], job["end"])
            print(f"\n{which}, run {run + 1} ({'first, fresh process' if run == 0 else 'warm'}): job "
                  f"{seconds:.2f} s for {report[count]} = {report[count] / seconds:.1f}/s; its step "
                  f"{report['read_and_decode' if source == 'ingest.py' else 'embed_step']:.2f} s")
            print(f"  {len(tasks)} tasks, median {median:.2f} s, the first ones {', '.join(f'{s:.2f}' for s in firsts)}"
                  f" s; JVM CPU in tasks {sum(t['jvm_cpu'] for t in tasks):.2f} s, GC {sum(t['gc'] for t in tasks):.2f}"
                  f" s (task-seconds)")
            total = sum(cpu.values()) or 1.0
            for kind, used in sorted(cpu.items(), key=lambda kv: -kv[1]):
                print(f"  {kind:42s} {used:6.2f} CPU-s  {used / seconds:4.2f} cores  {used / total:4.0%}")
            print(f"  Python workers' minor page faults: {faults / max(report[count], 1):.0f} per image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
