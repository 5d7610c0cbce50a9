"""The demo: build a sample of real photos with a sales table, then run the pipeline on local Spark and Delta."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from image_embeddings.cli import configure_logging
from image_embeddings.config import load_config
from image_embeddings.ingest import run_ingest
from image_embeddings.sample import write_sample
from image_embeddings.spark import get_spark


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="conf/local.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    configure_logging("WARNING")
    config = load_config(args.config, args.overrides)
    sample = Path(config.input.images).parent
    if not Path(config.input.images).is_dir():
        ids = write_sample(sample)
        print(f"wrote {len(ids)} sample photos and a sales table under {sample}")
    spark = get_spark(config)
    report = run_ingest(spark, config, report_file=str(Path("demo") / "ingest-report.json"))
    m = report.metrics
    print("\nstage 1 (ingest)")
    print(f"  files listed {m['files_listed']}  new {m['files_new']}  unchanged {m['files_unchanged']}  "
          f"decoded {m['files_decoded']}  errors {m['errors'] or 'none'}")
    print(f"  images {m['images']}  joined with sales {m['joined']}  images without sales "
          f"{m['images_without_sales']}  sales without images {m['sales_without_images']}")
    print(f"  {report.duration_s:.1f} s, {m['images_per_second']} images/s decoded")
    print(f"  tables: {config.output.images_table} (images), {config.output.runs_table} (run reports)")
    print("  report: demo/ingest-report.json")
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
