"""The ``image-embeddings`` command: argument parsing and wiring only."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from image_embeddings.config import AppConfig, ConfigError, load_config

log = logging.getLogger("image_embeddings")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``image-embeddings`` command."""
    parser = argparse.ArgumentParser(prog="image-embeddings",
                                     description="Spark jobs that turn product photos into Delta tables.")
    sub = parser.add_subparsers(dest="command", required=True)
    ingest = sub.add_parser("ingest", help="stage 1: list, decode and downscale images, join sales, write Delta")
    _add_common(ingest)
    embed = sub.add_parser("embed", help="stage 2: embed the images table with a headless backbone into Delta")
    _add_common(embed)
    check = sub.add_parser("check-config", help="validate a config file and print it")
    _add_common(check)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file (see conf/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set input.join=left (repeatable)")
    parser.add_argument("--report", default=None, help="write the run report as JSON to this file")
    parser.add_argument("--run-id", default=None, help="run id to record (default: generated)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def configure_logging(level: str) -> None:
    """Configure stdlib logging once, for the command line and spark-submit entry points."""
    logging.basicConfig(level=getattr(logging, level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``image-embeddings`` console script."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        log.error("invalid configuration: %s", exc)
        return 2
    if args.command == "check-config":
        import json

        from image_embeddings.config import as_dict
        from image_embeddings.report import redact

        print(json.dumps(redact(as_dict(config)), indent=2, sort_keys=True))
        return 0
    return _run_stage(args.command, config, args.run_id, args.report)


def _run_stage(command: str, config: AppConfig, run_id: str | None, report_file: str | None) -> int:
    from image_embeddings.embed import EmbedError, run_embed
    from image_embeddings.embedder import WeightsError
    from image_embeddings.ingest import IngestError, run_ingest
    from image_embeddings.spark import get_spark

    stage = {"ingest": run_ingest, "embed": run_embed}[command]
    spark = get_spark(config, stage=command)
    try:
        report = stage(spark, config, run_id=run_id, report_file=report_file)
    except (IngestError, EmbedError, WeightsError) as exc:
        log.error("%s failed: %s", command, exc)
        return 1
    return 0 if report.status == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
