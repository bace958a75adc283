"""A labelled heatmap of rows x columns of numbers, drawn with Bokeh models updated in place (as
``dashboards.figures``: a switch assigns arrays to an existing figure, it never rebuilds one).

The alignment tab's layers x heads grid and its head x feature matrix: one rectangle per scored cell (NaN cells
are drawn in a light grey, blank columns not at all), tick labels on both axes, a colour bar with plain
numbers, a hover with the cell's row, column and value, a tap callback with the cell's (row, column), and an
outline on the selected cell. Row 0 is drawn at the top.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from bokeh.events import Tap
from bokeh.models import (
    BasicTickFormatter,
    ColorBar,
    ColumnDataSource,
    FixedTicker,
    HoverTool,
    LinearAxis,
    LinearColorMapper,
    Plot,
    Quad,
    Range1d,
    Rect,
    Title,
)

from dashboards.figures import MARK_COLOR, TITLE_FONT
from ssl_attention.render import palette

MISSING_COLOR = "#e6e6e6"  # a cell without a score
MIN_HEIGHT = 150  # px, the least height of the data area


class HeatGrid:
    """Rows x columns of values; ``render`` them, ``select`` a cell; taps call ``on_tap(row, column)``."""

    def __init__(self, on_tap: Callable[[int, int], None], name: str, max_cell: int = 30, max_width: int = 440):
        self.max_cell, self.max_width = max_cell, max_width
        self.figure = Plot(
            x_range=Range1d(0, 1),
            y_range=Range1d(0, 1),
            name=name,
            frame_width=100,
            frame_height=100,
            min_border=4,
            min_border_right=10,
            outline_line_color=None,
            toolbar_location=None,
            title=Title(text="", text_font_size=TITLE_FONT),
        )
        self.source = ColumnDataSource({"x": [], "y": [], "value": [], "row": [], "column": [], "text": []})
        self.mapper = LinearColorMapper(palette=palette("viridis"), low=0.0, high=1.0, nan_color=MISSING_COLOR)
        rect = Rect(
            x="x",
            y="y",
            width=1,
            height=1,
            fill_color={"field": "value", "transform": self.mapper},
            line_color="white",
            line_width=1,
        )
        renderer = self.figure.add_glyph(self.source, rect)
        self.x_axis = LinearAxis(ticker=FixedTicker(ticks=[]), major_label_orientation=math.pi / 2)
        self.y_axis = LinearAxis(ticker=FixedTicker(ticks=[]))
        for axis in (self.x_axis, self.y_axis):
            axis.update(major_tick_line_color=None, minor_tick_line_color=None, axis_line_color=None)
            axis.major_label_text_font_size = "11px"
            axis.axis_label_text_font_size = "11px"
            axis.axis_label_text_font_style = "normal"
        self.figure.add_layout(self.x_axis, "below")
        self.figure.add_layout(self.y_axis, "left")
        plain_numbers = BasicTickFormatter(use_scientific=False, precision="auto")
        self.colorbar = ColorBar(color_mapper=self.mapper, width=10, title="", formatter=plain_numbers)
        self.figure.add_layout(self.colorbar, "right")
        self.hover = HoverTool(renderers=[renderer], tooltips=[("", "@row · @column"), ("value", "@text")])
        self.figure.add_tools(self.hover)
        self.outline = ColumnDataSource({"left": [], "right": [], "bottom": [], "top": []})
        for color, width in (("white", 5), (MARK_COLOR, 2.5)):
            frame = Quad(left="left", right="right", bottom="bottom", top="top", fill_alpha=0, line_width=width)
            frame.line_color = color
            self.figure.add_glyph(self.outline, frame)
        self.shape = (0, 0)
        self._drawn: tuple[Any, ...] = ()
        self._selected: tuple[int, int] | None = (-1, -1)
        self._cmap = "viridis"
        self._on_tap = on_tap
        self.figure.on_event(Tap, self._tapped)

    def cell_px(self, columns: int) -> int:
        return max(14, min(self.max_cell, self.max_width // max(columns, 1)))

    def _tapped(self, event: Tap) -> None:
        rows, columns = self.shape
        if event.x is None or event.y is None or not rows or not columns:
            return
        column, from_bottom = math.floor(event.x), math.floor(event.y)
        if 0 <= column < columns and 0 <= from_bottom < rows:
            self._on_tap(rows - 1 - from_bottom, column)

    def render(
        self,
        values: np.ndarray,
        row_labels: Sequence[str],
        column_labels: Sequence[str],
        cmap: str,
        title: str,
        value_label: str,
        skip: Sequence[int] = (),
        axis_labels: tuple[str, str] = ("", ""),
    ) -> None:
        """``values`` (rows, columns); columns in ``skip`` are left blank (a gap between groups);
        ``axis_labels``: (columns, rows)."""
        key = (values.tobytes(), values.shape, tuple(row_labels), tuple(column_labels), tuple(skip), title, value_label)
        if key != self._drawn:
            self._drawn = key
            self._draw(values, row_labels, column_labels, title, value_label, set(skip))
        if (self.x_axis.axis_label or "", self.y_axis.axis_label or "") != axis_labels:
            self.x_axis.axis_label, self.y_axis.axis_label = axis_labels
        if cmap != self._cmap:  # a palette assignment validates 256 colours: only on a change
            self._cmap = cmap
            self.mapper.palette = palette(cmap)

    def _draw(
        self,
        values: np.ndarray,
        row_labels: Sequence[str],
        column_labels: Sequence[str],
        title: str,
        value_label: str,
        skip: set[int],
    ) -> None:
        rows, columns = values.shape
        cells = [(i, k) for i in range(rows) for k in range(columns) if k not in skip]
        data = {
            "x": [k + 0.5 for _, k in cells],
            "y": [rows - 1 - i + 0.5 for i, _ in cells],
            "value": [float(values[i, k]) for i, k in cells],
            "row": [row_labels[i] for i, _ in cells],
            "column": [column_labels[k] for _, k in cells],
            "text": ["—" if not np.isfinite(values[i, k]) else f"{values[i, k]:.4f}" for i, k in cells],
        }
        self.source.data = data
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if not high > low:
            low, high = low - 0.5, high + 0.5
        self.mapper.update(low=low, high=high)
        # the tickers are updated, never replaced: a new model makes Bokeh walk the whole document (~0.2 s)
        x_ticks = {k + 0.5: column_labels[k] for k in range(columns) if k not in skip}
        y_ticks = {rows - 1 - i + 0.5: row_labels[i] for i in range(rows)}
        for axis, ticks in ((self.x_axis, x_ticks), (self.y_axis, y_ticks)):
            if list(axis.ticker.ticks) != list(ticks):
                axis.ticker.ticks = list(ticks)
            if dict(axis.major_label_overrides) != ticks:
                axis.major_label_overrides = ticks
        self.figure.title.text = title
        self.colorbar.title = value_label
        if (rows, columns) != self.shape:
            self.shape = (rows, columns)
            cell = self.cell_px(columns)
            self.figure.x_range.update(start=0, end=columns)
            self.figure.y_range.update(start=0, end=rows)
            # a few rows get taller cells: the colour bar (as tall as the frame) needs room for its labels
            self.figure.update(frame_width=cell * columns, frame_height=max(cell * rows, MIN_HEIGHT))
            self._selected = (-1, -1)  # Bokeh lays the figure out again itself (no re-send of its pane needed)

    def select(self, cell: tuple[int, int] | None) -> None:
        """Outline ``(row, column)`` (None: no outline)."""
        if cell == self._selected:
            return
        self._selected = cell
        rows, columns = self.shape
        if cell is None or not (0 <= cell[0] < rows and 0 <= cell[1] < columns):
            self.outline.data = {"left": [], "right": [], "bottom": [], "top": []}
            return
        row, column = cell
        bottom = rows - 1 - row
        self.outline.data = {"left": [column], "right": [column + 1], "bottom": [bottom], "top": [bottom + 1]}
