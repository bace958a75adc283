"""Reading a drawn outline back: which grid cells a set of boundary segments encloses, by ray casting (an
independent route from ``dashboards.views.mask_outline``, which writes them)."""

from __future__ import annotations

import numpy as np


def cells_enclosed(segments: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(rows, cols) bool: cells whose centre has an odd number of the vertical ``segments`` (x0, y0, x1, y1; cell
    units, row 0 at the top) to its left, crossing its row: the cells inside the outline."""
    rows, cols = shape
    segments = np.asarray(segments, dtype=np.float64).reshape(-1, 4)
    vertical = segments[np.isclose(segments[:, 0], segments[:, 2])]
    low = np.minimum(vertical[:, 1], vertical[:, 3])
    high = np.maximum(vertical[:, 1], vertical[:, 3])
    inside = np.zeros(shape, dtype=bool)
    for r in range(rows):
        for c in range(cols):
            x, y = c + 0.5, r + 0.5
            crossings = np.sum((vertical[:, 0] < x) & (low < y) & (y < high))
            inside[r, c] = crossings % 2 == 1
    return inside


def top_mass_cells(values: np.ndarray, fraction: float = 0.6) -> np.ndarray:
    """The fewest cells, hottest first (ties by position), whose values reach ``fraction`` of the total."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(-flat, kind="stable")
    needed = int(np.argmax(np.cumsum(flat[order]) >= fraction * flat.sum() - 1e-12)) + 1
    kept = np.zeros(flat.size, dtype=bool)
    kept[order[:needed]] = True
    return kept.reshape(np.shape(values))
