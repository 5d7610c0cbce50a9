"""Vector arithmetic every layer shares."""

from __future__ import annotations

from typing import Any

import numpy as np

_TINY = 1e-12  # a zero vector stays zero instead of dividing by zero


def unit_rows(vectors: Any) -> np.ndarray:
    """Rows scaled to length 1 (float32, C order; one vector becomes one row): inner product is then cosine."""
    matrix = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    return np.ascontiguousarray(matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), _TINY))
