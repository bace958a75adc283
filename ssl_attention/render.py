"""Small, dependency-free rendering of maps to RGB/PNG (pipeline previews, dashboard PNG export).

Display normalisation lives here, not in the warehouse: each map is scaled to [0, 1] by its own maximum
(or by a shared maximum when asked) only when it is drawn.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

# Anchor colours of matplotlib's perceptually uniform maps (sampled at 0, 1/8, ..., 1).
_ANCHORS = {
    "viridis": ["#440154", "#46327e", "#365c8d", "#277f8e", "#1fa187", "#4ac16d", "#a0da39", "#d5e21a", "#fde725"],
    "magma": ["#000004", "#1c1044", "#4f127b", "#812581", "#b5367a", "#e55064", "#fb8761", "#fec287", "#fcfdbf"],
    "inferno": ["#000004", "#1f0c48", "#550f6d", "#88226a", "#ba3655", "#e35933", "#f98e09", "#f8c932", "#fcffa4"],
    "gray": ["#000000", "#ffffff"],
}
COLORMAPS = tuple(_ANCHORS)


def colormap_lut(name: str = "viridis", size: int = 256) -> np.ndarray:
    """(size, 3) uint8 lookup table, linearly interpolated between the anchor colours."""
    if name not in _ANCHORS:
        raise ValueError(f"unknown colormap {name!r}; valid: {', '.join(COLORMAPS)}")
    anchors = np.array([[int(h[i : i + 2], 16) for i in (1, 3, 5)] for h in _ANCHORS[name]], dtype=np.float64)
    positions = np.linspace(0, 1, len(anchors))
    grid = np.linspace(0, 1, size)
    lut = np.stack([np.interp(grid, positions, anchors[:, c]) for c in range(3)], axis=1)
    return lut.round().astype(np.uint8)


def colorize(values: np.ndarray, vmax: float | None = None, cmap: str = "viridis") -> np.ndarray:
    """(h, w) map -> (h, w, 3) uint8, scaled to [0, vmax] (vmax defaults to the map's own maximum)."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float64))
    top = float(values.max()) if vmax is None else float(vmax)
    scaled = values / top if top > 0 else np.zeros_like(values)
    lut = colormap_lut(cmap)
    return lut[(np.clip(scaled, 0, 1) * (len(lut) - 1)).round().astype(np.int64)]


def overlay(
    image: np.ndarray, values: np.ndarray, alpha: float = 0.6, vmax: float | None = None, cmap: str = "viridis"
) -> np.ndarray:
    """Blend a map (upsampled with nearest-neighbour cells) over an (H, W, 3) image."""
    height, width = image.shape[:2]
    heat = Image.fromarray(colorize(values, vmax, cmap)).resize((width, height), Image.Resampling.NEAREST)
    blended = (1 - alpha) * image.astype(np.float64) + alpha * np.asarray(heat, dtype=np.float64)
    return blended.round().astype(np.uint8)


def head_grid_png(
    maps: Sequence[np.ndarray],
    labels: Sequence[str],
    cell: int = 96,
    columns: int = 7,
    cmap: str = "viridis",
    image: np.ndarray | None = None,
) -> bytes:
    """Small multiples of maps with captions (fused first, by convention of the caller), as PNG bytes."""
    if not maps:
        raise ValueError("no maps to draw")
    columns = max(1, min(columns, len(maps)))
    rows = (len(maps) + columns - 1) // columns
    caption = 14
    canvas = Image.new("RGB", (columns * cell, rows * (cell + caption)), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (values, label) in enumerate(zip(maps, labels, strict=True)):
        if image is not None:
            tile = Image.fromarray(overlay(image, values, cmap=cmap)).resize((cell, cell), Image.Resampling.BILINEAR)
        else:
            tile = Image.fromarray(colorize(values, cmap=cmap)).resize((cell, cell), Image.Resampling.NEAREST)
        x, y = (index % columns) * cell, (index // columns) * (cell + caption)
        canvas.paste(tile, (x, y + caption))
        draw.text((x + 2, y + 1), label, fill="black")
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
