"""Set-up of the Spark Python worker processes that run this package's UDFs."""

from __future__ import annotations

import sys
import zipimport

_prepared = False


def prepare_worker() -> None:
    """Stop Python 3.10 to 3.12 from re-reading every zip archive on the path at each Spark task; idempotent.

    Spark's worker calls ``importlib.invalidate_caches()`` at the start of every task. Before Python 3.13,
    ``zipimporter.invalidate_caches`` re-reads the archive's whole directory, and once per package inside it
    (``pyspark.zip`` holds dozens): 80 to 100 ms of CPU per task here, as long as decoding the task's images took.
    Python 3.13 made it lazy. The archives on a worker's path (``pyspark.zip``, py4j, ``--py-files``) do not
    change while the worker lives, so a re-read finds nothing new; after this call the worker's zip importers keep
    the directories they read. Called by each UDF of the package; later tasks in the same worker benefit.
    """
    global _prepared
    if _prepared:
        return
    _prepared = True
    if (3, 10) <= sys.version_info < (3, 13):
        zipimport.zipimporter.invalidate_caches = _keep_directory  # type: ignore[method-assign]


def _keep_directory(self: zipimport.zipimporter) -> None:
    """``zipimporter.invalidate_caches`` for archives that do not change: keep the directory already read."""
