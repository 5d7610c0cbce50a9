"""`make bench`: similarity search at the size of the tables (the nearest-neighbour index against exact search).

    .venv/bin/python bench/similarity.py [--rows 300000] [--out bench/results/similarity.md]

Builds an embeddings table of ``--rows`` synthetic 2048-d rows with the real schema and neighbourhood structure
(groups of 10 rows with cosine about 0.94, like a product's photos and their augmentations, in clusters of
groups with cosine about 0.7; :func:`image_embeddings.testing.sample.clustered_vector`), then prints:

- the index: its type, build time (a full build: sample, train, fill per partition, merge, write) and size;
- query latency with the loaded index (median and 95th percentile of 100 single queries) and recall@10 of those
  queries against exact search over the same vectors (numpy on all rows);
- an update after adding 1% new rows (the nightly path: change feed, one segment) against the full build;
- `similar` end to end (the stored query vector looked up in Delta, then the search) with the index and with the
  exact search over the table, which must complete.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GROUP, CLUSTERS_PER = 10, 10  # 10 rows a group, 10 groups a cluster


def timed(fn: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "similarity.md"))
    args = parser.parse_args()

    from image_embeddings.cli import configure_logging
    from image_embeddings.core.config import load_config
    from image_embeddings.core.spark import get_spark
    from image_embeddings.core.tables import create, merge_changes
    from image_embeddings.search.index import load_index, update_index
    from image_embeddings.search.rows import config_key
    from image_embeddings.search.similar import search
    from image_embeddings.search.store import store_for
    from image_embeddings.testing.sample import clustered_vector, synthetic_embeddings

    configure_logging("WARNING")
    logging.getLogger("image_embeddings.search").setLevel(logging.INFO)
    work = Path(tempfile.mkdtemp(prefix="bench-similarity-"))
    config = load_config(REPO / "conf" / "local.yaml", [
        f"input.images={work}/in", f"input.sales={work}/sales", f"output.images_table={work}/images",
        f"output.embeddings_table={work}/embeddings", f"output.runs_table={work}/runs",
        f"spark.ivy_dir={REPO / '.cache' / 'ivy'}", "model.weights=random:0"])
    spark = get_spark(config)
    key = config_key(config)
    n, clusters = args.rows, max(1, args.rows // (GROUP * CLUSTERS_PER))
    print(f"writing {n:,} synthetic rows ...", flush=True)
    _, write_s = timed(lambda: create(spark, config.output.embeddings_table,
                                      synthetic_embeddings(spark, key, 0, n, clusters, group=GROUP)))
    vectors = np.stack([clustered_vector(i, clusters, group=GROUP) for i in range(n)])
    print(f"  {write_s:.1f} s; table {_bytes(work / 'embeddings') / 1e9:.2f} GB", flush=True)

    built, build_s = timed(lambda: update_index(spark, config, full=True))
    store = store_for(config, key)
    loaded, load_s = timed(lambda: load_index(store, config.index.nprobe))
    rng = np.random.default_rng(7)
    picks = rng.choice(n, size=args.queries, replace=False)
    latencies, hits = [], 0
    for i in picks:
        query = vectors[i][None, :]
        (_, names, _), seconds = timed(lambda q=query: loaded.search(q, 11))
        latencies.append(seconds * 1000)
        exact = np.argsort(-(vectors @ vectors[i]), kind="stable")[:11]
        truth = {f"syn{j:08d}" for j in exact if j != i}
        found = [name for name in names[0] if name != f"syn{i:08d}"][:10]
        hits += len(truth & set(found))
    recall = hits / (10 * args.queries)

    added = max(1, n // 100)
    _, add_write_s = timed(lambda: merge_changes(
        spark, config.output.embeddings_table, synthetic_embeddings(spark, key, n, added, clusters, group=GROUP),
        None, ["image_id", "model_key"]))
    updated, update_s = timed(lambda: update_index(spark, config))
    assert updated["action"] == "updated" and updated["added"] == added, updated

    probe = f"syn{int(picks[0]):08d}"
    with_index, with_index_s = timed(lambda: search(spark, config, k=10, image_id=probe))
    exact_run, exact_s = timed(lambda: search(spark, config, k=10, image_id=probe, use_index=False))
    assert with_index.path == "index" and exact_run.path == "exact"
    agree = len({x.image_id for x in with_index.neighbours} & {x.image_id for x in exact_run.neighbours})

    rows = [
        ("table", f"{n:,} rows x 2048 (groups of {GROUP}, {clusters:,} clusters), "
                  f"{_bytes(work / 'embeddings') / 1e9:.2f} GB of Delta"),
        ("index", f"{built['type']}, {built['nlist']} lists, nprobe {config.index.nprobe}, "
                  f"{built['bytes'] / 1e6:,.0f} MB stored"),
        ("full build (sample, train, fill per partition, merge, write)", f"{build_s:.1f} s"),
        ("index load (base and segments)", f"{load_s:.1f} s"),
        (f"query latency with the loaded index, {args.queries} single queries",
         f"median {statistics.median(latencies):.1f} ms, p95 {np.percentile(latencies, 95):.1f} ms"),
        ("recall@10 against exact search", f"{recall:.3f}"),
        (f"update after adding 1% ({added:,} rows; change feed, one segment)",
         f"{update_s:.1f} s: {build_s / update_s:.1f}x faster than the full build "
         f"(the rows' own write {add_write_s:.1f} s)"),
        ("`similar` end to end (Delta lookup of the query, then search): with the index",
         f"{with_index_s:.1f} s"),
        ("`similar` end to end: exact search over the table (best 10 per Spark task)",
         f"{exact_s:.1f} s, completed; {agree} of 10 neighbours as with the index"),
    ]
    import torch

    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, " \
              f"torch {torch.__version__}, faiss {__import__('faiss').__version__}"
    report = (f"Similarity benchmark run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine}\n"
              f"Command: `.venv/bin/python bench/similarity.py --rows {n}`\n\n"
              "| measure | result |\n| --- | --- |\n" + "\n".join(f"| {a} | {b} |" for a, b in rows) + "\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print("\n" + report)
    spark.stop()
    return 0


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.parquet"))


if __name__ == "__main__":
    sys.exit(main())
