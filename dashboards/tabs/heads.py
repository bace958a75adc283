"""The heads tab: the fused map and the selected head over the input image, side by side, and the head grid;
with *Annotations* on, the image's regions on both maps and each map's alignment scores beside it.

The hot path of the dashboard: Bokeh models updated in place on every switch (``dashboards.figures``),
whether the tab is open or not (an update is a few small arrays).
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import panel as pn
import param

from dashboards import data, figures, regions, state, views
from dashboards.session import Session, plain
from dashboards.tabs.base import Tab

GRID_TILE_PX = 96  # px, the longer side of a head grid tile
GRID_WIDTH = 680  # px the head grid may take: fits beside the controls from a 1024-px window up
GRID_CAPTION = (
    "<b>Head grid</b> — fused first, then every head of this layer (tiles scaled as chosen under "
    "<i>Colour scale</i>: shared = one scale for the layer, independent = each tile its own). "
    "Click a tile to select it; <i>All heads (fused)</i> shows the fused map alone, larger."
)
SCORES_WIDTH = 330  # px, the scores table under each map (two fit side by side from a 1024-px window up)
TRUE_WORDS, FALSE_WORDS = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


class HeadsTab(Tab):
    key = "heads"
    label = "Heads"
    # "regions", not "feature": the Alignment tab keeps its own feature picker under that key
    url_keys: ClassVar[Mapping[str, str]] = {"annotations": "annotations", "regions": "feature"}

    annotations = param.Boolean(default=False, doc="draw the annotated regions and show each map's scores")
    feature = param.Selector(
        objects=[regions.FEATURE_ALL],
        default=regions.FEATURE_ALL,
        doc="whose regions are drawn and scored: all of the image's, or one feature's",
    )

    def __init__(self, session: Session, **params: Any) -> None:
        super().__init__(session, **params)
        try:
            self.annotated = data.annotated_images(session.root)
            self.annotations_problem = ""
        except Exception as exc:  # the maps still work without their regions
            self.annotated = {}
            self.annotations_problem = self._failed("read the annotations", exc)
        features = sorted({f for names in self.annotated.values() for f in names})
        self.param.feature.objects = [regions.FEATURE_ALL, *features]
        self.colours = regions.feature_colours(features)
        self.toggle = pn.widgets.Toggle.from_param(
            self.param.annotations,
            name="Annotations",
            color="primary",
            variant="outline",  # filled when on
            width=120,
            margin=(22, 10, 5, 10),
        )
        self.feature_select = pn.widgets.Select.from_param(self.param.feature, name="Feature", width=170)
        self.note = pn.pane.HTML("", margin=(12, 10, 0, 10), sizing_mode="stretch_width", name="regions-note")
        self.fused_scores = pn.pane.HTML("", width=SCORES_WIDTH, margin=(0, 10), visible=False, name="fused-scores")
        self.head_scores = pn.pane.HTML("", width=SCORES_WIDTH, margin=(0, 10), visible=False, name="head-scores")
        self.overlays = figures.LinkedOverlays()
        # each overlay in a holder re-sent when its frame size changes, so that the page lays it out again
        self.fused_holder = pn.Column(pn.pane.Bokeh(self.overlays.fused.figure), margin=0)
        self.head_holder = pn.Column(
            pn.pane.Bokeh(self.overlays.head.figure), visible=session.param.head_panel, margin=0
        )
        self.grid_strip = figures.TileStrip(self.on_grid_tile, GRID_TILE_PX, columns=7, name="head-grid")
        session.param.watch(self.render, ["selection", "cmap", "opacity", "scale", "contrast"])
        self.param.watch(self.render, ["annotations", "feature"])
        self.render()

    def from_url(self, name: str, value: Any) -> Any:
        """``annotations=1`` / ``0`` (also true/false, on/off); a feature by its name."""
        if name == "annotations":
            word = str(int(value) if isinstance(value, bool | float) and float(value).is_integer() else value).lower()
            if word in TRUE_WORDS or word in FALSE_WORDS:
                return word in TRUE_WORDS
            raise ValueError(f"annotations must be 1 or 0, got {value!r}")
        return str(value)

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
            self._render_regions(rgb, None)
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
        self._render_regions(rgb, head if head_layer is not None else None)
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

    def _say(self, note: str) -> None:
        """The note beside the toggle (HTML); '' for none."""
        self.note.object = f'<div class="regions-note">{note}</div>' if note else ""

    def _failed(self, what: str, exc: Exception) -> str:
        """``Session.failure``'s message (logged), as HTML."""
        return html.escape(plain(self.session.failure(what, exc)))

    def _render_regions(self, rgb: np.ndarray, head: int | None) -> None:
        """The regions of the chosen feature on both maps and each shown map's scores (``head``: the head map's
        head, None without one), when *Annotations* is on and this image has regions; else the note says why not."""
        session, s = self.session, self.session.selection
        usable, why = regions.status(self.annotated, s.image, session.file_name(s.image), len(session.index.images))
        label = "Annotations" if usable else ("No regions here" if self.annotated else "No annotations")
        self.toggle.param.update(disabled=not usable, name=label)  # it keeps its state for the next image
        self.feature_select.disabled = not usable
        on = usable and self.annotations
        self._say(self.annotations_problem or why)
        if not on:
            self.overlays.show_regions(figures.empty_regions())
            self.fused_scores.visible = self.head_scores.visible = False
            return
        try:
            view = data.regions_in_view(session.root, s.image, s.model).of_feature(self.feature)
        except Exception as exc:
            self._say(self._failed(f"place the regions on the {s.model} input", exc))
            self.overlays.show_regions(figures.empty_regions())
            self.fused_scores.visible = self.head_scores.visible = False
            return
        features_here = self.annotated.get(s.image, ())
        self._say(regions.regions_note(view, self.feature, session.file_name(s.image), features_here))
        self.overlays.show_regions(regions.outline_data(view, rgb.shape[0] / rgb.shape[1], self.colours))
        try:
            scores = data.image_scores(session.root, s.image, s.model, s.method, s.layer, self.feature)
        except Exception as exc:
            failed = self._failed(f"load the {s.model}/{s.method} scores", exc)
            self.fused_scores.object = self.head_scores.object = f"<small>{failed}</small>"
        else:
            fused = "fused" if session.show_heads else state.method_label(s.method)  # "fused" means nothing there
            self.fused_scores.object = regions.scores_html(scores, None, self.feature, fused)
            if head is not None:
                self.head_scores.object = regions.scores_html(scores, head, self.feature, f"head {head}")
        self.fused_scores.visible = True
        self.head_scores.visible = head is not None

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
            pn.Row(self.toggle, self.feature_select, self.note, sizing_mode="stretch_width"),
            pn.Row(
                pn.Column(self.fused_holder, self.fused_scores, margin=0),
                pn.Column(self.head_holder, self.head_scores, visible=p.head_panel, margin=0),
            ),
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
    outline = views.mask_outline(views.mass_mask(values)) if mode == "contour" else figures.NO_SEGMENTS
    return figures.MapLayer(views.shown_values(values, mode), high, title, vmin=low, outline=outline)


def grid_layout(count: int, grid_shape: tuple[int, ...]) -> tuple[int, int]:
    """(tile px, columns) of the head grid: tiles of ``GRID_TILE_PX`` on their longer side, as many per row as
    fit in ``GRID_WIDTH`` (rows wrap: 13 tiles of 96 px make rows of 7 and 6)."""
    grid_h, grid_w = grid_shape
    tile_w = GRID_TILE_PX if grid_w >= grid_h else round(GRID_TILE_PX * grid_w / grid_h)
    return tile_w, max(1, min(count, GRID_WIDTH // tile_w))
