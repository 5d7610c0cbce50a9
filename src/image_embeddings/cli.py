"""The ``image-embeddings`` command: argument parsing and wiring only."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from image_embeddings.core.config import AppConfig, ConfigError, load_config
from image_embeddings.ops.deploy import MARKER, STAGES, TRAILING_DAYS, ingest_dates, marker_exists, run_date_for

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
    run = sub.add_parser("run", help="stage 1 then stage 2, with one combined report")
    _add_common(run)
    similar = sub.add_parser("similar", help="top-k cosine neighbours from the embeddings table")
    _add_common(similar)
    query = similar.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", help="an image file (local path or any Spark-readable URI) to search with")
    query.add_argument("--id", dest="image_id", help="the image_id of an embedded image to search with")
    similar.add_argument("--k", type=int, default=10, help="how many neighbours (default 10)")
    similar.add_argument("--json", action="store_true", help="print the neighbours as JSON")
    similar.add_argument("--exact", action="store_true", help="search exactly even when a fresh index exists")
    index = sub.add_parser("index", help="build or update the nearest-neighbour index of the embeddings table "
                                         "(faiss; an update adds and removes the changed rows only)")
    _add_common(index)
    index.add_argument("--full", action="store_true", help="rebuild from every row instead of updating")
    neighbours = sub.add_parser("neighbours", help="write the top-k neighbours of every image to a Delta table "
                                                   "(updates the index first; later runs redo changed rows only)")
    _add_common(neighbours)
    neighbours.add_argument("--k", type=int, default=None, help="neighbours per image (default index.neighbours_k)")
    neighbours.add_argument("--full", action="store_true", help="recompute every row instead of the changed ones")
    evaluate = sub.add_parser("evaluate", help="embedding quality without labels: augmented copies of a sample of "
                                               "stored images found again (recall@1, @5), null and norm statistics")
    _add_common(evaluate)
    evaluate.add_argument("--sample", type=int, default=200, help="stored images to evaluate with (default 200)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    evaluate.add_argument("--json", action="store_true", help="print the figures as JSON")
    status = sub.add_parser("status", help="the last runs, each table's version and rows, embeddings per model, "
                                           "the newest failure")
    _add_common(status)
    status.add_argument("--runs", type=int, default=10, help="how many of the last runs to show (default 10)")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    check = sub.add_parser("check-config", help="validate a config file and print it")
    _add_common(check)
    maintain = sub.add_parser("maintain", help="OPTIMIZE and VACUUM the Delta tables (retention from config)")
    _add_common(maintain)
    maintain.add_argument("--allow-short-retention", action="store_true",
                          help="VACUUM even with maintenance.vacuum_retention_hours below a table's "
                               "delta.deletedFileRetentionDuration (Delta's safety check is disabled for that call)")
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file (see conf/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set input.join=left (repeatable)")
    parser.add_argument("--report", default=None, help="write the run report as JSON to this file")
    parser.add_argument("--run-id", default=None, help="run id to record (default: generated)")
    parser.add_argument("--run-date", default=None, metavar="YYYY-MM-DD",
                        help="fills {run_date} in input.images / input.sales and is recorded in the report")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--verbose", action="store_true",
                        help="show everything on the console: Spark's and the JVM's output, stack traces")
    parser.add_argument("--log-file", default=None,
                        help="where Spark's output and stack traces go when not --verbose "
                             "(default: $IMAGE_EMBEDDINGS_LOG_DIR or ~/.cache/image-embeddings/logs, one file a run)")


_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str, log_file: str | None = None) -> None:
    """Configure stdlib logging once, for the command line and spark-submit entry points: ``level`` and up on
    the console; with ``log_file``, everything (stack traces included) in that file as well."""
    from image_embeddings.core.redaction import ScrubbingFormatter

    logging.basicConfig(level=getattr(logging, level), stream=sys.stderr, format=_FORMAT)
    logging.getLogger("py4j").setLevel(logging.WARNING)
    for console in logging.getLogger().handlers:  # credentials inside values never reach a log line
        console.setFormatter(ScrubbingFormatter(_FORMAT))
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file, delay=True)
        handler.setLevel(logging.INFO)
        handler.setFormatter(ScrubbingFormatter(_FORMAT))
        root = logging.getLogger()
        for console in root.handlers:
            console.setLevel(getattr(logging, level))
            console.addFilter(lambda record: not getattr(record, "file_only", False))
        root.addHandler(handler)
        root.setLevel(min(getattr(logging, level), logging.INFO))


def default_log_file(command: str) -> str:
    """A new log file for one command's run."""
    import datetime as dt
    import os

    folder = os.environ.get("IMAGE_EMBEDDINGS_LOG_DIR") or str(Path("~/.cache/image-embeddings/logs").expanduser())
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return str(Path(folder) / f"{command}-{stamp}-{os.getpid()}.log")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``image-embeddings`` console script."""
    args = build_parser().parse_args(argv)
    args.log_file = None if args.verbose else (args.log_file or default_log_file(args.command))
    configure_logging(args.log_level, args.log_file)
    try:
        # maintain and check-config read no input: a {run_date} placeholder needs no --run-date there.
        config = load_config(args.config, args.overrides, run_date=args.run_date,
                             needs_input=args.command not in ("maintain", "check-config", "status", "index",
                                                              "neighbours", "similar"))
    except ConfigError as exc:
        log.error("invalid configuration: %s", exc)
        return 2
    if args.command == "check-config":
        import json

        from image_embeddings.core.config import as_dict
        from image_embeddings.core.redaction import redact

        print(json.dumps(redact(as_dict(config)), indent=2, sort_keys=True))
        return 0
    if args.command == "maintain":
        return _maintain(args, config)
    if args.command == "status":
        return _status(args, config)
    return _run_command(args, config)


def _run_command(args: argparse.Namespace, config: AppConfig) -> int:
    import image_embeddings
    from image_embeddings.core.spark import get_spark
    from image_embeddings.embed.stage import run_embed
    from image_embeddings.ingest.stage import run_ingest
    from image_embeddings.pipeline import run_pipeline

    log.info("image-embeddings %s (%s) %s", image_embeddings.__version__, image_embeddings.__file__, args.command)
    spark = get_spark(config, stage="embed" if args.command in ("embed", "run") else args.command,
                      jvm_log=args.log_file)
    try:
        if args.command == "similar":
            return _similar(spark, config, args)
        if args.command == "evaluate":
            return _evaluate(spark, config, args)
        if args.command == "index":
            from image_embeddings.search.index import index_line, run_index

            report = run_index(spark, config, full=args.full, run_id=args.run_id, report_file=args.report,
                               run_date=args.run_date)
            print(index_line(report.metrics))
            return 0
        if args.command == "neighbours":
            from image_embeddings.search.neighbours import neighbours_line, run_neighbours

            report = run_neighbours(spark, config, k=args.k, full=args.full, run_id=args.run_id,
                                             report_file=args.report, run_date=args.run_date)
            print(neighbours_line(report.metrics))
            return 0
        if args.command == "run":
            combined = run_pipeline(spark, config, run_id=args.run_id, report_file=args.report,
                                    run_date=args.run_date)
            return 0 if combined["status"] == "succeeded" else 1
        stage = {"ingest": run_ingest, "embed": run_embed}[args.command]
        report = stage(spark, config, run_id=args.run_id, report_file=args.report, run_date=args.run_date)
        return 0 if report.status == "succeeded" else 1
    except Exception as exc:  # the package's errors, Spark's, the JVM's: one line; the trace in the log file
        from image_embeddings.core.lease import LeaseHeldError

        wrote = args.command in ("ingest", "embed", "run", "neighbours") and not isinstance(exc, LeaseHeldError)
        return _failed(args, config, exc, writes=wrote)


def _failed(args: argparse.Namespace, config: AppConfig, exc: BaseException, writes: bool) -> int:
    """One line on the console: the command, the cause, what is untouched, where the report and details are."""
    from image_embeddings.core.errors import failure_line

    parts = [f"{args.command} failed: {failure_line(exc)}"]
    if writes:
        report = f"{args.report} and " if args.report else ""
        parts.append(f"tables of the failed stage are at their previous versions; report in {report}the runs "
                     f"table {config.output.runs_table}")
    if args.log_file:
        parts.append(f"details in {args.log_file}")
    if args.verbose:
        log.error("; ".join(parts), exc_info=exc)
    else:  # the whole trace in the log file only
        log.error("%s failed", args.command, exc_info=exc, extra={"file_only": True})
        log.error("; ".join(parts))
    return 1


def _maintain(args: argparse.Namespace, config: AppConfig) -> int:
    """OPTIMIZE and VACUUM; needs neither the stages' modules nor torch."""
    import image_embeddings
    from image_embeddings.core.spark import get_spark
    from image_embeddings.core.tables import ConcurrentWriteError
    from image_embeddings.ops.maintain import MaintenanceError, RetentionTooShortError, run_maintain, table_line

    log.info("image-embeddings %s (%s) maintain", image_embeddings.__version__, image_embeddings.__file__)
    spark = get_spark(config, stage="maintain", jvm_log=args.log_file)
    try:
        report = run_maintain(spark, config, allow_short_retention=args.allow_short_retention,
                              run_id=args.run_id, report_file=args.report, run_date=args.run_date)
    except RetentionTooShortError as exc:
        log.error("maintain refused: %s", exc)
        return 2
    except (MaintenanceError, ConcurrentWriteError) as exc:
        log.error("maintain failed: %s", exc)
        return 1
    for name, entry in report.metrics["tables"].items():
        print(table_line(name, entry))
    return 0


def _status(args: argparse.Namespace, config: AppConfig) -> int:
    """Read the tables; needs neither the stages' modules nor torch."""
    import json

    from image_embeddings.core.spark import get_spark
    from image_embeddings.ops.status import collect_status, status_lines

    spark = get_spark(config, stage="status", jvm_log=args.log_file)
    status = collect_status(spark, config, runs=args.runs)
    print(json.dumps(status, indent=2, sort_keys=True) if args.json else "\n".join(status_lines(status)))
    return 0


def _evaluate(spark: object, config: AppConfig, args: argparse.Namespace) -> int:
    import json

    from image_embeddings.ops.evaluate import evaluate, summary_lines

    result = evaluate(spark, config, sample=args.sample, seed=args.seed)  # type: ignore[arg-type]
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text if args.json else "\n".join(summary_lines(result)))
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(text + "\n")
        if not args.json:
            print(f"written to {args.report}")
    return 0


def _similar(spark: object, config: AppConfig, args: argparse.Namespace) -> int:
    import json

    from image_embeddings.core.uri import is_local, local_path
    from image_embeddings.search.similar import search

    image = None
    if args.image is not None:
        if is_local(args.image):
            image = local_path(args.image).read_bytes()
        else:
            row = spark.read.format("binaryFile").load(args.image).select("content").first()  # type: ignore[attr-defined]
            image = bytes(row[0]) if row is not None else b""
    result = search(spark, config, k=args.k, image_id=args.image_id, image=image,  # type: ignore[arg-type]
                    use_index=not args.exact)
    how = f"searched {'with the ' if result.path == 'index' else 'exactly: '}{result.detail}"
    found = result.neighbours
    if args.json:
        print(json.dumps([{"image_id": n.image_id, "score": round(n.score, 6)} for n in found], indent=2))
        print(how, file=sys.stderr)
    else:
        print(f"{'rank':>4}  {'score':>8}  image_id")
        for rank, n in enumerate(found, 1):
            print(f"{rank:>4}  {n.score:8.4f}  {n.image_id}")
        print(how)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _nightly_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="image-embeddings-nightly", description=nightly_main.__doc__)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--config", required=True)
    parser.add_argument("--run-date", default="", help="the day to process; empty: the day before --night")
    parser.add_argument("--night", default="", help="the date the run was scheduled for (UTC); empty: today")
    parser.add_argument("--trailing-days", default=str(TRAILING_DAYS), help="ingest: earlier days to read again")
    parser.add_argument("--marker", default=MARKER, help="ingest: the file that marks a day's upload complete")
    return parser


def nightly_main(argv: Sequence[str] | None = None) -> int:
    """One stage of the nightly Databricks job (the ``image-embeddings-nightly`` entry point).

    Computes the run date as the Airflow DAG does, then runs ``image-embeddings STAGE``. Ingest first requires the
    day's completion marker (exit 1 without it: the task's retries try again), then reads the day and each of the
    previous ``--trailing-days`` days whose upload is complete; the exit code is the worst of those runs.
    """
    from image_embeddings import cli
    from image_embeddings.core.config import ConfigError, load_config

    args = _nightly_parser().parse_args(argv)
    run_date = args.run_date or run_date_for(args.night or dt.datetime.now(dt.timezone.utc).date().isoformat())
    if args.stage != "ingest":
        return cli.main([args.stage, "--config", args.config, "--run-date", run_date])
    try:
        folder = load_config(args.config, run_date=run_date).input.images
    except ConfigError as exc:  # one line, as the command itself says it
        print(f"invalid configuration: {exc}", file=sys.stderr)
        return 2

    def complete(day: str) -> bool:
        config = load_config(args.config, run_date=day)
        return marker_exists(config.input.images, args.marker, config.s3.endpoint, config.s3.region)

    if not complete(run_date):
        print(f"ingest refused: the upload of {run_date} is not complete (no {args.marker} in {folder})",
              file=sys.stderr)
        return 1
    codes = [cli.main(["ingest", "--config", args.config, "--run-date", day])
             for day in ingest_dates(run_date, int(args.trailing_days), complete)]
    return max(codes)
