"""The hot path of the dashboard, drawn with Bokeh models that are updated in place.

The two linked overlays (fused map and selected head over the input image), the head grid and the image
picker change on every click. HoloViews re-walks the whole Bokeh document on each plot update (about 20 ms
per walk here) and rebuilds its elements (another 30-40 ms per plot), which made a head switch cost ~90 ms of
server time and missed the latency goal with five clients. Here a switch only assigns a few small arrays and
numbers to existing models: a figure never changes its structure after it is built.

Each class keeps what it last drew and ``render`` assigns only what changed. Maps arrive as numpy arrays with
row 0 at the top; Bokeh's images grow upwards, so rows are flipped on the way in (tests flip them back).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from bokeh.events import Tap
from bokeh.models import (
    BasicTickFormatter,
    BoxZoomTool,
    ColorBar,
    ColumnDataSource,
    HoverTool,
    Image,
    ImageRGBA,
    LabelSet,
    LinearColorMapper,
    PanTool,
    Plot,
    Quad,
    Range1d,
    ResetTool,
    SaveTool,
    Segment,
    Title,
    WheelZoomTool,
)

from ssl_attention.render import palette  # the 256 colours the PNG export bins values into, as Bokeh does

MARK_COLOR = "#ff3860"  # outline of the selected tile
OVERLAY_FRAME = 264  # px, longer side of each overlay's data area beside another: two fit from 1024 px up
SOLO_FRAME = 440  # px, longer side of the fused overlay when it is the only map shown
# The overlays' title style, set explicitly and different from Bokeh's defaults (13px, #444444): Bokeh keeps no
# value equal to the default, and the document's theme (HoloViews': 12pt, black) then restyles the title when the
# figure joins the page after another tab was opened first.
TITLE_FONT = "10pt"  # 13.3 px
TITLE_COLOR = "#333333"
TRANSPARENT = (0, 0, 0, 0)
NO_SEGMENTS = np.zeros((0, 4))
REGION_COLUMNS = ("left", "right", "bottom", "top", "colour", "label_x", "label_y", "text", "align")


def frame_size(aspect: float, longer: int) -> tuple[int, int]:
    """(width, height) px of a data area of ``aspect`` = height / width whose longer side is ``longer``."""
    if aspect >= 1:
        return max(1, round(longer / aspect)), longer
    return longer, max(1, round(longer * aspect))


def rgba_image(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) uint32 RGBA, rows flipped for Bokeh."""
    height, width = rgb.shape[:2]
    rgba = np.empty((height, width, 4), dtype=np.uint8)
    rgba[..., :3] = rgb
    rgba[..., 3] = 255
    return np.flipud(rgba).copy().view(np.uint32).reshape(height, width)


def _plot(x_range: Range1d, y_range: Range1d, name: str, **kwargs: Any) -> Plot:
    """A bare ``Plot`` (no axes, grids or default tools): a third of a ``figure``'s models, so sessions start
    and draw faster."""
    return Plot(x_range=x_range, y_range=y_range, name=name, min_border=0, outline_line_color=None, **kwargs)


def _image_source(image: np.ndarray) -> ColumnDataSource:
    return ColumnDataSource({"image": [image], "dw": [1.0], "dh": [1.0]})


@dataclass(frozen=True)
class MapLayer:
    """One map as an overlay shows it."""

    values: np.ndarray  # (grid_h, grid_w), row 0 at the top; NaN cells are transparent
    vmax: float
    title: str
    vmin: float = 0.0
    outline: np.ndarray = field(default_factory=lambda: NO_SEGMENTS)  # (S, 4) cell units (views.mask_outline)


def empty_regions() -> dict[str, list[Any]]:
    return {column: [] for column in REGION_COLUMNS}


def _add_halo_quads(figure: Plot, source: ColumnDataSource) -> None:
    """Outlines of the rows of ``source`` (left, right, bottom, top, colour): a white halo under the colour, so a
    region stays visible on bright and dark maps alike; the feature's name at its top-left corner."""
    for color, width in (("white", 4.0), ("colour", 2.0)):
        quad = Quad(left="left", right="right", bottom="bottom", top="top", fill_alpha=0, line_width=width)
        quad.line_color = color
        figure.add_glyph(source, quad)
    labels = LabelSet(
        x="label_x",
        y="label_y",
        text="text",
        text_align="align",  # right-aligned at the right edge of a box near the frame's right side
        source=source,
        text_color="black",
        text_font_size="11px",
        background_fill_color="white",
        background_fill_alpha=0.75,
        text_baseline="top",
        y_offset=-3,
    )
    figure.add_layout(labels)


class OverlayFigure:
    """A map (image glyph, colour bar, hover value) over the model's input image."""

    def __init__(
        self,
        x_range: Range1d,
        y_range: Range1d,
        base: ColumnDataSource,
        name: str,
        regions: ColumnDataSource | None = None,
    ) -> None:
        self.figure = _plot(
            x_range,
            y_range,
            name,
            frame_width=OVERLAY_FRAME,
            frame_height=OVERLAY_FRAME,
            toolbar_location="above",  # not beside the colour bar, whose labels change width on a switch
            title=Title(text="", text_font_size=TITLE_FONT, text_color=TITLE_COLOR),
            min_border_right=10,
        )
        self.figure.add_glyph(base, ImageRGBA(image="image", x=0, y=0, dw="dw", dh="dh"))
        self.mapper = LinearColorMapper(palette=palette("viridis"), low=0.0, high=1.0, nan_color=TRANSPARENT)
        self.heat = _image_source(np.zeros((1, 1), np.float32))
        glyph = Image(image="image", x=0, y=0, dw="dw", dh="dh", color_mapper=self.mapper, global_alpha=0.6)
        self.heat_renderer = self.figure.add_glyph(self.heat, glyph)
        plain_numbers = BasicTickFormatter(use_scientific=False, precision="auto")  # 0.0015, not 1.500e-3
        self.colorbar = ColorBar(color_mapper=self.mapper, width=12, title="attention", formatter=plain_numbers)
        self.figure.add_layout(self.colorbar, "right")
        # the outline of the top-60% mass cells (``contour`` mode): white over black, readable on any colour
        self.outline = ColumnDataSource({"x0": [], "y0": [], "x1": [], "y1": []})
        for color, width in (("black", 3.0), ("white", 1.5)):
            self.figure.add_glyph(
                self.outline, Segment(x0="x0", y0="y0", x1="x1", y1="y1", line_color=color, line_width=width)
            )
        if regions is not None:
            _add_halo_quads(self.figure, regions)  # the annotated regions, shared by both overlays
        wheel = WheelZoomTool()
        self.hover = HoverTool(renderers=[self.heat_renderer], tooltips=_tooltips("attention"))
        self.figure.add_tools(PanTool(), wheel, BoxZoomTool(), ResetTool(), SaveTool(), self.hover)
        self.figure.toolbar.active_scroll = wheel
        self._last: dict[str, Any] = {}

    def _changed(self, key: str, value: Any) -> bool:
        old = self._last.get(key)
        if isinstance(value, np.ndarray):
            same = isinstance(old, np.ndarray) and (old is value or np.array_equal(old, value))
        else:
            same = key in self._last and old == value
        self._last[key] = value
        return not same

    def render(self, aspect: float, layer: MapLayer, cmap: str, alpha: float, value_label: str) -> None:
        """Show ``layer``; ``value_label`` names its values on the colour bar and in the hover ("attention",
        "rollout", "Grad-CAM")."""
        values_changed = self._changed("values", layer.values)
        if self._changed("aspect", aspect) or values_changed:
            flipped = np.flipud(np.asarray(layer.values, dtype=np.float32)).copy()
            self.heat.data = {"image": [flipped], "dw": [1.0], "dh": [aspect]}
        if self._changed("range", (layer.vmin, layer.vmax)):
            self.mapper.update(low=layer.vmin, high=layer.vmax)
        if self._changed("cmap", cmap):
            self.mapper.palette = palette(cmap)
        if self._changed("alpha", alpha):
            self.heat_renderer.glyph.global_alpha = alpha
        if self._changed("title", layer.title):
            self.figure.title.text = layer.title
        self._draw_outline(aspect, layer)
        self.label(value_label)

    def _draw_outline(self, aspect: float, layer: MapLayer) -> None:
        """``layer.outline`` (cell units, row 0 at the top) in plot units: x over [0, 1], y up over [0, aspect]."""
        grid_h, grid_w = np.shape(layer.values)
        cells = np.asarray(layer.outline, dtype=np.float64).reshape(-1, 4)
        plot = np.column_stack(
            [
                cells[:, 0] / grid_w,
                aspect * (1 - cells[:, 1] / grid_h),
                cells[:, 2] / grid_w,
                aspect * (1 - cells[:, 3] / grid_h),
            ]
        )
        if self._changed("outline", plot):
            self.outline.data = {key: plot[:, k].tolist() for k, key in enumerate(("x0", "y0", "x1", "y1"))}

    def label(self, value_label: str) -> None:
        if self._changed("value_label", value_label):
            self.colorbar.title = value_label
            self.hover.tooltips = _tooltips(value_label)


def _tooltips(value_label: str) -> list[tuple[str, str]]:
    return [(value_label, "@image{0.00000}")]


class LinkedOverlays:
    """Fused map and selected head side by side; zoom and pan are shared through the same ranges."""

    def __init__(self) -> None:
        self.x_range = Range1d(0.0, 1.0, bounds=(0.0, 1.0))
        self.y_range = Range1d(0.0, 1.0, bounds=(0.0, 1.0))
        self.base = _image_source(np.zeros((1, 1), np.uint32))  # the input image, sent once for both
        self.regions = ColumnDataSource(empty_regions())  # the annotated regions, sent once for both
        self.fused = OverlayFigure(self.x_range, self.y_range, self.base, "fused-plot", self.regions)
        self.head = OverlayFigure(self.x_range, self.y_range, self.base, "head-plot", self.regions)
        self._regions: dict[str, list[Any]] = empty_regions()
        self._aspect = 1.0
        self._frames: tuple[float, bool] = (0.0, False)  # (aspect, solo) the frames were sized for
        self.resized = False  # set when the frames change size (the page must lay them out again)
        self._rgb: np.ndarray | None = None

    def render(
        self, rgb: np.ndarray, fused: MapLayer, head: MapLayer | None, cmap: str, alpha: float, value_label: str
    ) -> None:
        """``head=None``: the head figure is hidden and keeps its map and title (it catches up when shown again);
        only its value label follows, so every colour bar in the page names what the maps are. The fused map
        alone takes the room of both (``SOLO_FRAME``). ``aspect`` = height / width of the model's input: the
        map spans it, so a 28 × 42 grid over a 448 × 672 input keeps its cells square and its rows in order."""
        aspect = rgb.shape[0] / rgb.shape[1]
        if aspect != self._aspect:  # a model with another input shape: reset the view to the whole image
            self._aspect = aspect
            self.y_range.update(start=0.0, end=aspect, bounds=(0.0, aspect))
            self.x_range.update(start=0.0, end=1.0)
        if (aspect, head is None) != self._frames:
            self._frames = (aspect, head is None)
            self.resized = True
            width, height = frame_size(aspect, SOLO_FRAME if head is None else OVERLAY_FRAME)
            self.fused.figure.update(frame_width=width, frame_height=height)
            width, height = frame_size(aspect, OVERLAY_FRAME)
            self.head.figure.update(frame_width=width, frame_height=height)
        if self._rgb is None or not (self._rgb is rgb or np.array_equal(self._rgb, rgb)):
            self._rgb = rgb
            self.base.data = {"image": [rgba_image(rgb)], "dw": [1.0], "dh": [aspect]}
        self.fused.render(aspect, fused, cmap, alpha, value_label)
        if head is not None:
            self.head.render(aspect, head, cmap, alpha, value_label)
        else:
            self.head.label(value_label)

    def show_regions(self, data: dict[str, list[Any]]) -> None:
        """Outline the regions of ``data`` (``REGION_COLUMNS``, plot units) on both maps; empty lists: none."""
        if data != self._regions:  # Bokeh re-sends a source's data on every assignment, equal or not
            self._regions = data
            self.regions.data = {key: list(values) for key, values in data.items()}


class TileStrip:
    """Tiles side by side (or in rows) in one image, captions, an outline on the selected tile, and a tap
    callback with the tile index. Tile k spans x in [k % columns, +1); rows run top to bottom."""

    def __init__(
        self, on_tap: Callable[[int], None], tile_px: int, columns: int, name: str, captions: bool = True
    ) -> None:
        self.tile_px = tile_px  # may be changed before a render: applied with the next change of shape
        self.columns = columns
        self.figure = _plot(
            Range1d(0, 1), Range1d(0, 1), name, frame_width=tile_px, frame_height=tile_px, toolbar_location=None
        )
        self.rgb = ColumnDataSource({"image": [], "dw": [], "dh": []})
        self.figure.add_glyph(self.rgb, ImageRGBA(image="image", x=0, y=0, dw="dw", dh="dh"))
        self.mapper = LinearColorMapper(palette=palette("viridis"), low=0.0, high=1.0, nan_color=(0, 0, 0, 0))
        self.maps = ColumnDataSource({"image": [], "dw": [], "dh": []})
        self.figure.add_glyph(self.maps, Image(image="image", x=0, y=0, dw="dw", dh="dh", color_mapper=self.mapper))
        self.captions = ColumnDataSource({"x": [], "y": [], "text": []})
        if captions:
            self.figure.add_layout(
                LabelSet(
                    x="x",
                    y="y",
                    text="text",
                    source=self.captions,
                    text_color="white",
                    text_font_size="10pt",
                    text_font_style="bold",
                    text_outline_color="black",  # readable on bright and dark tiles alike
                    text_baseline="top",
                    x_offset=2,
                    y_offset=-1,
                )
            )
        self.outline = ColumnDataSource({"left": [], "right": [], "bottom": [], "top": []})
        # the selection frame: white under the mark colour, visible on bright and dark tiles
        for color, width in (("white", 6), (MARK_COLOR, 3)):
            frame = Quad(left="left", right="right", bottom="bottom", top="top", fill_alpha=0, line_width=width)
            frame.line_color = color
            self.figure.add_glyph(self.outline, frame)
        self._shape: tuple[int, int, float] = (0, 0, 0.0)
        self._selected: int | None = -2
        self._drawn: tuple[Any, ...] = ()  # (mosaic, captions, cmap) last sent
        self._placed: dict[str, list[Any]] = {}  # the captions' data last sent
        self._cmap = "viridis"  # the mapper's palette
        self._on_tap = on_tap
        self.figure.on_event(Tap, self._tapped)

    def _grid(self, count: int) -> tuple[int, int]:
        columns = min(self.columns, max(count, 1))
        return columns, -(-count // columns)

    def _tapped(self, event: Tap) -> None:
        columns, rows = self._shape[:2]
        if event.x is None or event.y is None or not columns:
            return
        aspect = self._shape[2]
        column = min(max(int(event.x), 0), columns - 1)
        row = rows - 1 - min(max(int(event.y / aspect), 0), rows - 1)
        self._on_tap(row * columns + column)

    def _set_shape(self, count: int, aspect: float, captions: Sequence[str]) -> None:
        columns, rows = self._grid(count)
        size = (self.tile_px * columns, round(self.tile_px * rows * aspect))
        if (columns, rows, aspect) != self._shape or size != (self.figure.frame_width, self.figure.frame_height):
            self._shape = (columns, rows, aspect)
            self.figure.x_range.update(start=0, end=columns)
            self.figure.y_range.update(start=0, end=rows * aspect)
            self.figure.frame_width, self.figure.frame_height = size
            self._selected = -2
        positions = [divmod(k, columns) for k in range(count)]
        placed = {
            "x": [float(c) for _, c in positions],
            "y": [(rows - r) * aspect for r, _ in positions],
            "text": list(captions),
        }
        if placed != self._placed:  # Bokeh re-sends a source's data on every assignment, equal or not
            self._placed = placed
            self.captions.data = {key: list(values) for key, values in placed.items()}

    def select(self, index: int | None) -> None:
        """Outline tile ``index`` (None: no outline)."""
        if index == self._selected:
            return
        self._selected = index
        columns, rows, aspect = self._shape
        if index is None or not columns:
            self.outline.data = {"left": [], "right": [], "bottom": [], "top": []}
            return
        r, c = divmod(index, columns)
        bottom = (rows - 1 - r) * aspect
        self.outline.data = {"left": [c], "right": [c + 1], "bottom": [bottom], "top": [bottom + aspect]}

    def render_maps(self, tiles: Sequence[np.ndarray], captions: Sequence[str], cmap: str) -> None:
        """Maps already scaled to [0, 1], all of one grid; the last row is padded with transparent cells."""
        grid_h, grid_w = tiles[0].shape
        self._set_shape(len(tiles), grid_h / grid_w, captions)
        columns, rows = self._shape[:2]
        mosaic = np.full((rows * grid_h, columns * grid_w), np.nan, dtype=np.float32)
        for k, tile in enumerate(tiles):
            r, c = divmod(k, columns)
            mosaic[r * grid_h : (r + 1) * grid_h, c * grid_w : (c + 1) * grid_w] = tile
        if (
            self._drawn
            and np.array_equal(self._drawn[0], mosaic, equal_nan=True)
            and self._drawn[1:]
            == (
                tuple(captions),
                cmap,
            )
        ):
            return  # a head switch within one layer: only the outline moves
        self._drawn = (mosaic, tuple(captions), cmap)
        self.maps.data = {"image": [np.flipud(mosaic).copy()], "dw": [columns], "dh": [rows * grid_h / grid_w]}
        if cmap != self._cmap:  # assigning a palette validates its 256 colours (~7 ms) even when unchanged
            self._cmap = cmap
            self.mapper.palette = palette(cmap)

    def render_rgb(self, tiles: Sequence[np.ndarray], captions: Sequence[str]) -> None:
        """RGB tiles of one size (the image picker)."""
        size_h, size_w = tiles[0].shape[:2]
        self._set_shape(len(tiles), size_h / size_w, captions)
        columns, rows = self._shape[:2]
        canvas = np.full((rows * size_h, columns * size_w, 3), 255, dtype=np.uint8)
        for k, tile in enumerate(tiles):
            r, c = divmod(k, columns)
            canvas[r * size_h : (r + 1) * size_h, c * size_w : (c + 1) * size_w] = tile
        self.rgb.data = {"image": [rgba_image(canvas)], "dw": [columns], "dh": [rows * size_h / size_w]}
