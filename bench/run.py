"""`make bench`: our stages against the article's pipeline, each ratio measured in one process on the same data.

    .venv/bin/python bench/run.py [--only stage1,stage2,pipeline] [--photos 600] [--out bench/results/latest.md]

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

from image_embeddings.images import downscale
from image_embeddings.sample import PHOTOS, encode, photo, trained_like_weights, variants, write_sales

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def jpegs(size: tuple[int, int], count: int) -> list[bytes]:
    """``count`` JPEGs of ``size`` made from the real photos and their variants (quality 90)."""
    sources = [photo(n) for n in PHOTOS]
    sources += [v for s in list(sources) for _, v in variants(s)]
    return [encode(sources[i % len(sources)], size=size, quality=90) for i in range(count)]


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
    from image_embeddings.embedder import Embedder, EmbedderSettings

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


def bench_pipeline(rows: list[dict[str, Any]], weights: Path, photos: int, few: int = 10) -> None:
    """Both stages under local Spark: `image-embeddings run` against the article's two scripts.

    Each pipeline runs in a fresh process of its own (its own JVM and Python workers, nothing warmed by the other),
    as a nightly spark-submit does; the session's start is not timed, the first Spark job is. Both run again on
    the first ``few`` photos: that time is a run's fixed cost (a cold JVM's first queries and table writes, torch's
    import and the model load), and the difference between the two runs gives the rate per photo beyond it. On all
    photos each pipeline also runs a second time in its process, on new tables: a warm run, as in a notebook or on
    a long-lived cluster.
    """
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    ids = [f"img{i:05d}" for i in range(photos)]
    for folder, count in ((work / "all", photos), (work / "few", few)):
        (folder / "images").mkdir(parents=True)
        write_sales(folder / "sales", ids[:count])
    for i, data in enumerate(jpegs((1600, 1200), photos)):
        (work / "all" / "images" / f"{ids[i]}.jpg").write_bytes(data)
        if i < few:
            (work / "few" / "images" / f"{ids[i]}.jpg").write_bytes(data)
    runs = {(which, size): _pipeline_in_child(which, work / size, weights, 2 if size == "all" else 1)
            for size in ("all", "few") for which in ("article", "ours")}
    results = {key: found[0] for key, found in runs.items()}
    results.update({(which, "warm"): runs[(which, "all")][1] for which in ("article", "ours")})

    def seconds(which: str, size: str) -> float:
        result = results[(which, size)]
        return float(result["stage1"] + result["stage2"]) if which == "article" else float(result["seconds"])

    article, ours = results[("article", "all")], results[("ours", "all")]
    base, rate = photos / seconds("article", "all"), photos / seconds("ours", "all")
    rows.append({"benchmark": f"whole pipeline, local[2], {photos} photos of 1600x1200, images/s end to end "
                              "(each in a fresh process)",
                 "baseline": f"{base:.1f} (stage 1 {article['stage1']:.1f} s, stage 2 {article['stage2']:.1f} s)",
                 "ours": f"{rate:.1f} (ingest {ours['ingest']:.1f} s, embed {ours['embed']:.1f} s)",
                 "ratio": f"{rate / base:.2f}x"})
    rows.append({"benchmark": f"the same on the first {few} photos: a run's fixed cost, seconds",
                 "baseline": f"{seconds('article', 'few'):.1f} s", "ours": f"{seconds('ours', 'few'):.1f} s",
                 "ratio": f"{seconds('article', 'few') / seconds('ours', 'few'):.2f}x"})
    marginal = {which: (photos - few) / max(seconds(which, "all") - seconds(which, "few"), 1e-6)
                for which in ("article", "ours")}
    rows.append({"benchmark": f"images/s beyond the fixed cost: {photos - few} photos over the difference of the two "
                              "runs",
                 "baseline": f"{marginal['article']:.1f}", "ours": f"{marginal['ours']:.1f}",
                 "ratio": f"{marginal['ours'] / marginal['article']:.2f}x"})
    warm_base, warm = photos / seconds("article", "warm"), photos / seconds("ours", "warm")
    rows.append({"benchmark": f"whole pipeline, {photos} photos, a second run in the same process (warm JVM and "
                              "Python workers, as in a notebook), images/s",
                 "baseline": f"{warm_base:.1f}", "ours": f"{warm:.1f}", "ratio": f"{warm / warm_base:.2f}x"})


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
    from image_embeddings.cli import configure_logging
    from image_embeddings.config import load_config
    from image_embeddings.pipeline import run_pipeline
    from image_embeddings.spark import get_spark

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
        results.append({"seconds": seconds, "ingest": combined["stages"]["ingest"]["duration_s"],
                        "embed": combined["stages"]["embed"]["duration_s"]})
    return results


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| benchmark | baseline (article) | ours | ratio |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['benchmark']} | {r['baseline']} | {r['ours']} | {r['ratio']} |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="stage1,stage2,pipeline")
    parser.add_argument("--photos", type=int, default=600)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "latest.md"))
    parser.add_argument("--pipeline-child", choices=("article", "ours"), help=argparse.SUPPRESS)
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
        bench_pipeline(rows, weights, args.photos)
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
