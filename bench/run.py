"""`make bench`: our stages against the article's pipelines, each ratio measured in one process on the same data.

    .venv/bin/python bench/run.py [--only stage1,stage2,pipeline] [--photos 2000,600] [--out bench/results/latest.md]

What runs (rows printed as each part finishes, then the whole Markdown table, also written to ``--out``):

- ``stage1``, ``stage2``: our two functions against the article's UDF bodies (bench/baseline.py), in this process.
- ``pipeline``, once per ``--photos`` count (default 2,000, then 600 photos of 1600x1200): three peers, each in a
  fresh process of its own: the article's two Spark scripts (the baseline, bench/baseline.py), ours
  (``run_pipeline`` with conf/local.yaml, local[2]) and the article's Daft pipeline (bench/daft_peer.py, from the
  ``bench`` extra: daft, deltalake). Each runs on all photos twice (the second time warm, in the same process) and
  on the first 10 once (a run's fixed cost). Rows: images/s end to end, the fixed cost, the rate beyond it and the
  warm run, each as ours / article and ours / Daft; Daft's output checked (its Delta table has one row per photo,
  each a 2048-d embedding) with the min cosine of its embeddings to ours and to the article's; then, per stage of
  ours, its rate inside Spark (photos / the run report's ``read_and_decode`` seconds, images / its ``embed``
  seconds) next to its function's rate on the same 2 cores, measured here after the pipelines have finished
  (``downscale`` and the ``Embedder``, each in 2 processes): the efficiency, against targets of 85% and 90%.

`make bench` then runs bench/nightly.py, the nightly-scale benchmark (tables of N=1,000 and 4,000 photos, a
nightly run that changes 20 files: Spark input and shuffle bytes, wall time, live table bytes per image; appended
to bench/results/nightly.md). On a machine with a GPU, bench/gpu.py measures the embedder alone.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Spark's Python workers import the article's UDF bodies from bench/baseline.py too.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parent),
                                                       os.environ.get("PYTHONPATH", "")) if p)

from baseline import article_downscale, article_embed, article_model, article_transform, psnr, run_article_scripts

from image_embeddings.ingest.images import downscale
from image_embeddings.testing.sample import PHOTOS, encode, photo, trained_like_weights, variants, write_sales

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def jpegs(size: tuple[int, int], count: int) -> list[bytes]:
    """``count`` JPEGs of ``size`` made from the real photos and their variants (quality 90)."""
    sources = [photo(n) for n in PHOTOS]
    sources += [v for s in list(sources) for _, v in variants(s)]
    return [encode(sources[i % len(sources)], size=size, quality=90) for i in range(count)]


def photo_folder(folder: Path, photos: int) -> None:
    """``photos`` JPEGs of 1600x1200 (``images/img00000.jpg``, ...) under ``folder`` and a sales table of their ids
    (``sales``). The same count always gives the same photos; a smaller count, the first of them."""
    ids = [f"img{i:05d}" for i in range(photos)]
    (folder / "images").mkdir(parents=True)
    write_sales(folder / "sales", ids)
    for image_id, data in zip(ids, jpegs((1600, 1200), photos), strict=True):
        (folder / "images" / f"{image_id}.jpg").write_bytes(data)


def rate(fn: Callable[[T], Any], inputs: list[T], min_seconds: float = 2.0) -> float:
    """Items per second of ``fn`` over ``inputs``, repeated until at least ``min_seconds`` have passed."""
    done, started = 0, time.perf_counter()
    while True:
        for item in inputs:
            fn(item)
        done += len(inputs)
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return done / elapsed


def decoded(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def bench_stage1(rows: list[dict[str, Any]]) -> None:
    """Decode and downscale, one core: ours against the article's UDF body, with PSNR."""
    from PIL import Image

    for label, size, count in (("12 MP (4000x3000)", (4000, 3000), 12), ("2 MP (1600x1200)", (1600, 1200), 40)):
        inputs = jpegs(size, count)
        base = rate(article_downscale, inputs)
        ours = rate(lambda b: downscale(b, mode="squash"), inputs)
        ours_crop = rate(downscale, inputs)
        sample = inputs[:8]
        reference = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB").resize((224, 224), Image.Resampling.LANCZOS))
                     for b in sample]
        base_psnr = np.mean([psnr(decoded(article_downscale(b) or b""), r)
                             for b, r in zip(sample, reference, strict=True)])
        ours_psnr = np.mean([psnr(decoded(downscale(b, mode="squash").image or b""), r)
                             for b, r in zip(sample, reference, strict=True)])
        rows.append({"benchmark": f"stage 1 function, {label}, images/s on one core",
                     "baseline": f"{base:.1f} (PSNR {base_psnr:.1f} dB)",
                     "ours": f"{ours:.1f} squash (PSNR {ours_psnr:.1f} dB), {ours_crop:.1f} center_crop",
                     "ratio": f"{ours / base:.2f}x"})


def bench_stage2(rows: list[dict[str, Any]], weights: Path) -> None:
    """Embedding on CPU: ours (batched, auto precision) against the article's per-row fp32 loop."""
    from image_embeddings.embed.embedder import Embedder, EmbedderSettings

    thumbs = [downscale(b).image for b in jpegs((1600, 1200), 64)]
    inputs = [t for t in thumbs if t is not None]
    resnet, transform = article_model(str(weights)), article_transform()
    started = time.perf_counter()
    base_out = np.asarray(article_embed(inputs, resnet, transform), dtype=np.float32)
    base = len(inputs) / (time.perf_counter() - started)
    batch = 8  # conf/local.yaml's model.batch_size: fastest on this CPU
    embedder = Embedder(EmbedderSettings("resnet50", str(weights), device="cpu", precision="auto", batch_size=batch))
    embedder.embed(inputs[:batch])  # warm-up, as a long-lived worker is
    ours_out = embedder.embed(inputs).embeddings
    ours = rate(lambda batch_of_all: embedder.embed(batch_of_all), [inputs], min_seconds=3.0) * len(inputs)
    base_n = base_out / np.linalg.norm(base_out, axis=1, keepdims=True)
    cosine = float(np.min(np.sum(base_n * ours_out, axis=1)))
    rows.append({"benchmark": f"stage 2 function on CPU ({os.cpu_count()} threads), images/s",
                 "baseline": f"{base:.1f} (per row, fp32)",
                 "ours": f"{ours:.1f} (batch {batch}, {embedder.precision}, {embedder.engine}), "
                         f"min cosine to baseline {cosine:.5f}",
                 "ratio": f"{ours / base:.2f}x"})


PEERS = ("article", "ours", "daft")


def bench_pipeline(rows: list[dict[str, Any]], weights: Path, photos: int, few: int = 10) -> None:
    """Both stages end to end: `image-embeddings run` against the article's two Spark scripts and its Daft pipeline.

    Each pipeline runs in a fresh process of its own (its own JVM or Daft runner, its own Python workers, nothing
    warmed by another), as a nightly spark-submit does; the session's start (Spark's, Daft's runner's) and the
    imports are not timed, everything from reading the photos to the written Delta table is. Each runs again on
    the first ``few`` photos: that time is a run's fixed cost (a cold JVM's first queries and table writes, torch's
    import and the model load), and the difference between the two runs gives the rate per photo beyond it. On all
    photos each pipeline also runs a second time in its process, on new tables: a warm run, as in a notebook or on
    a long-lived cluster. Then Daft's table is checked against ours, and our stages' rates inside Spark are set
    against their functions' rates on the same cores, measured here once no pipeline runs.
    """
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    photo_folder(work / "all", photos)
    photo_folder(work / "few", few)  # the first of the same photos
    runs = {(which, size): _pipeline_in_child(which, work / size, weights, 2 if size == "all" else 1)
            for size in ("all", "few") for which in PEERS}
    results = {key: found[0] for key, found in runs.items()}
    results.update({(which, "warm"): runs[(which, "all")][1] for which in PEERS})

    def seconds(which: str, size: str) -> float:
        result = results[(which, size)]
        return float(result["stage1"] + result["stage2"]) if which == "article" else float(result["seconds"])

    def speeds(figure: dict[str, float]) -> dict[str, str]:
        """The ratio columns of a row of rates (higher is better): ours / article and ours / Daft."""
        return {"ratio": f"{figure['ours'] / figure['article']:.2f}x",
                "daft_ratio": f"{figure['ours'] / figure['daft']:.2f}x"}

    article, ours = results[("article", "all")], results[("ours", "all")]
    end_to_end = {which: photos / seconds(which, "all") for which in PEERS}
    rows.append({"benchmark": f"whole pipeline, 2 cores (local[2]; Daft's native runner), {photos} photos of "
                              "1600x1200, images/s end to end (each in a fresh process)",
                 "baseline": f"{end_to_end['article']:.1f} (stage 1 {article['stage1']:.1f} s, stage 2 "
                             f"{article['stage2']:.1f} s)",
                 "ours": f"{end_to_end['ours']:.1f} (ingest {ours['ingest']:.1f} s, embed {ours['embed']:.1f} s)",
                 "daft": f"{end_to_end['daft']:.1f} ({seconds('daft', 'all'):.1f} s)", **speeds(end_to_end)})
    fixed = {which: seconds(which, "few") for which in PEERS}
    rows.append({"benchmark": f"the same on the first {few} photos: a run's fixed cost, seconds (ratios: their "
                              "seconds / ours)",
                 "baseline": f"{fixed['article']:.1f} s", "ours": f"{fixed['ours']:.1f} s",
                 "ratio": f"{fixed['article'] / fixed['ours']:.2f}x", "daft": f"{fixed['daft']:.1f} s",
                 "daft_ratio": f"{fixed['daft'] / fixed['ours']:.2f}x"})
    marginal = {which: (photos - few) / max(seconds(which, "all") - seconds(which, "few"), 1e-6) for which in PEERS}
    rows.append({"benchmark": f"images/s beyond the fixed cost: {photos - few} photos over the difference of the two "
                              "runs",
                 "baseline": f"{marginal['article']:.1f}", "ours": f"{marginal['ours']:.1f}",
                 "daft": f"{marginal['daft']:.1f}", **speeds(marginal)})
    warm = {which: photos / seconds(which, "warm") for which in PEERS}
    rows.append({"benchmark": f"whole pipeline, {photos} photos, a second run in the same process (warm JVM or Daft "
                              "runner and Python workers, as in a notebook), images/s",
                 "baseline": f"{warm['article']:.1f}", "ours": f"{warm['ours']:.1f}", "daft": f"{warm['daft']:.1f}",
                 **speeds(warm)})
    rows.append(check_daft_output(work / "all", photos, weights))
    rows.extend(stage_efficiency(work / "all", weights, [runs[("ours", "all")][0], runs[("ours", "all")][1]]))


def delta_embeddings(table: str) -> tuple[list[str], list[list[float] | None]]:
    """The ``image_id`` and ``embedding`` columns of a Delta table, read with deltalake (delta-rs), no Spark.

    Through its DataFusion ``QueryBuilder``: ``DeltaTable.to_pyarrow_table()`` refuses our tables, which have
    deletion vectors enabled (deltalake 1.6.6: "reader features {'deletionVectors'} ... not yet supported")."""
    import pyarrow as pa
    from deltalake import DeltaTable, QueryBuilder

    data = pa.table(QueryBuilder().register("t", DeltaTable(table)).execute(
        "SELECT image_id, embedding FROM t").read_all())
    return [str(i) for i in data.column("image_id").to_pylist()], data.column("embedding").to_pylist()


def by_image_id(table: str) -> dict[str, np.ndarray]:
    """``image_id`` -> embedding of a Delta table's rows that have one."""
    return {image_id: np.asarray(embedding, dtype=np.float32)
            for image_id, embedding in zip(*delta_embeddings(table), strict=True) if embedding is not None}


def min_cosine(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, int]:
    """The smallest cosine between the embeddings of the same image_id in ``a`` and ``b``, and how many were paired."""
    common = sorted(a.keys() & b.keys())
    if not common:
        return float("nan"), 0
    x, y = np.stack([a[k] for k in common]), np.stack([b[k] for k in common])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return float(np.min(np.sum(x * y, axis=1))), len(common)


def check_daft_output(work: Path, photos: int, weights: Path, sample: int = 32) -> dict[str, str]:
    """Daft's table (first run) has one row per photo with a 2048-d embedding; its min cosine to ours and to the
    article's for the same image_ids. Read here, where daft is not imported: its Arrow extension type, registered
    by ``import daft``, makes deltalake's read of the table fail.

    Ours center-crops (conf/local.yaml) where Daft and the article resize the whole photo: the same photo's two
    views differ by about as much as two photos do with these weights. So ours is also run here on ``sample`` of
    the photos resized whole (``downscale(mode="squash")``): near 1, Daft's model and weights are ours."""
    from image_embeddings.embed.embedder import Embedder, EmbedderSettings

    image_ids, embeddings = delta_embeddings(str(work / "daft-0" / "embeddings"))
    sizes = {len(e) if e is not None else 0 for e in embeddings}
    if len(image_ids) != photos or len(set(image_ids)) != photos or sizes != {2048}:
        raise RuntimeError(f"Daft's table: {len(image_ids)} rows, {len(set(image_ids))} image_ids, embedding sizes "
                           f"{sorted(sizes)}; expected {photos} photos, each one 2048-d embedding")
    daft = by_image_id(str(work / "daft-0" / "embeddings"))
    to_ours, paired = min_cosine(daft, by_image_id(str(work / "ours-0" / "embeddings")))
    to_article, _ = min_cosine(daft, by_image_id(str(work / "article-0" / "embeddings")))
    if paired != photos:
        raise RuntimeError(f"only {paired} of Daft's {photos} image_ids have an embedding in ours")
    ids = sorted(daft)[:sample]
    thumbs = [downscale((work / "images" / f"{i}.jpg").read_bytes(), mode="squash").image for i in ids]
    embedder = Embedder(EmbedderSettings("resnet50", str(weights), device="cpu", precision="auto", batch_size=8))
    squashed = embedder.embed(thumbs).embeddings
    to_squash, _ = min_cosine({i: daft[i] for i in ids}, {i: e for i, e in zip(ids, squashed, strict=True)
                                                         if not np.isnan(e).any()})
    print(f"Daft vs ours, {photos} photos: min cosine {to_ours:.5f} (ours center-cropped), {to_squash:.5f} (ours on "
          f"{len(ids)} photos resized whole, as Daft does)", flush=True)
    return {"benchmark": f"Daft's output, {photos} photos: its Delta table's rows and embedding size, min cosine of "
                         "its embeddings to ours and to the article's for the same image_ids (ours center-crop, "
                         "conf/local.yaml; Daft and the article resize the whole photo to 224x224)",
            "baseline": "-", "ours": "-",
            "ratio": "-", "daft": f"{len(image_ids)} rows, 2048-d; min cosine {to_ours:.5f} to ours, "
                                  f"{to_squash:.5f} to ours on {len(ids)} photos resized whole as Daft does, "
                                  f"{to_article:.5f} to the article's", "daft_ratio": "-"}


def _warm_up_worker(path: str) -> int:
    downscale(Path(path).read_bytes())
    time.sleep(0.2)  # holds this process, so the other one takes the other warm-up task
    return os.getpid()


def _decode_file(path: str, size: int, mode: str, quality: int, max_pixels: int, crop_fraction: float) -> int:
    """Stage 1's function on one file: read it, decode and downscale it (as the Spark UDF does, given the bytes)."""
    result = downscale(Path(path).read_bytes(), size=size, mode=mode, quality=quality, max_pixels=max_pixels,
                       crop_fraction=crop_fraction)
    return len(result.image or b"")


def _embed_rate(settings: Any, inputs: list[bytes], start_at: float, seconds: float) -> tuple[float, str, str]:
    """Stage 2's function in this process: the ``Embedder`` warmed up, then timed from ``start_at`` (the moment
    every process of the measurement starts) for ``seconds``; images per second, the precision and the engine."""
    from image_embeddings.embed.embedder import Embedder

    embedder = Embedder(settings)
    for _ in range(4):  # a long-lived worker's state: oneDNN's kernels made, malloc's heap grown
        embedder.embed(inputs)
    time.sleep(max(0.0, start_at - time.time()))
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        embedder.embed(inputs)
        done += len(inputs)
    return done / (time.perf_counter() - started), embedder.precision, embedder.engine


def stage_efficiency(work: Path, weights: Path, ours: list[dict[str, float]],
                     min_seconds: float = 3.0) -> list[dict[str, str]]:
    """Each of our stages' rate inside Spark (from the run reports of the first and the warm run) next to its
    function's rate on the same 2 cores, laid out as Spark runs it (local[2]: two Python workers, one task and
    one torch thread each), measured once no pipeline runs: stage 1 ``downscale`` with conf/local.yaml's
    preprocessing in 2 processes at once, stage 2 the ``Embedder`` (conf/local.yaml's batch size, precision
    "auto", 1 thread) in 2 processes at once; both warmed up, each timed for at least ``min_seconds``."""
    import dataclasses
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    from image_embeddings.core.config import load_config
    from image_embeddings.embed.identity import embedder_settings, resolve_config_weights

    config = load_config(REPO / "conf" / "local.yaml", [
        f"input.images={work / 'images'}", f"input.sales={work / 'sales'}", f"model.weights={weights}",
        f"model.cache_dir={REPO / '.cache' / 'models'}"])
    pre = config.preprocess
    paths = sorted(str(p) for p in (work / "images").glob("*.jpg"))[:256]
    decode = partial(_decode_file, size=pre.size, mode=pre.mode, quality=pre.jpeg_quality,
                     max_pixels=pre.max_pixels, crop_fraction=pre.crop_fraction)
    load = os.getloadavg()[0]  # other work on the 2 cores slows the functions (torch's threads most) as well
    # spawn, not fork: this process may hold torch's threads already
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        pids: set[int] = set()
        while len(pids) < 2:  # both processes started, their imports done
            pids |= set(pool.map(_warm_up_worker, paths[:2]))
        list(pool.map(decode, paths[:8]))
        done, started = 0, time.perf_counter()
        while True:
            list(pool.map(decode, paths, chunksize=4))
            done += len(paths)
            elapsed = time.perf_counter() - started
            if elapsed >= min_seconds:
                break
    decode_rate = done / elapsed

    settings = dataclasses.replace(embedder_settings(config, resolve_config_weights(config)), device="cpu",
                                   precision="auto", threads=1)
    thumbs = [downscale(Path(p).read_bytes(), size=pre.size, mode=pre.mode, quality=pre.jpeg_quality,
                        max_pixels=pre.max_pixels, crop_fraction=pre.crop_fraction).image for p in paths[:64]]
    inputs = [t for t in thumbs if t is not None]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        start_at = time.time() + 60  # both loaded and warmed up by then
        measured = list(pool.map(_embed_rate, [settings] * 2, [inputs] * 2, [start_at] * 2,
                                 [max(min_seconds, 10.0)] * 2))
    embed_rate = sum(r for r, _, _ in measured)
    precision, engine = measured[0][1:]

    def row(stage: str, what: str, count: str, step: str, key: str, function: float, target: float,
            how: str) -> dict[str, str]:
        inside = [run[count] / max(run[key], 1e-6) for run in ours]
        first, second = (r / function for r in inside)
        return {"benchmark": f"{stage} inside Spark vs its function on the same 2 cores, {what}/s (efficiency "
                             f"target >= {target:.0%})",
                "baseline": "-",
                "ours": f"function {function:.1f} ({how}, 1-min load {load:.1f}); inside Spark {inside[0]:.1f} = "
                        f"{first:.0%} (first run: {int(ours[0][count])} in {ours[0][key]:.1f} s of the step {step}), "
                        f"{inside[1]:.1f} = {second:.0%} (second run)",
                "ratio": "-"}

    return [row("stage 1 decode", "photos", "decoded", "read_and_decode", "read_and_decode", decode_rate, 0.85,
                f"downscale {pre.mode}, 2 processes"),
            row("stage 2 embed", "images", "embedded", "embed", "embed_step", embed_rate, 0.90,
                f"Embedder, 2 processes of 1 thread, batch {settings.batch_size}, {precision}, {engine}")]


def _pipeline_in_child(which: str, work: Path, weights: Path, runs: int) -> list[dict[str, float]]:
    import json
    import subprocess

    done = subprocess.run([sys.executable, __file__, "--pipeline-child", which, "--work", str(work),
                           "--weights", str(weights), "--runs", str(runs)], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"the {which} pipeline failed:\n{done.stderr[-4000:]}")
    result: list[dict[str, float]] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def pipeline_child(which: str, work: Path, weights: Path, runs: int = 1) -> list[dict[str, float]]:
    """One pipeline in this process: a new local session (not timed), then the pipeline (timed) ``runs`` times,
    each on new tables."""
    if which == "daft":
        return daft_child(work, weights, runs)
    from image_embeddings.cli import configure_logging
    from image_embeddings.core.config import load_config
    from image_embeddings.core.spark import get_spark
    from image_embeddings.pipeline import run_pipeline

    configure_logging("WARNING")
    results = []
    for run in range(runs):
        out = work / f"{which}-{run}"
        config = load_config(REPO / "conf" / "local.yaml", [
            f"input.images={work / 'images'}", f"input.sales={work / 'sales'}", f"output.images_table={out}/images",
            f"output.embeddings_table={out}/embeddings", f"output.runs_table={out}/runs",
            f"spark.ivy_dir={REPO / '.cache' / 'ivy'}", f"model.weights={weights}"])
        spark = get_spark(config, stage="embed")  # created by the first run, reused by the others
        spark.range(1).count()  # session start is not part of either figure
        if which == "article":
            # Spark's default, as the article ran
            spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "10000")
            stage1, stage2 = run_article_scripts(spark, str(work / "images"), str(work / "sales"), f"{out}/images",
                                                 f"{out}/embeddings", str(weights))
            results.append({"stage1": stage1, "stage2": stage2})
            continue
        started = time.perf_counter()
        combined = run_pipeline(spark, config)
        seconds = time.perf_counter() - started
        if combined["status"] != "succeeded":
            raise RuntimeError(f"run failed: {combined}")
        ingest, embed = combined["stages"]["ingest"], combined["stages"]["embed"]
        results.append({"seconds": seconds, "ingest": ingest["duration_s"], "embed": embed["duration_s"],
                        "decoded": ingest["metrics"]["files_decoded"],
                        "read_and_decode": ingest["metrics"]["seconds"]["read_and_decode"],
                        "embedded": embed["metrics"]["embedded"], "embed_step": embed["metrics"]["seconds"]["embed"]})
    return results


def daft_child(work: Path, weights: Path, runs: int = 1) -> list[dict[str, float]]:
    """The article's Daft pipeline in this process: imports and the runner's start not timed, then the pipeline
    (timed) ``runs`` times, each writing a new table."""
    import daft
    from daft_peer import run_daft_pipeline

    daft.from_pydict({"x": [1]}).collect()  # the native runner's start, as Spark's session start, is not timed
    results = []
    for run in range(runs):
        started = time.perf_counter()
        run_daft_pipeline(work / "images", work / "sales", str(work / f"daft-{run}" / "embeddings"), weights)
        results.append({"seconds": time.perf_counter() - started})
    return results


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| benchmark | baseline (article's Spark scripts) | ours | ours / article "
             "| Daft (article's Daft pipeline) | ours / Daft |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['benchmark']} | {r['baseline']} | {r['ours']} | {r['ratio']} | {r.get('daft', '-')} "
              f"| {r.get('daft_ratio', '-')} |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="stage1,stage2,pipeline")
    parser.add_argument("--photos", default="2000,600", help="photo counts of the pipeline benchmark, in order")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "latest.md"))
    parser.add_argument("--pipeline-child", choices=PEERS, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pipeline_child:
        import json

        print(json.dumps(pipeline_child(args.pipeline_child, args.work, args.weights, args.runs)))
        return 0
    only = set(args.only.split(","))
    weights = trained_like_weights(Path(tempfile.mkdtemp(prefix="bench-weights-")) / "resnet50.pth")
    rows: list[dict[str, Any]] = []
    if "stage1" in only:
        bench_stage1(rows)
        print(table(rows[-2:]), flush=True)
    if "stage2" in only:
        bench_stage2(rows, weights)
        print(table(rows[-1:]), flush=True)
    if "pipeline" in only:
        for photos in (int(n) for n in args.photos.split(",")):
            done = len(rows)
            bench_pipeline(rows, weights, photos)
            print(table(rows[done:]), flush=True)
    import torch

    machine = (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
               f"torch {torch.__version__}, Pillow {__import__('PIL').__version__}")
    report = (f"Benchmarks run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine}\n"
              f"Command: `make bench` (`.venv/bin/python bench/run.py --only {args.only} --photos {args.photos}`)\n\n"
              f"{table(rows)}\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
