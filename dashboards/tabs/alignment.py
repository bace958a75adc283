"""The alignment tab: how well each head's map lies on the annotated regions, against the fused map and the two
baselines (uniform, centre Gaussian), for the selected model and method, one metric and one feature.

- a layers x heads grid of the mean score (the fused map and the baselines in columns of their own);
- the selected layer's ranking (mean, median, 95 % bootstrap CI), a sortable table;
- the selected layer's head x feature matrix;
- the selected head's map on its best-scoring images, beside the fused map of the same images.

Clicking a cell of the grid selects its layer and head, a row of the table its head, a cell of the matrix its
head and feature. Methods without heads (the registry's ``per_head`` False) show the fused map against the
baselines only. Without alignment for the selection the tab says how to add annotations. The tab draws only
while it is open (its figures are Bokeh models updated in place: ``dashboards.heatgrid``, ``figures``).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import panel as pn
import param
from bokeh.models import ColumnDataSource, NumberFormatter, Range1d

from dashboards import alignment_views as av
from dashboards import data, export, figures, state
from dashboards.heatgrid import HeatGrid
from dashboards.session import Session, plain
from dashboards.tabs.base import Tab
from dashboards.tabs.heads import layer_of
from ssl_attention.query import MissingDataError

EXEMPLARS = 4  # best-scoring images shown for the selected head
EXEMPLAR_FRAME = 170  # px, longer side of each exemplar map's data area: a pair fits from a 1024-px window up
CONTENT_WIDTH = 700  # px the tab's parts may take beside the controls in a 1024-px window
TABLE_WIDTH = 600  # px, the ranking table's note (the table fits its data: about 590 px)
TABLE_FORMATTERS = {name: NumberFormatter(format="0.0000") for name in ("mean", "ci_low", "ci_high", "median")}
INTRO = (
    "How much of each map lies on the annotated regions: the mean over the annotated images of the chosen "
    "metric, per layer and head, beside the fused map and two baselines (uniform, a centre Gaussian). Click a "
    "cell, a row of the ranking or a cell of the matrix to see that head's best images."
)


class ExemplarPair:
    """One image: the selected head's map and the fused map over it (linked zoom), and a caption."""

    def __init__(self, index: int) -> None:
        self.x_range = Range1d(0.0, 1.0, bounds=(0.0, 1.0))
        self.y_range = Range1d(0.0, 1.0, bounds=(0.0, 1.0))
        self.base = ColumnDataSource({"image": [np.zeros((1, 1), np.uint32)], "dw": [1.0], "dh": [1.0]})
        self.head = figures.OverlayFigure(self.x_range, self.y_range, self.base, f"exemplar-{index}-head")
        self.fused = figures.OverlayFigure(self.x_range, self.y_range, self.base, f"exemplar-{index}-fused")
        for figure in (self.head.figure, self.fused.figure):
            figure.toolbar.autohide = True  # shown on hover: at this size it would sit on the title
        self.caption = pn.pane.HTML("", margin=(0, 10), css_classes=["exemplar-caption"], width=2 * EXEMPLAR_FRAME)
        self.head_holder = pn.Column(pn.pane.Bokeh(self.head.figure), margin=0)
        self.fused_holder = pn.Column(pn.pane.Bokeh(self.fused.figure), margin=0)
        maps = pn.Row(self.head_holder, self.fused_holder, margin=0)
        self.layout = pn.Column(self.caption, maps, margin=(0, 0, 8, 0))
        self._aspect = 0.0
        self._rgb: np.ndarray | None = None

    def render(
        self,
        rgb: np.ndarray,
        head: figures.MapLayer | None,
        fused: figures.MapLayer,
        cmap: str,
        alpha: float,
        value_label: str,
    ) -> None:
        """``head=None``: the fused map alone (never the same map twice)."""
        aspect = rgb.shape[0] / rgb.shape[1]
        if aspect != self._aspect:
            self._aspect = aspect
            self.y_range.update(start=0.0, end=aspect, bounds=(0.0, aspect))
            self.x_range.update(start=0.0, end=1.0)
            width, height = figures.frame_size(aspect, EXEMPLAR_FRAME)
            for figure in (self.head.figure, self.fused.figure):
                figure.update(frame_width=width, frame_height=height)
        if self._rgb is None or not np.array_equal(self._rgb, rgb):
            self._rgb = rgb
            self.base.data = {"image": [figures.rgba_image(rgb)], "dw": [1.0], "dh": [aspect]}
        self.fused.render(aspect, fused, cmap, alpha, value_label)
        if head is not None:
            self.head.render(aspect, head, cmap, alpha, value_label)
        self.head_holder.visible = head is not None


def shrink(rgb: np.ndarray, longer: int) -> np.ndarray:
    """Every k-th pixel, so that the longer side is at most ``longer`` px (the frame it is drawn in): four
    224-px inputs are 800 KB of RGBA per switch, a quarter of that at 112 px."""
    step = max(1, math.ceil(max(rgb.shape[:2]) / longer))
    return rgb[::step, ::step] if step > 1 else rgb


class AlignmentTab(Tab):
    key = "alignment"
    label = "Alignment"
    url_keys: ClassVar[Mapping[str, str]] = {"metric": "metric", "feature": "feature"}

    metric = param.Selector(objects=av.metric_options(), default="iou_50", doc="the score shown")
    feature = param.Selector(
        objects=["all"], default="all", check_on_set=True, doc="all regions, or one feature's (per model/method)"
    )
    available = param.Boolean(default=False, doc="the selection has alignment scores")
    missing = param.String(default="", doc="how to add annotations (Markdown), when not available")
    problem = param.String(default="", doc="what failed to load (Markdown); '' when fine")
    note = param.String(default="", doc="what the parts show (HTML)")

    def __init__(self, session: Session, **params: Any) -> None:
        super().__init__(session, **params)
        self.grid = HeatGrid(self.on_grid_tap, "alignment-grid", max_cell=28, max_width=460)
        self.matrix = HeatGrid(self.on_matrix_tap, "alignment-matrix", max_cell=24, max_width=320)
        self.grid_holder = pn.Column(pn.pane.Bokeh(self.grid.figure), margin=0)
        self.matrix_holder = pn.Column(pn.pane.Bokeh(self.matrix.figure), margin=0)
        self.ranking = pn.widgets.Tabulator(
            pd.DataFrame({name: [] for name in av.RANKING_COLUMNS}),
            show_index=False,
            disabled=True,
            selectable=False,
            titles=dict(av.RANKING_TITLES),
            formatters=TABLE_FORMATTERS,
            layout="fit_data_table",
            css_classes=["alignment-ranking"],
        )
        self.ranking.on_click(self.on_ranking_click)
        self.pairs = [ExemplarPair(k) for k in range(EXEMPLARS)]
        self.exemplar_note = pn.pane.HTML("", margin=(0, 10), max_width=CONTENT_WIDTH, sizing_mode="stretch_width")
        self._frame: pd.DataFrame | None = None
        self._matrix: Any = None
        self._score: av.ScoreGrid | None = None
        self._drawn: tuple[Any, ...] | None = None
        self.downloads = [
            self._download(self.ranking_export, "ranking", fmt, label)
            for fmt, label in (("csv", "Ranking CSV"), ("parquet", "Ranking Parquet"))
        ] + [
            self._download(self.matrix_export, "matrix", fmt, label)
            for fmt, label in (("csv", "Matrix CSV"), ("parquet", "Matrix Parquet"))
        ]
        session.param.watch(self.on_shape, ["shape_key"])
        # after on_shape (precedence 0) when a switch changes both: the features are those of the new selection
        session.param.watch(self.render, ["tab", "selection", "cmap", "opacity", "scale", "contrast"], precedence=1)
        self.param.watch(self.render, ["metric", "feature"])
        self.on_shape()

    # --- what the selection offers ---------------------------------------------------------------------------

    def on_shape(self, *_: Any) -> None:
        """The features of the selected (model, method), or why there are none. Runs before the URL's metric and
        feature are applied (``Session.apply_query`` applies the selection first), so a URL is checked against
        the features of the model and method it names."""
        s = self.session.selection
        try:
            features = data.alignment_features(self.session.root, s.model, s.method)
            available, missing = True, ""
        except MissingDataError as exc:
            features, available = ("all",), False
            missing = av.no_alignment_markdown(s.model, s.method, self.session.root, data.one_line(exc))
        except Exception as exc:
            features, available = ("all",), False
            missing = self.session.failure(f"load the alignment of {s.model}/{s.method}", exc)
        changed = list(features) != list(self.param.feature.objects)
        if changed:
            keep = self.feature if self.feature in features else "all"
            with param.parameterized.discard_events(self):
                self.param.feature.objects = list(features)
                self.feature = keep
        self.param.update(available=available, missing=missing)
        if changed:
            self.param.trigger("feature")  # the select shows the new options
        self._drawn = None  # drawn for another model or method: draw again (when open)
        self.render()

    # --- drawing ---------------------------------------------------------------------------------------------

    def render(self, *_: Any) -> None:
        if not self.is_open:
            return
        s, session = self.session.selection, self.session
        key = (s, session.cmap, session.opacity, session.scale, session.contrast, self.metric, self.feature)
        if key == self._drawn:
            return
        self._drawn = key
        with pn.io.hold():
            self._render()

    def _render(self) -> None:
        if not self.available:
            return
        session, s = self.session, self.session.selection
        info = session.model_info
        per_head = state.has_heads(info, s.method)
        metric, feature = self.metric, self.feature
        try:
            table = data.alignment_grid(session.root, s.model, s.method, metric, feature)
            ranking = data.head_ranking(session.root, s.model, s.method, s.layer, metric, feature)
            matrix = data.head_feature_matrix(session.root, s.model, s.method, s.layer, metric)
        except Exception as exc:
            self.problem = session.failure(f"load the alignment of {s.model}/{s.method}", exc)
            return
        self.problem = ""
        method_label = state.method_label(s.method)
        layers = info.layers_of(s.method)
        score = av.score_grid(table, layers, info.num_heads, per_head)
        self._score = score
        where = "all regions" if feature == "all" else f"“{feature}”"
        labels = [av.entry_label(e, per_head, method_label) for e in score.entries]
        skip = [k for k, e in enumerate(score.entries) if e == av.SPACER]
        short = av.metric_short(metric)
        title = f"Mean {short} · {where}"
        row_labels = [info.layer_label(x) for x in layers]
        axes = ("head · fused · baselines" if per_head else "map", "stage" if info.num_heads == 0 else "layer")
        self.grid.render(score.values, row_labels, labels, session.cmap, title, short, skip, axes)
        shown = s.head if per_head else None
        self.grid.select((layers.index(s.layer), score.column(shown)) if s.layer in layers else None)

        frame = av.ranking_frame(ranking)
        if self._frame is None or not frame.equals(self._frame):
            self._frame = frame
            self.ranking.value = frame
        self._matrix = matrix
        rows = [av.entry_label(e, per_head, method_label) for e in matrix.entries]
        values = matrix.values if matrix.values.size else np.full((len(matrix.entries), 1), np.nan)
        features = list(matrix.features) or ["—"]
        axes = ("feature", "head · fused · baselines" if per_head else "map")
        self.matrix.render(values, rows, features, session.cmap, f"{short} per feature", short, axis_labels=axes)
        entry = av.head_entry(shown)
        cell_row = matrix.entries.index(entry) if entry in matrix.entries else None
        cell_col = matrix.features.index(feature) if feature in matrix.features else None
        self.matrix.select((cell_row, cell_col) if cell_row is not None and cell_col is not None else None)
        layer = info.layer_label(s.layer)
        self.note = (  # changes with the layer and the method only (see _render_exemplars)
            f"<b>{html.escape(layer)}</b>: ranking of {'every head, ' if per_head else ''}the fused map and the "
            "baselines on the metric and feature chosen above"
            + ("" if per_head else f" — {html.escape(method_label)} has no per-head maps")
        )
        self._render_exemplars(shown, per_head)

    def _render_exemplars(self, head: int | None, per_head: bool) -> None:
        session, s = self.session, self.session.selection
        try:
            best = data.exemplars(session.root, s.model, s.method, s.layer, head, self.feature, self.metric, EXEMPLARS)
        except Exception as exc:
            self.exemplar_note.object = html.escape(plain(session.failure("load the exemplars", exc)))
            best = None
        names = [] if best is None else best["image_id"].to_pylist()
        values = [] if best is None else best["value"].to_pylist()
        shared, mode = session.scale == "shared", session.contrast
        short = av.metric_short(self.metric)
        which = state.head_label(head) if per_head else state.method_label(s.method)
        # what a metric or feature switch changes goes into the figures' titles (Bokeh properties); the HTML
        # captions and heading change with the images and the head only (an HTML update costs ~4 ms a pane)
        for k, pair in enumerate(self.pairs):
            if k >= len(names):
                pair.layout.visible = False
                continue
            image = names[k]
            pair.caption.object = f"<b>{k + 1}. {html.escape(session.file_name(image))}</b>"
            pair.layout.visible = True
            try:
                grid = data.head_grid(session.root, image, s.model, s.method, s.layer)
            except Exception as exc:
                pair.caption.object += " — " + html.escape(plain(session.failure(f"load the maps of {image}", exc)))
                continue
            score = f"{short} {'—' if values[k] is None else f'{values[k]:.3f}'}"
            fused_title = f"{which} · {score}" if head is None else state.head_label(None)
            fused = layer_of(grid.maps, grid.maps[grid.heads.index(None)], shared, mode, fused_title)
            shown = None
            if head is not None and head in grid.heads:
                shown = layer_of(grid.maps, grid.maps[grid.heads.index(head)], shared, mode, f"{which} · {score}")
            rgb = shrink(session.rgb(image, s.model), EXEMPLAR_FRAME)
            pair.render(rgb, shown, fused, session.cmap, session.opacity, session.value_label)
        if best is not None:
            heading = f"<b>Best images of {html.escape(which)}</b> at {html.escape(session.layer_label())}"
            heading += " (on the metric and feature chosen above)"
            heading += ", each beside the fused map" if head is not None else ""
            self.exemplar_note.object = heading + (": no scored image." if not names else "")

    # --- clicks ----------------------------------------------------------------------------------------------

    def _select_entry(self, entry: str, layer: int | None = None) -> None:
        head = av.entry_head(entry)
        updates: dict[str, Any] = {} if layer is None else {"layer": layer}
        if not isinstance(head, str):  # a baseline has no map of its own: keep the head shown
            updates["head"] = state.FUSED_VALUE if head is None else head
        if updates:
            self.session.param.update(**updates)

    def on_grid_tap(self, row: int, column: int) -> None:
        score = self._score
        if score is None or not (0 <= row < len(score.layers) and 0 <= column < len(score.entries)):
            return
        entry = score.entries[column]
        if entry != av.SPACER:
            self._select_entry(entry, score.layers[row])

    def on_matrix_tap(self, row: int, column: int) -> None:
        matrix = self._matrix
        if matrix is None or not (0 <= row < len(matrix.entries) and 0 <= column < len(matrix.features)):
            return
        with pn.io.hold():
            self.feature = matrix.features[column]
            self._select_entry(matrix.entries[row])

    def on_ranking_click(self, event: Any) -> None:
        frame = self._frame
        if frame is not None and event.row is not None and 0 <= event.row < len(frame):
            self._select_entry(str(frame["entry"].iloc[event.row]))

    # --- exports ---------------------------------------------------------------------------------------------

    def _stem(self, what: str) -> str:
        s = self.session.selection
        feature = "".join(c if c.isalnum() else "_" for c in self.feature)
        return f"{s.model}_{s.method}_layer{s.layer}_{self.metric}" + (f"_{feature}" if what == "ranking" else "")

    def ranking_export(self, fmt: str) -> export.Download:
        s = self.session.selection
        ranking = data.head_ranking(self.session.root, s.model, s.method, s.layer, self.metric, self.feature)
        frame = av.ranking_frame(ranking)
        table = av.ranking_table(frame, s.model, s.method, s.layer, self.metric, self.feature)
        return export.Download(f"{self._stem('ranking')}_ranking.{fmt}", export.table_bytes(table, fmt))

    def matrix_export(self, fmt: str) -> export.Download:
        s = self.session.selection
        matrix = data.head_feature_matrix(self.session.root, s.model, s.method, s.layer, self.metric)
        table = av.matrix_table(matrix)
        return export.Download(f"{self._stem('matrix')}_matrix.{fmt}", export.table_bytes(table, fmt))

    def _download(self, build: Any, what: str, fmt: str, label: str) -> pn.widgets.FileDownload:
        widget = pn.widgets.FileDownload(label=label, width=130, margin=(5, 4), css_classes=[f"{what}-{fmt}"])

        def callback() -> Any:
            download = export.safely(self.session, lambda _: build(fmt), f"the {what} as {fmt.upper()}")
            widget.filename = download.filename
            return download.data

        widget.callback = callback
        return widget

    # --- layout ----------------------------------------------------------------------------------------------

    def __panel__(self) -> pn.viewable.Viewable:
        p = self.param
        metric = pn.widgets.Select.from_param(p.metric, label="Metric", width=260)
        feature = pn.widgets.Select.from_param(p.feature, label="Feature", width=200)
        for widget in (metric, feature):
            widget._debounce = 0  # as the controls' selects: Panel's 50 ms wait is pure latency here
        pickers = pn.FlexBox(
            metric,
            feature,
            max_width=CONTENT_WIDTH,
            sizing_mode="stretch_width",
        )
        ranking = pn.Column(
            pn.pane.HTML(p.note, margin=(0, 10), max_width=TABLE_WIDTH, sizing_mode="stretch_width"),
            self.ranking,
            pn.Row(*self.downloads[:2], margin=(0, 5)),
            margin=(0, 10, 10, 0),
        )
        matrix = pn.Column(
            pn.pane.HTML("<b>Head × feature</b> (this layer)", margin=(0, 10)),
            self.matrix_holder,
            pn.Row(*self.downloads[2:], margin=(0, 5)),
            margin=(0, 10, 10, 0),
        )
        body = pn.Column(
            pn.pane.HTML(INTRO, margin=(0, 10), max_width=CONTENT_WIDTH, sizing_mode="stretch_width"),
            pickers,
            pn.pane.Alert(p.problem, alert_type="danger", visible=p.problem.rx.bool(), margin=(5, 10)),
            pn.FlexBox(self.grid_holder, matrix, ranking, sizing_mode="stretch_width"),
            self.exemplar_note,
            pn.FlexBox(*(pair.layout for pair in self.pairs), sizing_mode="stretch_width"),
            visible=p.available,
            sizing_mode="stretch_width",
            margin=0,
        )
        message = pn.pane.Markdown(
            p.missing,
            visible=p.available.rx.not_(),
            max_width=CONTENT_WIDTH,
            sizing_mode="stretch_width",
            css_classes=["alignment-missing"],
        )
        self.render()
        return pn.Column(message, body, sizing_mode="stretch_width")
