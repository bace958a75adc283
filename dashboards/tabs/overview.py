"""The layers × heads tab: every layer (rows) × fused and every head (columns) of the whole model for the
selected image and method, one HoloViews mosaic (``dashboards.views.overview_image``); a click selects."""

from __future__ import annotations

from typing import Any

import holoviews as hv
import numpy as np
import panel as pn
import param

from dashboards import data, state, views
from dashboards.session import Session, plain
from dashboards.tabs.base import Tab
from ssl_attention.query import LayerHeadMaps

INTRO = (
    "Every layer (rows) × fused and every head (columns) of the whole model for this image and method. "
    "Click a tile to select that layer and head."
)


class OverviewTab(Tab):
    key = "overview"
    label = "Layers × heads"

    # What the plot draws, updated only while the tab is open: its plot stays alive (and would redraw, ~60 ms)
    # after a visit, so a hidden tab must not see the selection change.
    view_key = param.Tuple(default=None, length=4, allow_None=True, doc="(selection, cmap, scale, contrast)")

    def __init__(self, session: Session, **params: Any) -> None:
        super().__init__(session, **params)
        self._taps: dict[str, hv.streams.Tap] = {}  # Tap streams must stay referenced to keep firing
        session.param.watch(self.update_key, ["tab", "selection", "cmap", "scale", "contrast"])

    def update_key(self, *_: Any) -> None:
        if self.is_open:
            s = self.session
            self.view_key = (s.selection, s.cmap, s.scale, s.contrast)

    def maps(self, selection: state.Selection) -> LayerHeadMaps | str:
        """The layers x heads maps, or why they cannot be loaded."""
        session = self.session
        try:
            return data.layer_head_maps(session.root, selection.image, selection.model, selection.method)
        except Exception as exc:
            return session.failure(f"load the {selection.model}/{selection.method} maps", exc)

    def plot(self, view_key: tuple[state.Selection, str, str, str]) -> hv.Image:
        selection, cmap, scale, mode = view_key
        maps = self.maps(selection)
        if isinstance(maps, str):
            blank = views.overview_image([np.zeros((1, 1, 1), np.float32)], (None,), ["—"], cmap, True)
            return blank.opts(title=plain(maps)[:160])
        labels = [self.session.layer_label(layer) for layer in maps.layers]
        method = state.method_label(selection.method)
        return views.overview_image(maps.per_layer, maps.heads, labels, cmap, scale == "shared", method, mode)

    def marks(self, view_key: tuple[state.Selection, str, str, str]) -> hv.Bounds:
        selection = view_key[0]
        maps = self.maps(selection)
        if isinstance(maps, str):
            return views.overview_marks(1, (0, 0))
        row = maps.layers.index(selection.layer) if selection.layer in maps.layers else 0
        col = maps.heads.index(selection.head) if selection.head in maps.heads else 0
        return views.overview_marks(len(maps.layers), (row, col))

    def on_tap(self, x: float | None = None, y: float | None = None) -> None:
        session = self.session
        if x is None or y is None or session.selection is None:
            return
        maps = self.maps(session.selection)
        if isinstance(maps, str):
            return
        rows = len(maps.layers)
        row = min(max(rows - 1 - int(y // 1), 0), rows - 1)
        col = min(max(int(x // 1), 0), len(maps.heads) - 1)
        head = maps.heads[col]
        session.param.update(layer=maps.layers[row], head=state.FUSED_VALUE if head is None else head)

    def pane(self, shape_key: tuple[str, str], tab: str) -> pn.viewable.Viewable:
        """Layers x heads of the whole model; re-created per (model, method), whose shape fixes its size."""
        self.skip_unless_open(tab)
        self.update_key()
        maps = self.maps(self.session.selection)
        if isinstance(maps, str):
            return pn.pane.Alert(maps, alert_type="danger")
        image = hv.DynamicMap(pn.bind(self.plot, view_key=self.param.view_key))
        marks = hv.DynamicMap(pn.bind(self.marks, view_key=self.param.view_key))
        # a Tap stream needs a DynamicMap of an element (not of an overlay) as its source
        self._taps["overview"] = hv.streams.Tap(source=image, x=None, y=None)
        self._taps["overview"].add_subscriber(self.on_tap)
        return pn.pane.HoloViews(image * marks, linked_axes=False)

    def __panel__(self) -> pn.viewable.Viewable:
        session = self.session.param
        return pn.Column(pn.pane.Markdown(INTRO), pn.bind(self.pane, session.shape_key, session.tab))
