"""The Spark Python worker processes that run this package's UDFs: their set-up, and one embedder per process."""

from __future__ import annotations

import gc
import logging
import os
import threading

from image_embeddings.embed.embedder import Embedder, EmbedderSettings, pick_device

log = logging.getLogger(__name__)





# glibc's mallopt parameters (malloc.h)






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
            # A reused Spark Python worker runs a full gc.collect() after every task, which walks every object of
            # torch and the model; frozen, the objects that exist now are skipped by every later collection.
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
