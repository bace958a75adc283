"""HoloViews views of the less frequently changed tabs (layers x heads overview, statistics heatmap), and the
display scaling shared with the per-click figures. Built from plain numpy arrays: no Panel, no queries here.

The overview is a single mosaic image (one glyph, one data source), never a figure per head. Each element has
its own key dimensions because ``pn.pane.HoloViews`` links the axes of all panes that share dimensions. Colours
are the 256-entry palettes of ``ssl_attention.render`` (bokeh.palettes), as on every tab and in the exports.
"""

from __future__ import annotations

from collections.abc import Sequence

import holoviews as hv
import numpy as np

from dashboards.figures import MARK_COLOR
from ssl_attention.render import palette


def _finite_max(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if finite.size else 0.0
    return top if top > 0 else 1.0


def display_max(layer_maps: np.ndarray, values: np.ndarray, shared: bool) -> float:
    """Top of the colour scale of ``values``: shared = the maximum over the fused map and every head of the
    layer (so that neither the fused map nor a head switch changes the scale), independent = its own."""
    return _finite_max(layer_maps if shared else values)


CLIP_PERCENTILES = (2.0, 98.0)  # the percentile clip's range
MASS_FRACTION = 0.6  # DINO's threshold: the smallest set of patches holding 60% of the map's mass
CONTRAST = ("zero", "min", "clip", "mass", "contour")  # the colour scale modes (dashboards.session.CONTRAST_MODES)


def display_range(layer_maps: np.ndarray, values: np.ndarray, shared: bool, mode: str) -> tuple[float, float]:
    """(low, high) of the colour scale of ``values``, over the layer's maps (shared) or its own (independent):

    - ``zero``: 0 → max (magnitudes comparable; near-uniform maps are one flat colour);
    - ``min``: min → max (the map's whole contrast);
    - ``clip``: the 2nd → 98th percentile (a few hot cells no longer flatten the rest);
    - ``mass``: 0 → max, drawn only where ``mass_mask`` holds (the top 60% of the mass);
    - ``contour``: 0 → max, the whole map, with the outline of ``mass_mask`` drawn over it (``mask_outline``).
    A degenerate range (constant map) widens to (low, low + 1) or (0, 1)."""
    if mode not in CONTRAST:
        raise ValueError(f"unknown colour scale mode {mode!r}; valid: {', '.join(CONTRAST)}")
    scope = np.asarray(layer_maps if shared else values, dtype=np.float64)
    finite = scope[np.isfinite(scope)]
    if not finite.size:
        return 0.0, 1.0
    if mode == "min":
        low, high = float(finite.min()), float(finite.max())
    elif mode == "clip":
        low, high = (float(v) for v in np.percentile(finite, CLIP_PERCENTILES))
    else:
        low, high = 0.0, _finite_max(finite)
    if not high > low:
        return (low, low + 1.0) if mode != "zero" else (0.0, 1.0)
    return low, high


def mass_mask(values: np.ndarray, fraction: float = MASS_FRACTION) -> np.ndarray:
    """The smallest set of cells whose values sum to ``fraction`` of the map's total (cells in decreasing
    order until the running sum reaches it; DINO's attention threshold). Bool, the map's shape; all False
    for a map without positive mass."""
    flat = np.nan_to_num(np.asarray(values, dtype=np.float64).ravel(), nan=0.0).clip(min=0.0)
    total = flat.sum()
    mask = np.zeros(flat.shape, dtype=bool)
    if total <= 0:
        return mask.reshape(np.shape(values))
    order = np.argsort(-flat, kind="stable")
    running = np.cumsum(flat[order])
    count = int(np.searchsorted(running, fraction * total - 1e-12 * total)) + 1  # first prefix reaching it
    mask[order[: min(count, flat.size)]] = True
    return mask.reshape(np.shape(values))


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """(S, 4) segments (x0, y0, x1, y1) in cell units (x: column edges, y: row edges, row 0 at the top) of the
    boundary of the cells in ``mask``: every cell edge between a cell of the mask and a cell outside it or the
    grid's border. Drawn, they enclose exactly the mask's cells (``contour`` mode draws ``mass_mask``'s)."""
    padded = np.pad(np.asarray(mask, dtype=bool), 1)
    inside = padded[1:-1, 1:-1]
    sides = (  # (neighbour outside, segment of the edge from the cell's row r and column c)
        (padded[:-2, 1:-1], lambda r, c: (c, r, c + 1, r)),  # top
        (padded[2:, 1:-1], lambda r, c: (c, r + 1, c + 1, r + 1)),  # bottom
        (padded[1:-1, :-2], lambda r, c: (c, r, c, r + 1)),  # left
        (padded[1:-1, 2:], lambda r, c: (c + 1, r, c + 1, r + 1)),  # right
    )
    segments = [np.stack(edge(*np.nonzero(inside & ~neighbour)), axis=1) for neighbour, edge in sides]
    return np.concatenate(segments).astype(np.float64).reshape(-1, 4)


def shown_values(values: np.ndarray, mode: str) -> np.ndarray:
    """The map as drawn: float32, NaN (transparent) outside the top-60% mass in ``mass`` mode."""
    shown = np.asarray(values, dtype=np.float32).copy()
    if mode == "mass":
        shown[~mass_mask(values)] = np.nan
    return shown


def scale_tiles(maps: Sequence[np.ndarray], shared: bool, mode: str = "zero") -> list[np.ndarray]:
    """Each map scaled to [0, 1] by ``display_range`` (over all maps when shared), clipped, NaN where
    ``shown_values`` hides it: the head grid's tiles, on screen and in the PNG."""
    stack = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in maps])
    tiles = []
    for values in maps:
        low, high = display_range(stack, np.asarray(values), shared, mode)
        scaled = np.clip((shown_values(values, mode) - low) / (high - low), 0.0, 1.0)
        tiles.append(scaled.astype(np.float32))
    return tiles


# --- mosaics -----------------------------------------------------------------------------------------------


def resample(values: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Nearest-cell resampling of a (h, w) map to (rows, cols) (Grad-CAM stages have different grids)."""
    h, w = values.shape
    if (h, w) == (rows, cols):
        return values
    r = np.minimum((np.arange(rows) * h) // rows, h - 1)
    c = np.minimum((np.arange(cols) * w) // cols, w - 1)
    return values[np.ix_(r, c)]


def normalise_tiles(maps: Sequence[np.ndarray], shared: bool) -> list[np.ndarray]:
    """Each map scaled to [0, 1]: by its own maximum (independent) or by the maximum of all (shared)."""
    top = _finite_max(np.concatenate([m.ravel() for m in maps])) if shared else None
    return [np.asarray(m, dtype=np.float32) / (top if shared else _finite_max(m)) for m in maps]  # type: ignore[operator]


def column_labels(heads: Sequence[int | None], method_label: str) -> list[str]:
    """Column captions of a layers x heads view: "fused", "0", "1", ...; a method without heads has one column,
    named after the method ("Attention rollout"), since "fused" would mean nothing there."""
    if len(heads) == 1:
        return [method_label]
    return ["fused" if h is None else str(h) for h in heads]


def overview_image(
    per_layer: Sequence[np.ndarray],
    heads: Sequence[int | None],
    layer_labels: Sequence[str],
    cmap: str,
    shared: bool,
    method_label: str = "fused",
    mode: str = "zero",
) -> hv.Image:
    """Layers (rows, first layer on top) x (fused + heads) (columns) of one image, one mosaic image.

    ``per_layer[i]``: (len(heads), h_i, w_i); tiles are resampled to the largest grid. Row i spans
    y in [L-1-i, L-i), column k spans x in [k, k+1).
    """
    rows, cols = len(per_layer), len(heads)
    tile_h = max(m.shape[1] for m in per_layer)
    tile_w = max(m.shape[2] for m in per_layer)
    scaled = scale_tiles([m for layer in per_layer for m in layer], shared, mode)  # as the head grid's tiles
    tiles = [resample(t, tile_h, tile_w) for t in scaled]
    grid_rows = [np.concatenate(tiles[r * cols : (r + 1) * cols], axis=1) for r in range(rows)]
    mosaic = np.concatenate(grid_rows, axis=0)  # (rows * tile_h, cols * tile_w), first layer at the top
    aspect = tile_h / tile_w  # a tile keeps its grid's shape: a 28 x 42 grid is a wide tile, rows in order
    cell = max(24, min(72, 560 // max(cols, 1), round(640 / max(rows, 1) / aspect)))  # fits from 1024 px up
    return hv.Image(
        mosaic, bounds=(0, 0, cols, rows), kdims=["ox", "oy"], vdims=[hv.Dimension("scaled", range=(0, 1))]
    ).opts(
        cmap=palette(cmap),
        clim=(0, 1),
        tools=["tap"],
        default_tools=[],
        toolbar=None,
        xticks=[(k + 0.5, label) for k, label in enumerate(column_labels(heads, method_label))],
        yticks=[(rows - 1 - i + 0.5, label) for i, label in enumerate(layer_labels)],
        xlabel="head" if cols > 1 else "",
        ylabel="layer",
        width=cell * cols + 120,
        height=round(cell * aspect * rows) + 50,
        framewise=True,
    )


def overview_marks(rows: int, selected: tuple[int, int]) -> hv.Bounds:
    """Outline of the selected (row, column) of ``overview_image``."""
    row, col = selected
    return hv.Bounds((col, rows - 1 - row, col + 1, rows - row)).opts(color=MARK_COLOR, line_width=3)


# --- statistics --------------------------------------------------------------------------------------------


def stat_heatmap_element(
    values: np.ndarray,
    layer_labels: Sequence[str],
    heads: Sequence[int | None],
    stat: str,
    cmap: str,
    title: str,
    method_label: str = "fused",
) -> hv.HeatMap:
    """A statistic over layers (rows, first on top) x (fused + heads), hover shows the value."""
    head_names = column_labels(heads, method_label)
    records = [
        (head_names[k], layer_labels[i], float(values[i, k]))
        for i in range(values.shape[0])
        for k in range(values.shape[1])
    ]
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    heat = hv.HeatMap(records, kdims=["head", "layer"], vdims=[hv.Dimension(stat, range=(low, high))], label=title)
    cell = max(22, min(40, 480 // max(len(heads), 1)))  # fits beside the controls from 1024 px
    return heat.opts(
        cmap=palette(cmap),
        colorbar=True,
        tools=["hover"],
        toolbar=None,
        default_tools=[],
        invert_yaxis=True,
        width=max(cell * len(heads) + 200, 480),  # room for the title
        height=cell * len(layer_labels) + 80,
        framewise=True,
        title="{label}",
        clipping_colors={"NaN": "#eeeeee"},
    )
