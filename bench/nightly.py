"""Nightly-scale benchmark (issue 14): what a nightly run that changes 20 files costs as the tables grow.

    .venv/bin/python bench/nightly.py [--sizes 1000,4000] [--out bench/results/nightly.md] [--keep]
    .venv/bin/python bench/nightly.py --sizes 200,400          # quick smoke run

For each size N it builds, in a temporary folder, N distinct 480x360 JPEGs (quality 85) made from the real sample
photos (``image_embeddings.testing.sample``: each of the 44 photos and variants, cropped at a per-index offset with a
small brightness shift) in day folders ``images/YYYY-MM-DD/`` of 100 photos each, as the Airflow DAG's
``raw-images/{ds}/`` (the last day, "today", holds 100 photos, the older days the rest), a one-file sales Parquet
table with one row per image (the 10 images added later included) and a ResNet50 weights file
(``sample.trained_like_weights``). Then four ``image-embeddings run`` commands (``conf/local.yaml``, precision
``auto``: bf16 on AMX), each a fresh process, as a nightly spark-submit is:

1. build: the whole ``images/`` folder listed, to build the tables;
2. today: today's folder only, nothing new;
3. nightly: today's folder after 20 changes in it (10 new files, 5 replaced with different content, 5 deleted);
4. rerun, nothing new: today's folder again, unchanged.

Each run writes a Spark event log (``spark.eventLog.*`` set with ``--set spark.conf...``); the benchmark sums
its SparkListenerTaskEnd metrics (input bytes read, shuffle bytes read local + remote, shuffle bytes written,
output bytes written), reads the Delta commits the run added to the four tables (bytes of data files added, and
of data files removed from the snapshot: rewritten by MERGEs or deleted), and times the process from start to
exit. After the four runs, a separate process reads each Delta table's current snapshot (``inputFiles()``) and
divides its bytes by the images table's rows: the live table bytes per image.

It prints a Markdown table (the nightly run, the rerun, live bytes per image, and the ratios of the largest size
to the smallest) and appends it, with the date, the machine, the code measured and the command, to ``--out``.
MB are 10^6 bytes.

Runtime on the 2-core x86_64 machine of `make bench`: 8 runs and 2 snapshot reads, each a fresh JVM, plus the
article's scripts on 10 photos. The default sizes 1000,4000 took 7.1 minutes on an idle machine on 2026-12-03
(commit a939955; the build of N=4000 2.3 minutes of it, a run with nothing to do 13 to 18 s); with the previous
release's code they took 27 minutes while other test runs shared the two cores. ``--sizes 200,400`` is a smoke
run of a few minutes. Each ``image-embeddings run`` and snapshot read is bounded by ``--timeout`` (default
1800 s), so no hung run can keep the benchmark going forever. The 1-minute load average when each run starts is
reported next to its wall time. Temporary folders (photos, tables, event logs, about 0.4 GB at N=4000) are
removed at the end unless ``--keep``.

To measure another copy of the package (for example the committed one, while ``src/`` is being changed), put
its ``src`` first on PYTHONPATH and, if its config schema differs, pass its own ``--config``: the runs, their
Spark workers and the snapshot reader import it from there, and the report names where it was imported from.
The figures in bench/results/nightly.md for commit 4b56e39 came from::

    git -C /work/main archive 4b56e39 src conf | tar -x -C /tmp/bench_src
    PYTHONPATH=/tmp/bench_src/src .venv/bin/python bench/nightly.py --sizes 1000,4000 \
        --config /tmp/bench_src/conf/local.yaml --timeout 2400
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "conf" / "local.yaml"
TODAY = dt.date(2026, 11, 30)
PER_DAY = 100          # photos in each day folder, today's included
TODAY_PHOTOS = PER_DAY
NEW, REPLACED, DELETED = 10, 5, 5
SIZE = (480, 360)
QUALITY = 85
BASE = (SIZE[0] + 40, SIZE[1] + 30)  # each source is resized to this once; photos are 480x360 crops of it
TABLES = ("files", "images", "embeddings")
MB = 1e6


def log(message: str) -> None:
    print(f"[nightly {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# input photos and sales


class Photos:
    """Distinct JPEGs by index, made from the real sample photos and their variants."""

    def __init__(self) -> None:
        from PIL import Image

        from image_embeddings.testing.sample import PHOTOS, photo, variants

        arrays = [photo(n) for n in PHOTOS]
        arrays += [v for a in list(arrays) for _, v in variants(a)]
        self.sources = [np.asarray(Image.fromarray(a).resize(BASE, Image.Resampling.LANCZOS)) for a in arrays]
        self.seen: set[bytes] = set()

    def jpeg(self, index: int) -> bytes:
        """Photo ``index``: source ``index % 44`` cropped at an offset and brightened by a few levels, both from
        ``index // 44`` (41 x 31 offsets: distinct up to 55,000 photos)."""
        from image_embeddings.testing.sample import encode

        k, source = divmod(index, len(self.sources))
        dx, dy = k % (BASE[0] - SIZE[0] + 1), (k // (BASE[0] - SIZE[0] + 1)) % (BASE[1] - SIZE[1] + 1)
        crop = self.sources[source][dy:dy + SIZE[1], dx:dx + SIZE[0]]
        shift = (k % 9 - 4) * 3
        if shift:
            crop = np.clip(crop.astype(np.int16) + shift, 0, 255).astype(np.uint8)
        data = encode(np.ascontiguousarray(crop), quality=QUALITY)
        digest = hashlib.sha1(data).digest()
        if digest in self.seen:
            raise RuntimeError(f"photo {index} repeats an earlier one")
        self.seen.add(digest)
        return data


def image_id(index: int) -> str:
    return f"img{index:06d}"


def build_input(work: Path, n: int, photos: Photos) -> dict[str, Any]:
    """``n`` photos in day folders of 100 under ``work/images`` (today's the last), sales for them and the 10
    images the nightly change adds."""
    from image_embeddings.testing.sample import write_sales

    days = -(-n // PER_DAY)
    images = work / "images"
    folders: list[Path] = []
    for day in range(days):
        folder = images / (TODAY - dt.timedelta(days=days - 1 - day)).isoformat()
        folder.mkdir(parents=True)
        folders.append(folder)
    # today holds the last 100 photos; older days hold the rest, 100 a day, the oldest one fewer if need be
    for i in range(n):
        from_end = n - 1 - i
        folder = folders[-1 - from_end // PER_DAY]
        (folder / f"{image_id(i)}.jpg").write_bytes(photos.jpeg(i))
    write_sales(work / "sales", [image_id(i) for i in range(n + NEW)])
    return {"images": images, "today": folders[-1], "sales": work / "sales", "days": days}


def change_today(today: Path, n: int, photos: Photos) -> dict[str, list[str]]:
    """10 new photos, 5 of today's replaced by different content (same name), 5 deleted."""
    first = n - TODAY_PHOTOS
    added = [image_id(n + j) for j in range(NEW)]
    for j, name in enumerate(added):
        (today / f"{name}.jpg").write_bytes(photos.jpeg(n + j))
    replaced = [image_id(first + j) for j in range(REPLACED)]
    for j, name in enumerate(replaced):
        (today / f"{name}.jpg").write_bytes(photos.jpeg(n + NEW + j))
    deleted = [image_id(first + REPLACED + j) for j in range(DELETED)]
    for name in deleted:
        (today / f"{name}.jpg").unlink()
    return {"added": added, "replaced": replaced, "deleted": deleted}


# ---------------------------------------------------------------------------------------------------------
# measuring one run


def event_log_metrics(folder: Path) -> dict[str, float]:
    """Sums over the SparkListenerTaskEnd events of the event log(s) under ``folder``: a Spark 4 rolling log
    (``eventlog_v2_<app>/events_<n>_<app>``) or a Spark 3.5 single file (``<app>`` or ``<app>.inprogress``)."""
    totals = {"input": 0.0, "shuffle_read": 0.0, "shuffle_write": 0.0, "output": 0.0, "tasks": 0.0, "jobs": 0.0}
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not p.name.startswith((".", "appstatus")) and not p.name.endswith(".crc"))
    if not files:
        raise RuntimeError(f"no Spark event log under {folder}")
    for path in files:
        if path.suffix in (".lz4", ".lzf", ".snappy", ".zstd"):
            raise RuntimeError(f"{path} is compressed: run with spark.eventLog.compress=false")
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                if '"SparkListenerJobStart"' in line[:60]:
                    totals["jobs"] += 1
                    continue
                if '"SparkListenerTaskEnd"' not in line[:60]:
                    continue
                metrics = json.loads(line).get("Task Metrics") or {}
                totals["tasks"] += 1
                totals["input"] += (metrics.get("Input Metrics") or {}).get("Bytes Read", 0)
                read = metrics.get("Shuffle Read Metrics") or {}
                totals["shuffle_read"] += read.get("Remote Bytes Read", 0) + read.get("Local Bytes Read", 0)
                totals["shuffle_write"] += (metrics.get("Shuffle Write Metrics") or {}).get("Shuffle Bytes Written", 0)
                totals["output"] += (metrics.get("Output Metrics") or {}).get("Bytes Written", 0)
    return totals


def delta_commits(table: Path) -> set[str]:
    folder = table / "_delta_log"
    return {p.name for p in folder.glob("*.json")} if folder.is_dir() else set()


def delta_changes(table: Path, before: set[str]) -> dict[str, float]:
    """Bytes of the data files the commits after ``before`` added to and removed from the table's snapshot.

    A file removed and added again by the same commit (a deletion vector attached to it) is neither: its data
    was not rewritten. Deletion vector files count as added.
    """
    added = removed = 0.0
    for name in sorted(delta_commits(table) - before):
        adds: dict[str, float] = {}
        removes: dict[str, float] = {}
        dv_bytes = 0.0
        for line in (table / "_delta_log" / name).read_text().splitlines():
            action = json.loads(line)
            if "add" in action:
                adds[action["add"]["path"]] = float(action["add"].get("size") or 0)
                dv = action["add"].get("deletionVector") or {}
                if dv.get("storageType") in ("u", "p"):
                    dv_bytes += float(dv.get("sizeInBytes") or 0)
            elif "remove" in action:
                removes[action["remove"]["path"]] = float(action["remove"].get("size") or 0)
        added += sum(size for path, size in adds.items() if path not in removes) + dv_bytes
        removed += sum(size for path, size in removes.items() if path not in adds)
    return {"delta_added": added, "delta_removed": removed}


def table_paths(work: Path) -> dict[str, Path]:
    delta = work / "delta"
    return {"files": delta / "images_files", "images": delta / "images", "embeddings": delta / "embeddings",
            "runs": delta / "runs"}


def overrides(work: Path, weights: Path, precision: str) -> list[str]:
    tables = table_paths(work)
    return [f"input.sales={work / 'sales'}", f"output.images_table={tables['images']}",
            f"output.embeddings_table={tables['embeddings']}", f"output.runs_table={tables['runs']}",
            f"output.files_table={tables['files']}", f"model.weights={weights}", f"model.precision={precision}",
            f"spark.ivy_dir={REPO / '.cache' / 'ivy'}"]


def run_once(label: str, listed: Path, work: Path, weights: Path, precision: str, timeout: float) -> dict[str, Any]:
    """One ``image-embeddings run`` in a process of its own, with its event log; its figures."""
    events, report = work / "eventlogs" / label, work / "reports" / f"{label}.json"
    events.mkdir(parents=True)
    report.parent.mkdir(exist_ok=True)
    tables = table_paths(work)
    before = {name: delta_commits(path) for name, path in tables.items()}
    sets = [f"input.images={listed}", *overrides(work, weights, precision),
            "spark.conf.spark.eventLog.enabled=true", f"spark.conf.spark.eventLog.dir={events}",
            "spark.conf.spark.eventLog.compress=false"]
    command = [sys.executable, "-m", "image_embeddings", "run", "--config", str(CONFIG), "--report", str(report),
               "--run-id", f"nightly-bench-{label}"]
    for item in sets:
        command += ["--set", item]
    output = work / "logs" / f"{label}.log"
    output.parent.mkdir(exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    started = time.perf_counter()
    with output.open("w") as sink:
        done = subprocess.run(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"run {label} exited with {done.returncode}:\n{output.read_text()[-6000:]}")
    result: dict[str, Any] = {"run": label, "listed": listed.name, "wall": wall, "load": load,
                              **event_log_metrics(events)}
    for name, path in tables.items():
        for key, value in delta_changes(path, before[name]).items():
            result[key] = result.get(key, 0.0) + value
    try:
        stages = json.loads(report.read_text()).get("stages", {})
        result.update({f"{stage}_s": stages.get(stage, {}).get("duration_s") for stage in ("ingest", "embed")})
    except (OSError, ValueError):
        result.update({"ingest_s": None, "embed_s": None})
    log(f"{label}: {wall:.1f} s, input {result['input'] / MB:.1f} MB, shuffle {result['shuffle_read'] / MB:.1f} MB, "
        f"written {result['output'] / MB:.1f} MB, Delta rewritten {result['delta_removed'] / MB:.1f} MB")
    return result


def live_bytes(work: Path, weights: Path, precision: str, timeout: float) -> dict[str, Any]:
    """Bytes of each table's current snapshot and the images table's rows, read by a Spark process of its own."""
    spec = json.dumps({"config": str(CONFIG),
                       "tables": {name: str(path) for name, path in table_paths(work).items() if name in TABLES},
                       "overrides": [f"input.images={work / 'images'}", *overrides(work, weights, precision)]})
    done = subprocess.run([sys.executable, __file__, "--live-child", spec], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"reading the tables' snapshots failed:\n{done.stderr[-6000:]}")
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def live_child(spec: dict[str, Any]) -> dict[str, Any]:
    from image_embeddings.cli import configure_logging
    from image_embeddings.core.config import load_config
    from image_embeddings.core.spark import get_spark

    configure_logging("WARNING")
    spark = get_spark(load_config(spec["config"], spec["overrides"]))
    result: dict[str, Any] = {"bytes": {}, "files": {}}
    for name, location in spec["tables"].items():
        frame = spark.read.format("delta").load(location)
        paths = [unquote(urlparse(uri).path) for uri in frame.inputFiles()]
        result["bytes"][name] = sum(os.path.getsize(p) for p in paths)
        result["files"][name] = len(paths)
        if name == "images":
            result["images"] = frame.count()
    spark.stop()
    return result


def bench_size(n: int, root: Path, photos: Photos, weights: Path, precision: str, timeout: float) -> dict[str, Any]:
    work = root / f"n{n}"
    photos.seen.clear()
    started = time.perf_counter()
    layout = build_input(work, n, photos)
    log(f"N={n}: {n} photos in {layout['days']} day folders written in {time.perf_counter() - started:.1f} s")
    runs = [run_once(f"n{n}-build", layout["images"], work, weights, precision, timeout),
            run_once(f"n{n}-today", layout["today"], work, weights, precision, timeout)]
    change_today(layout["today"], n, photos)
    runs.append(run_once(f"n{n}-nightly", layout["today"], work, weights, precision, timeout))
    runs.append(run_once(f"n{n}-rerun", layout["today"], work, weights, precision, timeout))
    live = live_bytes(work, weights, precision, timeout)
    log(f"N={n}: live bytes per image " + ", ".join(f"{t} {live['bytes'][t] / max(live['images'], 1):.0f}"
                                                      for t in TABLES))
    return {"n": n, "runs": {r["run"].split("-", 1)[1]: r for r in runs}, "live": live}


# ---------------------------------------------------------------------------------------------------------
# the report


def article_fixed_cost(root: Path, photos: Photos, weights: Path, timeout: float) -> float:
    """The article's two scripts (``bench/baseline.py``) on 10 of the photos, in a process of their own, timed as
    a run here is (process start to exit): the fixed cost a rerun with nothing new is compared with."""
    from image_embeddings.testing.sample import write_sales

    work = root / "article"
    (work / "images").mkdir(parents=True)
    for i in range(10):
        (work / "images" / f"{image_id(i)}.jpg").write_bytes(photos.jpeg(i))
    write_sales(work / "sales", [image_id(i) for i in range(10)])
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--pipeline-child", "article", "--work",
                           str(work), "--weights", str(weights), "--runs", "1"], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the article's scripts failed:\n{done.stderr[-4000:]}")
    log(f"the article's two scripts on 10 photos, a fresh process: {wall:.1f} s")
    return wall


def per_image(size: dict[str, Any], table: str | None = None) -> float:
    live = size["live"]
    total = live["bytes"][table] if table else sum(live["bytes"][t] for t in TABLES)
    return float(total) / max(int(live["images"]), 1)


def summary(sizes: list[dict[str, Any]]) -> str:
    lines = ["| N images | nightly: input MB | nightly: shuffle MB | nightly: written MB | nightly: Delta rewritten MB "
             "| nightly: wall s | rerun, nothing new: wall s | live bytes/image: files table | images table "
             "| embeddings table | all three |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def cells(size: dict[str, Any]) -> list[float]:
        nightly, rerun = size["runs"]["nightly"], size["runs"]["rerun"]
        return [nightly["input"], nightly["shuffle_read"], nightly["output"], nightly["delta_removed"],
                nightly["wall"], rerun["wall"], *(per_image(size, t) for t in TABLES), per_image(size)]

    for size in sizes:
        values = cells(size)
        text = [f"{v / MB:.1f}" for v in values[:4]] + [f"{v:.1f}" for v in values[4:6]]
        text += [f"{v:,.0f}" for v in values[6:]]
        lines.append(f"| {size['n']:,} ({size['live']['images']:,} after) | " + " | ".join(text) + " |")
    if len(sizes) > 1:
        low, high = cells(sizes[0]), cells(sizes[-1])
        ratios = [f"{h / lo:.2f}x" if lo else "n/a" for lo, h in zip(low, high, strict=True)]
        lines.append(f"| ratio N={sizes[-1]['n']:,} / N={sizes[0]['n']:,} | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def details(sizes: list[dict[str, Any]]) -> str:
    lines = ["| N | run | listed | load | wall s | ingest s | embed s | jobs | tasks | input MB | shuffle read MB "
             "| shuffle write MB | output MB | Delta added MB | Delta rewritten MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for size in sizes:
        for name, r in size["runs"].items():
            stage = ["" if r.get(k) is None else f"{r[k]:.1f}" for k in ("ingest_s", "embed_s")]
            lines.append(f"| {size['n']:,} | {name} | {r['listed']}/ | {r['load']:.1f} | {r['wall']:.1f} "
                         f"| {stage[0]} | {stage[1]} "
                         f"| {r['jobs']:.0f} | {r['tasks']:.0f} | {r['input'] / MB:.1f} | {r['shuffle_read'] / MB:.1f} "
                         f"| {r['shuffle_write'] / MB:.1f} | {r['output'] / MB:.1f} | {r['delta_added'] / MB:.1f} "
                         f"| {r['delta_removed'] / MB:.1f} |")
    return "\n".join(lines)


def code_measured() -> str:
    import image_embeddings

    package = Path(image_embeddings.__file__).resolve().parent
    where = f"`image_embeddings` {getattr(image_embeddings, '__version__', '?')} from {package}"
    if package.is_relative_to(REPO):
        git = ["git", "-C", str(REPO)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "src"], capture_output=True, text=True).stdout
        where += f" (commit {head}{', with uncommitted changes in src/' if dirty.strip() else ''})"
    return where


def config_name() -> str:
    return f"`{os.path.relpath(CONFIG, REPO)}`" if CONFIG.is_relative_to(REPO) else f"`{CONFIG}`"


def machine() -> str:
    from importlib.metadata import version

    import pyspark
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{platform.platform()}, {platform.machine()}, nproc {cores}, Python {platform.python_version()}, "
            f"Spark {pyspark.__version__}, delta-spark {version('delta-spark')}, torch {torch.__version__}")


def command_line() -> str:
    prefix = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} " if os.environ.get("PYTHONPATH") else ""
    exe = os.path.relpath(sys.executable, REPO) if Path(sys.executable).is_relative_to(REPO) else sys.executable
    script = os.path.relpath(Path(__file__).resolve(), Path.cwd())
    return prefix + " ".join(shlex.quote(a) for a in [exe, script, *sys.argv[1:]])


def report(sizes: list[dict[str, Any]], seconds: float, precision: str, article: float | None) -> str:
    reruns = ", ".join(f"{size['runs']['rerun']['wall']:.1f} s at N={size['n']:,}" for size in sizes)
    fixed = ("" if article is None else
             f"Rerun with nothing new: {reruns}; the article's two scripts on 10 of the photos, in a fresh process "
             f"timed the same way (process start to exit): {article:.1f} s.\n")
    return "\n".join([
        f"## Nightly benchmark run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"Machine: {machine()}",
        f"Code: {code_measured()}",
        f"Command: `{command_line()}` ({seconds / 60:.1f} min)",
        "",
        summary(sizes),
        "",
        fixed,
        "Every run:",
        "",
        details(sizes),
        "",
        f"- Each N: N distinct {SIZE[0]}x{SIZE[1]} JPEGs (quality {QUALITY}) from the sample photos, "
        f"{PER_DAY} a day folder, today's the last; config {config_name()}, model.precision {precision}, each run "
        "`image-embeddings run` in a fresh process. build: the whole images folder; today: today's folder, "
        f"nothing new; nightly: today's folder after {NEW} new files, {REPLACED} replaced and {DELETED} deleted "
        "in it; rerun: today's folder again, unchanged.",
        "- input, shuffle (local + remote read), output: sums over the run's Spark tasks (event log, "
        "SparkListenerTaskEnd). Delta added / rewritten: bytes of the data files the run's commits added to / "
        "removed from the four tables' snapshots (a MERGE rewriting a file counts its whole old file). wall: the "
        "process from start to exit; load: the 1-minute load average as the run started (wall times on a shared "
        "machine vary with it). MB are 10^6 bytes.",
        "- Live bytes per image: the files of each table's current snapshot after the rerun, over the images "
        "table's rows (\"after\").",
        "",
    ])


def main() -> int:
    global CONFIG
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,4000", help="comma-separated N (images), each at least 200")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "nightly.md"),
                        help="Markdown file the report is appended to")
    parser.add_argument("--config", type=Path, default=CONFIG,
                        help="config file of every run (default conf/local.yaml; measuring another copy of the "
                             "package may need its own)")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed to each run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (photos, tables, logs)")
    parser.add_argument("--no-article", action="store_true", help="skip the article's fixed cost (10 photos)")
    parser.add_argument("--live-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.live_child:
        print(json.dumps(live_child(json.loads(args.live_child))))
        return 0
    CONFIG = args.config.resolve()
    ns = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not ns or min(ns) < 2 * PER_DAY:
        parser.error(f"--sizes: each N must be at least {2 * PER_DAY} (today's {PER_DAY} photos and older days)")
    from image_embeddings.testing.sample import trained_like_weights

    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="bench-nightly-"))
    log(f"working in {root}; measuring {code_measured()}")
    try:
        weights = trained_like_weights(root / "weights" / "resnet50.pth")
        photos = Photos()
        sizes = []
        article = None if args.no_article else article_fixed_cost(root, photos, weights, args.timeout)
        for n in ns:
            sizes.append(bench_size(n, root, photos, weights, args.precision, args.timeout))
            if not args.keep:
                shutil.rmtree(root / f"n{n}", ignore_errors=True)
    finally:
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    text = report(sizes, time.perf_counter() - started, args.precision, article)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as sink:
        sink.write(("\n" if out.stat().st_size else "") + text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
