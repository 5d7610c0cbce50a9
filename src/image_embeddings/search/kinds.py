"""Choosing the index type for a table's size, making faiss indexes, and their file forms."""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from image_embeddings.core.config import IndexConfig
from image_embeddings.search.store import VectorIndexError

if TYPE_CHECKING:

    pass

log = logging.getLogger(__name__)
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which of its builds loads is no news


def vector_ids(image_ids: Sequence[str]) -> np.ndarray:
    """Stable 63-bit ids of image_ids (faiss wants int64): the first 8 bytes of BLAKE2b, shifted right by one."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "big") >> 1 for i in image_ids),
        dtype=np.int64, count=len(image_ids))


def choose_type(rows: int, settings: IndexConfig) -> str:
    """``index.type``, or by size when ``auto``: exact below ``exact_below`` rows, IVF-SQ8 up to ``pq_above``,
    IVF-PQ beyond (32 bytes of codes per 256 dimensions)."""
    if settings.type != "auto":
        return settings.type
    if rows < settings.exact_below:
        return "flat"
    return "ivf_sq8" if rows <= settings.pq_above else "ivf_pq"


def list_count(kind: str, rows: int) -> int:
    """Inverted lists for ``rows`` vectors: one for the exact index, else a power of two near sqrt(rows)."""
    if kind == "flat":
        return 1
    return int(min(65536, max(16, 2 ** round(np.log2(max(rows, 1) ** 0.5)))))


def faiss_module() -> Any:
    """faiss, or an error naming the install that brings it."""
    try:
        import faiss
    except ImportError as exc:
        raise VectorIndexError("the index needs faiss: pip install 'spark-image-embeddings[embed]' (faiss-cpu) "
                               f"where stage 2 runs ({exc})") from None
    return faiss


def new_index(kind: str, dim: int, nlist: int) -> Any:
    """An untrained inner-product index; ``flat`` is an IVF of one list (exact, with the same add and remove)."""
    faiss = faiss_module()

    quantizer = faiss.IndexFlatIP(dim)
    if kind in ("flat", "ivf_flat"):
        return faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    if kind == "ivf_sq8":
        return faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                             faiss.METRIC_INNER_PRODUCT)
    if kind == "ivf_pq":
        sub = next(m for m in (dim // 8, dim // 4, dim // 2, dim) if m and dim % m == 0 and m <= 512)
        return faiss.IndexIVFPQ(quantizer, dim, nlist, sub, 8, faiss.METRIC_INNER_PRODUCT)
    raise VectorIndexError(f"unknown index type {kind!r}")


def _serialize(index: Any) -> bytes:
    return bytes(faiss_module().serialize_index(index))


def _deserialize(data: bytes) -> Any:
    return faiss_module().deserialize_index(np.frombuffer(data, dtype=np.uint8))


def _parquet(table: Any) -> bytes:
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _ids_table(ids: np.ndarray, image_ids: Sequence[str], sha256: Sequence[str | None], kind: str) -> Any:
    import pyarrow as pa

    return pa.table({"id": pa.array(ids, pa.int64()), "image_id": pa.array(list(image_ids), pa.string()),
                     "sha256": pa.array(list(sha256), pa.string()), "kind": pa.array([kind] * len(ids), pa.string())})
