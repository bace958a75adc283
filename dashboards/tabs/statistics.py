"""The statistics tab: the selection's statistics (fused and selected head) as a table, and one statistic
over layers × (fused + heads) as a HoloViews heatmap, for this image or averaged over all images."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any, ClassVar

import holoviews as hv
import numpy as np
import panel as pn
import param

from dashboards import data, state, views
from dashboards.session import Session, plain
from dashboards.tabs.base import Tab
from ssl_attention.query import STATISTICS

STAT_LABELS = {
    "entropy_norm": "Entropy / log N",
    "entropy": "Entropy (nats)",
    "mean_dist_frac": "Mean distance (fraction of diagonal)",
    "mean_dist_px": "Mean distance (px)",
    "area60_frac": "60%-mass area (fraction of patches)",
    "top1_mass": "Top-1 patch mass",
    "top1pct_mass": "Top-1% mass",
    "pearson_fused": "Correlation with fused",
    "jsd_fused": "Jensen–Shannon divergence from fused",
    "prefix_mass": "Prefix (CLS + register) mass",
    "register_mass": "Register mass",
    "centroid_x_px": "Centre of mass x (px)",
    "centroid_y_px": "Centre of mass y (px)",
    "total_mass": "Patch mass",
}
SCOPES = {"This image": "image", "Mean over all images": "all"}
STATS_CSS = """
table.ssl-stats { border-collapse: collapse; font-size: 12px; }
table.ssl-stats th, table.ssl-stats td { padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: right; }
table.ssl-stats th:first-child { text-align: left; font-weight: normal; }
"""


def message_plot(text: str, width: int = 400, height: int = 120) -> hv.Text:
    return hv.Text(0.5, 0.5, text).opts(
        width=width, height=height, xaxis=None, yaxis=None, toolbar=None, text_font_size="10pt"
    )


class StatisticsTab(Tab):
    key = "statistics"
    label = "Statistics"
    url_keys: ClassVar[Mapping[str, str]] = {"stat": "stat", "scope": "scope"}

    stat = param.Selector(objects={v: k for k, v in STAT_LABELS.items() if k in STATISTICS}, default="entropy_norm")
    scope = param.Selector(objects=SCOPES, default="image")
    # what the heatmap draws, updated only while the tab is open (see OverviewTab.view_key)
    view_key = param.Tuple(default=None, length=2, allow_None=True, doc="(selection, cmap)")

    def __init__(self, session: Session, **params: Any) -> None:
        super().__init__(session, **params)
        session.param.watch(self.update_key, ["tab", "selection", "cmap"])

    def update_key(self, *_: Any) -> None:
        if self.is_open:
            self.view_key = (self.session.selection, self.session.cmap)

    def plot(self, view_key: tuple[state.Selection, str], stat: str, scope: str) -> hv.HeatMap | hv.Text:
        selection, cmap = view_key
        session = self.session
        image = selection.image if scope == "image" else None
        try:
            grid = data.stat_grid(session.root, selection.model, selection.method, stat, image)
        except Exception as exc:
            what = f"load the {STAT_LABELS.get(stat, stat)} statistic of {selection.model}/{selection.method}"
            return message_plot(plain(session.failure(what, exc)), width=640)
        labels = [session.layer_label(layer) for layer in grid.layers]
        where = session.file_name(selection.image) if image else "mean over all images"
        title = f"{STAT_LABELS.get(stat, stat)} · {selection.model}/{selection.method} · {where}"
        method = state.method_label(selection.method)
        return views.stat_heatmap_element(grid.values, labels, grid.heads, stat, cmap, title, method)

    def pane(self, shape_key: tuple[str, str], tab: str) -> pn.pane.HoloViews:
        self.skip_unless_open(tab)
        self.update_key()
        p = self.param
        plot = hv.DynamicMap(pn.bind(self.plot, view_key=p.view_key, stat=p.stat, scope=p.scope))
        return pn.pane.HoloViews(plot, linked_axes=False)

    def table(self, selection: state.Selection, tab: str) -> str:
        """The statistics of the selected layer's fused map (and selected head), as an HTML table."""
        self.skip_unless_open(tab)
        session = self.session
        info = session.index.models[selection.model]
        fused = "fused" if state.has_heads(info, selection.method) else state.method_label(selection.method)
        rows = [(None, fused)] + ([(selection.head, f"head {selection.head}")] if selection.head is not None else [])
        columns = []
        try:
            for head, label in rows:
                stats = data.head_statistics(
                    session.root, selection.image, selection.model, selection.method, selection.layer, head
                )
                columns.append((label, stats))
        except Exception as exc:
            what = f"load the statistics of {selection.model}/{selection.method}"
            return f"<p>{html.escape(plain(session.failure(what, exc)))}</p>"
        header = "".join(f"<th>{html.escape(label)}</th>" for label, _ in columns)
        body = []
        for key, name in STAT_LABELS.items():
            cells = []
            for _, stats in columns:
                value = stats.get(key)
                cells.append("<td>—</td>" if value is None or not np.isfinite(value) else f"<td>{value:.4g}</td>")
            body.append(f"<tr><th>{html.escape(name)}</th>{''.join(cells)}</tr>")
        where = html.escape(f"{selection.model}/{selection.method}, {info.layer_label(selection.layer)}")
        return (
            f"<h4>This selection ({where})</h4><table class='ssl-stats'><tr><th></th>{header}</tr>"
            f"{''.join(body)}</table>"
        )

    def __panel__(self) -> pn.viewable.Viewable:
        session, p = self.session.param, self.param
        return pn.FlexBox(  # the heatmap wraps below the table in a narrow window
            pn.pane.HTML(pn.bind(self.table, session.selection, session.tab), width=360, stylesheets=[STATS_CSS]),
            pn.Column(
                pn.Row(
                    pn.widgets.Select.from_param(p.stat, label="Statistic", width=280),
                    pn.widgets.RadioButtonGroup.from_param(p.scope, margin=(28, 10)),
                ),
                pn.bind(self.pane, session.shape_key, session.tab),
            ),
            sizing_mode="stretch_width",
        )
