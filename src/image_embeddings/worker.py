"""The Spark Python worker processes that run this package's UDFs: their set-up, and one embedder per process."""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import sys
import threading
import zipimport

from image_embeddings.embedder import Embedder, EmbedderSettings, pick_device

log = logging.getLogger(__name__)

_prepared = False


def prepare_worker() -> None:
    """Set up this Python worker once: zip archives are not re-read at each task, malloc keeps freed memory.

    Spark's worker calls ``importlib.invalidate_caches()`` at the start of every task. Before Python 3.13,
    ``zipimporter.invalidate_caches`` re-reads the archive's whole directory, and once per package inside it
    (``pyspark.zip`` holds dozens): 80 to 100 ms of CPU per task here, as long as decoding the task's images took.
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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


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


# ---------------------------------------------------------------------------------------------------------
# one model per Python worker process

_LOCK = threading.Lock()
_EMBEDDERS: dict[EmbedderSettings, Embedder] = {}
_LOADS: dict[EmbedderSettings, int] = {}


def cached_embedder(settings: EmbedderSettings) -> Embedder:
    """Return this process's embedder for ``settings``, loading the model only the first time."""
    with _LOCK:
        embedder = _EMBEDDERS.get(settings)
        if embedder is None:
            embedder = Embedder(settings)
            _EMBEDDERS[settings] = embedder
            _LOADS[settings] = _LOADS.get(settings, 0) + 1
            # A reused Spark Python worker runs a full gc.collect() after every task; with torch and the model
            # loaded (hundreds of thousands of objects) each took about 0.1 s of CPU, about 3 s for a run of 600
            # photos on local[2]. Frozen, the objects that exist now are skipped by every later collection.
            gc.freeze()
            log.info("loaded %s (%s, %s, %s) in process %d", settings.model, embedder.weights.checksum[:19],
                     embedder.device, embedder.precision, os.getpid())
        return embedder


_WARMING: set[EmbedderSettings] = set()
_WARMING_LOCK = threading.Lock()


def warm_up_in_background(settings: EmbedderSettings) -> bool:
    """Start loading this process's embedder for ``settings`` in a daemon thread, once; True if started now.

    For a Python worker of stage 1 that stage 2 will reuse (``run``): torch's import and the model load then
    overlap stage 1's remaining work instead of delaying stage 2's first batch. Only on CPU: on a GPU machine
    stage 1's many workers would each open a CUDA context, so the thread stops after importing torch. A load
    that fails here is logged and left to stage 2, which loads again and reports the error.
    """
    with _WARMING_LOCK:
        if settings in _WARMING or settings in _EMBEDDERS:
            return False
        _WARMING.add(settings)

    def load() -> None:
        try:
            if pick_device(settings.device) == "cpu":
                cached_embedder(settings)
        except Exception as exc:
            log.warning("warming up %s in process %d failed (stage 2 will load it again): %s", settings.model,
                        os.getpid(), exc)
        finally:  # loaded (then in _EMBEDDERS), failed or skipped: no longer loading
            with _WARMING_LOCK:
                _WARMING.discard(settings)

    threading.Thread(target=load, name="embedder-warm-up", daemon=True).start()
    return True


def is_loaded_or_loading(settings: EmbedderSettings) -> bool:
    """True when this process has the embedder for ``settings`` or is loading it in the background."""
    return settings in _EMBEDDERS or settings in _WARMING


def load_count(settings: EmbedderSettings) -> int:
    """How many times this process has loaded the model for ``settings`` (1 once loaded: it is kept)."""
    return _LOADS.get(settings, 0)
