"""The heads tab: the fused map and the selected head over the input image, side by side, and the head grid.

The hot path of the dashboard: Bokeh models updated in place on every switch (``dashboards.figures``),
whether the tab is open or not (an update is a few small arrays).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import panel as pn

from dashboards import figures, views
from dashboards.session import Session
from dashboards.tabs.base import Tab

GRID_TILE_PX = 96  # px, the longer side of a head grid tile
GRID_WIDTH = 680  # px the head grid may take: fits beside the controls from a 1024-px window up
GRID_CAPTION = (
    "<b>Head grid</b> — fused first, then every head of this layer (tiles scaled as chosen under "
    "<i>Colour scale</i>: shared = one scale for the layer, independent = each tile its own). "
    "Click a tile to select it; <i>All heads (fused)</i> shows the fused map alone, larger."
)


class HeadsTab(Tab):
    key = "heads"
    label = "Heads"

    def __init__(self, session: Session, **params: Any) -> None:
        super().__init__(session, **params)
        self.overlays = figures.LinkedOverlays()
        # each overlay in a holder re-sent when its frame size changes, so that the page lays it out again
        self.fused_holder = pn.Column(pn.pane.Bokeh(self.overlays.fused.figure), margin=0)
        self.head_holder = pn.Column(
            pn.pane.Bokeh(self.overlays.head.figure), visible=session.param.head_panel, margin=0
        )
        self.grid_strip = figures.TileStrip(self.on_grid_tile, GRID_TILE_PX, columns=7, name="head-grid")
        session.param.watch(self.render, ["selection", "cmap", "opacity", "scale", "contrast"])
        self.render()

    def render(self, *_: Any) -> None:
        """Fused and selected head over the input image, and the head grid, for the current selection."""
        with pn.io.hold():  # one message for the browser (see Session._apply)
            self._render()

    def _render(self) -> None:
        session, s = self.session, self.session.selection
        rgb = session.rgb(s.image, s.model)
        label = session.value_label
        try:
            grid = session.head_grid()
        except Exception as exc:  # never a traceback: say what failed where the maps would be
            session.problem = session.failure(f"load the {s.model}/{s.method} maps of {session.layer_label()}", exc)
            empty = figures.MapLayer(np.zeros((1, 1), np.float32), 1.0, "maps unavailable (see the message above)")
            self.overlays.render(rgb, empty, empty, session.cmap, 0.0, label)
            return
        session.problem = ""
        shared, mode = session.scale == "shared", session.contrast
        head = s.head if s.head in grid.heads else None
        heads = len(grid.heads) > 1  # else the head map and the grid are hidden (show_heads): left as they are
        # never the same map twice: with fused selected (head None) the head figure is hidden (head_panel)
        layers = [
            layer_of(grid.maps, grid.maps[grid.heads.index(shown)], shared, mode, session.map_title(shown))
            for shown in ((None, head) if heads and head is not None else (None,))
        ]
        head_layer = layers[1] if len(layers) > 1 else None
        self.overlays.render(rgb, layers[0], head_layer, session.cmap, session.opacity, label)
        if self.overlays.resized:  # the browser lays a figure out again only when its layout changes
            self.overlays.resized = False
            for holder in (self.fused_holder, self.head_holder):
                holder.param.trigger("objects")
        if not heads:
            return
        self.grid_strip.tile_px, self.grid_strip.columns = grid_layout(len(grid.heads), grid.maps.shape[1:])
        captions = ["fused" if h is None else f"h{h}" for h in grid.heads]
        self.grid_strip.render_maps(views.scale_tiles(list(grid.maps), shared, mode), captions, session.cmap)
        self.grid_strip.select(grid.heads.index(head))

    def on_grid_tile(self, index: int) -> None:
        try:
            heads = self.session.head_grid().heads
        except Exception as exc:
            self.session.problem = self.session.failure("load the head grid", exc)
            return
        if 0 <= index < len(heads):
            self.session.select_head(heads[index])

    def __panel__(self) -> pn.viewable.Viewable:
        # A method without heads (the registry's per_head=False) has one map: no head map, no grid; with the
        # fused map selected, no head map either (it would repeat the fused one). The Bokeh panes sit in layouts
        # that hide them: a Bokeh pane created hidden would still be drawn (its figure is its model). The two maps
        # fit side by side beside the controls from a 1024-px window up (figures.OVERLAY_FRAME).
        p = self.session.param
        return pn.Column(
            pn.Row(self.fused_holder, self.head_holder),
            pn.Column(
                pn.pane.HTML(GRID_CAPTION, margin=(0, 10), max_width=GRID_WIDTH, sizing_mode="stretch_width"),
                pn.pane.Bokeh(self.grid_strip.figure, margin=(0, 10)),
                visible=p.show_heads,
                margin=0,
            ),
            sizing_mode="stretch_width",
        )


def layer_of(layer_maps: np.ndarray, values: np.ndarray, shared: bool, mode: str, title: str) -> figures.MapLayer:
    """One map as the overlay draws it under colour scale ``mode`` (``views.display_range``/``shown_values``)."""
    low, high = views.display_range(layer_maps, values, shared, mode)
    return figures.MapLayer(views.shown_values(values, mode), high, title, vmin=low)


def grid_layout(count: int, grid_shape: tuple[int, ...]) -> tuple[int, int]:
    """(tile px, columns) of the head grid: tiles of ``GRID_TILE_PX`` on their longer side, as many per row as
    fit in ``GRID_WIDTH`` (rows wrap: 13 tiles of 96 px make rows of 7 and 6)."""
    grid_h, grid_w = grid_shape
    tile_w = GRID_TILE_PX if grid_w >= grid_h else round(GRID_TILE_PX * grid_w / grid_h)
    return tile_w, max(1, min(count, GRID_WIDTH // tile_w))
