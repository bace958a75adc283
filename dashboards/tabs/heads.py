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

GRID_WIDTH = 880  # px available to the head grid
GRID_CAPTION = (
    "<b>Head grid</b> — fused first, then every head of this layer (tiles scaled as chosen under "
    "<i>Colour scale</i>: shared = one scale for the layer, independent = each tile its own). "
    "Click a tile to select it."
)


class HeadsTab(Tab):
    key = "heads"
    label = "Heads"

    def __init__(self, session: Session, **params: Any) -> None:
        super().__init__(session, **params)
        self.overlays = figures.LinkedOverlays()
        self.grid_strip = figures.TileStrip(self.on_grid_tile, 80, columns=64, name="head-grid")
        session.param.watch(self.render, ["selection", "cmap", "opacity", "scale"])
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
        shared = session.scale == "shared"
        head = s.head if s.head in grid.heads else None
        heads = len(grid.heads) > 1  # else the head map and the grid are hidden (show_heads): left as they are
        layers = []
        for shown in (None, head) if heads else (None,):
            values = grid.maps[grid.heads.index(shown)]
            layers.append(
                figures.MapLayer(values, views.display_max(grid.maps, values, shared), session.map_title(shown))
            )
        self.overlays.render(rgb, layers[0], layers[1] if heads else None, session.cmap, session.opacity, label)
        if not heads:
            return
        self.grid_strip.tile_px = max(40, min(110, GRID_WIDTH // len(grid.heads)))
        captions = ["fused" if h is None else f"h{h}" for h in grid.heads]
        self.grid_strip.render_maps(views.normalise_tiles(list(grid.maps), shared), captions, session.cmap)
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
        # A method without heads (the registry's per_head=False) has one map: no head map, no grid. The Bokeh
        # panes sit in layouts that hide them: a Bokeh pane created hidden would still be drawn (its figure is
        # its model).
        show_heads = self.session.param.show_heads
        return pn.Column(
            pn.Row(
                pn.pane.Bokeh(self.overlays.fused.figure),
                pn.Column(pn.pane.Bokeh(self.overlays.head.figure), visible=show_heads, margin=0),
            ),
            pn.Column(
                pn.pane.HTML(GRID_CAPTION, margin=(0, 10)),
                pn.pane.Bokeh(self.grid_strip.figure, margin=(0, 10)),
                visible=show_heads,
                margin=0,
            ),
        )
