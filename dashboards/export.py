"""Downloads: the current view as PNG (drawn server-side with ``ssl_attention.render``, in the palettes the
screen uses), the maps behind it as CSV or Parquet (one row per patch cell, long format).

``png_view``, ``csv_maps`` and ``parquet_maps`` build a ``Download`` from the session's selection;
``safely`` turns a failed read into a text file saying why (and the same message on screen).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from dashboards.session import Session, plain
from dashboards.views import display_range, scale_tiles, shown_values
from ssl_attention.render import colorbar_image, colorize, overlay

MARGIN_PX = 8  # around and between the parts of the PNG
TITLE_PX = 24  # the title line above the overlays
PANEL_PX = 320  # side of each overlay in the PNG
CAPTION_PX = 18
GRID_CELL_PX = 96  # width of a head grid tile in the PNG
GRID_CAPTION_PX = 14
GRID_COLUMNS = 13


@dataclass(frozen=True)
class ViewMaps:
    """What the heads view shows: the fused map and every head of one (image, model, method, layer)."""

    image_id: str
    file_name: str
    model: str
    method: str
    layer: int
    layer_name: str | None
    heads: tuple[int | None, ...]  # (None, 0, ..., H-1), fused first
    maps: np.ndarray  # (len(heads), grid_h, grid_w)
    weights_mode: str


def cells_table(view: ViewMaps) -> pa.Table:
    """One row per (head, row, col) cell; ``head`` is null for the fused map."""
    count, grid_h, grid_w = view.maps.shape
    cells = grid_h * grid_w
    rows, cols = np.divmod(np.arange(cells), grid_w)
    head_values = [h for h in view.heads for _ in range(cells)]
    n = count * cells
    return pa.table(
        {
            "image_id": pa.array([view.image_id] * n, pa.string()),
            "file_name": pa.array([view.file_name] * n, pa.string()),
            "model": pa.array([view.model] * n, pa.string()),
            "method": pa.array([view.method] * n, pa.string()),
            "layer": pa.array(np.full(n, view.layer, dtype=np.int16)),
            "layer_name": pa.array([view.layer_name] * n, pa.string()),
            "head": pa.array(head_values, pa.int16()),
            "row": pa.array(np.tile(rows, count).astype(np.int16)),
            "col": pa.array(np.tile(cols, count).astype(np.int16)),
            "value": pa.array(view.maps.reshape(-1).astype(np.float32)),
            "weights_mode": pa.array([view.weights_mode] * n, pa.string()),
        }
    )


TABLE_FORMATS = ("csv", "parquet")


def table_bytes(table: pa.Table, fmt: str) -> io.BytesIO:
    """``table`` as a CSV or Parquet file."""
    if fmt not in TABLE_FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; valid: {', '.join(TABLE_FORMATS)}")
    buffer = io.BytesIO()
    if fmt == "csv":
        pacsv.write_csv(table, buffer)
    else:
        pq.write_table(table, buffer)
    buffer.seek(0)
    return buffer


def csv_bytes(view: ViewMaps) -> io.BytesIO:
    return table_bytes(cells_table(view), "csv")


def parquet_bytes(view: ViewMaps) -> io.BytesIO:
    return table_bytes(cells_table(view), "parquet")


def _panel(
    rgb: np.ndarray, values: np.ndarray, alpha: float, scale: tuple[float, float], cmap: str, caption: str
) -> Image.Image:
    """The map over the input (longer side ``PANEL_PX``, the input's aspect) with its caption and colour bar
    (``scale`` = the screen's (low, high))."""
    low, high = scale
    tile = Image.fromarray(overlay(rgb, values, alpha=alpha, vmax=high, cmap=cmap, vmin=low))
    aspect = rgb.shape[0] / rgb.shape[1]
    size = (PANEL_PX, round(PANEL_PX * aspect)) if aspect <= 1 else (round(PANEL_PX / aspect), PANEL_PX)
    tile = tile.resize(size, Image.Resampling.BILINEAR)
    bar = colorbar_image(low, high, cmap, tile.height)
    framed = Image.new("RGB", (tile.width + MARGIN_PX + bar.width, tile.height + CAPTION_PX), "white")
    framed.paste(tile, (0, CAPTION_PX))
    framed.paste(bar, (tile.width + MARGIN_PX, CAPTION_PX))
    ImageDraw.Draw(framed).text((4, 3), caption, fill="black")
    return framed


def grid_tiles(maps: np.ndarray, shared: bool, cmap: str, mode: str = "zero") -> list[np.ndarray]:
    """The head grid's tiles as the screen draws them (dashboards/figures.py ``TileStrip``): each map scaled to
    [0, 1] as the colour scale says (``views.scale_tiles``), coloured with ``cmap``, opaque, no image; cells
    the mode hides (NaN) are white."""
    tiles = []
    for tile in scale_tiles(list(maps), shared, mode):
        coloured = colorize(tile, 1.0, cmap)
        coloured[~np.isfinite(tile)] = 255
        tiles.append(coloured)
    return tiles


def _grid(tiles: list[np.ndarray], labels: list[str], columns: int = GRID_COLUMNS) -> Image.Image:
    """Captioned tiles in rows of ``columns``, each GRID_CELL_PX wide (nearest cells: as on screen)."""
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    cell_h = round(GRID_CELL_PX * tiles[0].shape[0] / tiles[0].shape[1])
    canvas = Image.new("RGB", (columns * GRID_CELL_PX, rows * (cell_h + GRID_CAPTION_PX)), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (tile, label) in enumerate(zip(tiles, labels, strict=True)):
        x, y = (index % columns) * GRID_CELL_PX, (index // columns) * (cell_h + GRID_CAPTION_PX)
        scaled = Image.fromarray(tile).resize((GRID_CELL_PX, cell_h), Image.Resampling.NEAREST)
        canvas.paste(scaled, (x, y + GRID_CAPTION_PX))
        draw.text((x + 2, y + 1), label, fill="black")
    return canvas


def view_png(
    view: ViewMaps,
    rgb: np.ndarray,
    selected: int | None,
    alpha: float,
    cmap: str,
    scales: tuple[tuple[float, float], tuple[float, float]],
    title: str,
    captions: tuple[str, str],
    shared: bool = True,
    mode: str = "zero",
) -> io.BytesIO:
    """Fused and selected head over the input image, side by side, above the head grid, with a title;
    ``captions`` name the two maps. The overlays use ``alpha`` and the (low, high) ``scales`` of the screen
    (with colour bars), the grid is scaled as the screen's (``shared`` or independent, colour scale ``mode``)
    and wraps to the panels' width. A method without heads has one map: no head panel, no grid."""
    index = view.heads.index(selected) if selected in view.heads else 0
    panels = [_panel(rgb, shown_values(view.maps[0], mode), alpha, scales[0], cmap, captions[0])]
    if selected is not None and index:
        panels.append(_panel(rgb, shown_values(view.maps[index], mode), alpha, scales[1], cmap, captions[1]))
    grid = Image.new("RGB", (0, 0))
    if len(view.heads) > 1:
        labels = ["fused" if h is None else f"h{h}" for h in view.heads]
        panels_width = sum(p.width for p in panels) + MARGIN_PX * (len(panels) - 1)
        columns = max(4, panels_width // GRID_CELL_PX)  # the grid as wide as the panels: no empty half
        grid = _grid(grid_tiles(view.maps, shared, cmap, mode), labels, columns)
    gap = MARGIN_PX
    width = max(sum(p.width for p in panels) + gap * (len(panels) - 1), grid.width) + 2 * gap
    height = TITLE_PX + max(p.height for p in panels) + gap + (grid.height + gap if grid.height else 0)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 6), title, fill="black")
    x = gap
    for panel in panels:
        canvas.paste(panel, (x, TITLE_PX))
        x += panel.width + gap
    if grid.height:
        canvas.paste(grid, (gap, TITLE_PX + max(p.height for p in panels) + gap))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    buffer.seek(0)
    return buffer


def file_stem(view: ViewMaps, selected: int | None) -> str:
    stem = view.file_name.rsplit("/", 1)[-1].rsplit(".", 1)[0] or view.image_id[:12]
    head = "fused" if selected is None else f"head{selected}"
    return f"{stem}_{view.model}_{view.method}_layer{view.layer}_{head}"


# --- downloads of the session's view ---------------------------------------------------------------------


@dataclass(frozen=True)
class Download:
    filename: str
    data: io.BytesIO


def view_maps(session: Session) -> ViewMaps:
    """The fused map and every head of the selected (image, model, method, layer)."""
    grid = session.head_grid()
    s = session.selection
    return ViewMaps(
        s.image,
        session.file_name(s.image),
        s.model,
        s.method,
        s.layer,
        grid.layer_name,
        grid.heads,
        grid.maps,
        grid.provenance.mode,
    )


def png_view(session: Session) -> Download:
    """The heads tab as the screen shows it: its opacity, colormap and colour scale."""
    view = view_maps(session)
    s = session.selection
    shared, mode = session.scale == "shared", session.contrast
    head = view.maps[view.heads.index(s.head)] if s.head in view.heads else view.maps[0]
    scales = (display_range(view.maps, view.maps[0], shared, mode), display_range(view.maps, head, shared, mode))
    title = f"{view.file_name} · {s.model}/{s.method} · {session.layer_label()} · {view.weights_mode} weights"
    captions = (session.map_title(None), session.map_title(s.head))
    rgb = session.rgb(s.image, s.model)
    png = view_png(view, rgb, s.head, session.opacity, session.cmap, scales, title, captions, shared, mode)
    return Download(file_stem(view, s.head) + ".png", png)


def csv_maps(session: Session) -> Download:
    view = view_maps(session)
    return Download(file_stem(view, None).removesuffix("_fused") + "_maps.csv", csv_bytes(view))


def parquet_maps(session: Session) -> Download:
    view = view_maps(session)
    return Download(file_stem(view, None).removesuffix("_fused") + "_maps.parquet", parquet_bytes(view))


FAILED_NAME = "export_failed.txt"


def safely(session: Session, build: Callable[[Session], Download], what: str) -> Download:
    """``build(session)``, or (when the maps cannot be read) a text file saying why, with the same message on
    screen (``session.problem``); ``what`` names the export in the message ("the view as PNG")."""
    try:
        return build(session)
    except Exception as exc:
        session.problem = session.failure(f"export {what}", exc)
        return Download(FAILED_NAME, io.BytesIO((plain(session.problem) + "\n").encode()))
