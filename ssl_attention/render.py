"""Small rendering of maps to RGB/PNG (pipeline previews, the dashboard's PNG export and compare cards).

Display normalisation lives here, not in the warehouse: each map is scaled to [0, 1] by its own maximum
(or by a shared maximum when asked) only when it is drawn.

Colours: ``bokeh.palettes`` is the one source. The dashboard's plots (Bokeh colour mappers, HoloViews tabs)
are given the same 256-entry palettes (``palette``), and ``colorize`` bins values into them exactly as
Bokeh's ``LinearColorMapper`` does, so a value has the same colour on screen and in an exported PNG.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from bokeh import palettes
from PIL import Image, ImageDraw

# name -> 256 "#rrggbb" colours, low values first
PALETTES: dict[str, tuple[str, ...]] = {
    "viridis": tuple(palettes.Viridis256),
    "magma": tuple(palettes.Magma256),
    "inferno": tuple(palettes.Inferno256),
    "cividis": tuple(palettes.Cividis256),
    "gray": tuple(palettes.Greys256),  # black to white
}
COLORMAPS = tuple(PALETTES)


def palette(name: str = "viridis") -> list[str]:
    """The 256 hex colours of a colormap, as the screen's colour mappers are given them."""
    colours = PALETTES.get(name)
    if colours is None:
        raise ValueError(f"unknown colormap {name!r}; valid: {', '.join(COLORMAPS)}")
    return list(colours)


def colormap_lut(name: str = "viridis") -> np.ndarray:
    """(256, 3) uint8: the palette's colours as RGB."""
    return np.array([[int(h[i : i + 2], 16) for i in (1, 3, 5)] for h in palette(name)], dtype=np.uint8)


def palette_index(values: np.ndarray, low: float, high: float, size: int = 256) -> np.ndarray:
    """Palette entry of each value, as Bokeh's ``LinearColorMapper`` picks it (float64, like JavaScript):
    ``floor(((v - low) / (high - low)) / (1 / size))``, clipped to [0, size - 1]; ``v == high`` is the last."""
    values = np.asarray(values, dtype=np.float64)
    normed = (values - low) * (1.0 / (high - low))
    index = np.floor(normed / (1.0 / size))
    index = np.where(values == high, size - 1, index)
    return np.clip(np.nan_to_num(index, nan=0.0), 0, size - 1).astype(np.int64)


def colorize(values: np.ndarray, vmax: float | None = None, cmap: str = "viridis", vmin: float = 0.0) -> np.ndarray:
    """(h, w) map -> (h, w, 3) uint8, coloured over [vmin, vmax] (vmax defaults to the map's own maximum);
    non-finite values take the lowest colour."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=vmin, posinf=vmin, neginf=vmin)
    top = float(values.max()) if vmax is None else float(vmax)
    lut = colormap_lut(cmap)
    if not top > vmin:
        return lut[np.zeros(values.shape, dtype=np.int64)]
    return lut[palette_index(values, vmin, top, len(lut))]


def _upsample(cells: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour upsampling of an (h, w, ...) array to (height, width, ...), as PIL's NEAREST."""
    rows = np.minimum(((np.arange(height) + 0.5) * cells.shape[0] / height).astype(np.int64), cells.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * cells.shape[1] / width).astype(np.int64), cells.shape[1] - 1)
    return cells[np.ix_(rows, cols)]


def overlay(
    image: np.ndarray,
    values: np.ndarray,
    alpha: float = 0.6,
    vmax: float | None = None,
    cmap: str = "viridis",
    vmin: float = 0.0,
) -> np.ndarray:
    """Blend a map (upsampled with nearest-neighbour cells) over an (H, W, 3) image; NaN cells leave the image
    as it is (a masked map, as the screen draws it)."""
    height, width = image.shape[:2]
    heat = Image.fromarray(colorize(values, vmax, cmap, vmin)).resize((width, height), Image.Resampling.NEAREST)
    weight = np.where(_upsample(np.isfinite(np.asarray(values, dtype=np.float64)), height, width), alpha, 0.0)
    weight = weight[..., None]
    blended = (1 - weight) * image.astype(np.float64) + weight * np.asarray(heat, dtype=np.float64)
    return blended.round().astype(np.uint8)


def tick_label(value: float) -> str:
    """A colour-bar label as a plain number: 0.0015, 12.5, 0 (never 1.500e-3)."""
    if value == 0:
        return "0"
    digits = max(0, 3 - int(np.floor(np.log10(abs(value)))))
    return f"{value:.{digits}f}".rstrip("0").rstrip(".")


def colorbar_image(low: float, high: float, cmap: str, height: int, ticks: int = 5) -> Image.Image:
    """A vertical colour bar (low at the bottom) with ``ticks`` plain-number labels, as an RGB image."""
    bar_w, label_w = 12, 56
    lut = colormap_lut(cmap)
    rows = np.linspace(len(lut) - 1, 0, height).round().astype(np.int64)  # top row = highest colour
    canvas = Image.new("RGB", (bar_w + 4 + label_w, height), "white")
    canvas.paste(Image.fromarray(np.repeat(lut[rows][:, None, :], bar_w, axis=1)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k in range(ticks):
        value = low + (high - low) * k / (ticks - 1)
        y = round((height - 1) * (1 - k / (ticks - 1)))
        draw.line([(bar_w, y), (bar_w + 3, y)], fill="black")
        draw.text((bar_w + 5, min(max(y - 5, 0), height - 11)), tick_label(value), fill="black")
    return canvas


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
