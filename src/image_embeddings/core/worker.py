"""Set-up of the Spark Python worker processes that run this package's UDFs (either stage's)."""

from __future__ import annotations

import ctypes
import logging
import sys
import zipimport

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters

_prepared = False


def prepare_worker() -> None:
    """Set up this Python worker once: zip archives are not re-read at each task, malloc keeps freed memory.

    Spark's worker calls ``importlib.invalidate_caches()`` at the start of every task. Before Python 3.13,
    ``zipimporter.invalidate_caches`` re-reads the archive's whole directory, and once per package inside it
    (``pyspark.zip`` holds dozens), a cost of the order of decoding the task's images.
    Python 3.13 made it lazy. The archives on a worker's path (``pyspark.zip``, py4j, ``--py-files``) do not
    change while the worker lives, so a re-read finds nothing new; after this call the worker's zip importers keep
    the directories they read. Also sets malloc's thresholds (:func:`keep_freed_memory`). Called by each UDF of
    the package; later tasks in the same worker benefit.
    """
    global _prepared
    if _prepared:
        return
    _prepared = True
    if (3, 10) <= sys.version_info < (3, 13):
        zipimport.zipimporter.invalidate_caches = _keep_directory  # type: ignore[method-assign]
    keep_freed_memory()


def keep_freed_memory(mmap_below: int = 32 << 20, keep: int = 128 << 20) -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of returning it to the kernel; True if set.

    A forward pass frees its activations (tens of MB) and the next one allocates them again. glibc decides by
    heuristics whether such blocks come from fresh pages (``mmap``, or heap growth that it trims again after the
    pass) or from memory it kept: with the model loaded in stage 1's warm-up thread, every ResNet50 batch touched
    fresh pages, about 1,200 page faults per image, and ran 4 to 8% slower than with the model loaded in the main
    thread. Fixed thresholds (blocks under 32 MB from the heap, up to 128 MB of free heap kept) take the heuristics
    out: no page faults per batch wherever the model was loaded. A no-op outside glibc (macOS, musl's stub).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_below)) and bool(mallopt(_M_TRIM_THRESHOLD, keep))


def _keep_directory(self: zipimport.zipimporter) -> None:
    """``zipimporter.invalidate_caches`` for archives that do not change: keep the directory already read."""
