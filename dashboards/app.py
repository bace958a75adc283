"""Per-head attention explorer: ``panel serve dashboards/app.py`` (or ``ssl-attention serve``), served at /app.

This module only composes: one ``Session`` per browser session (``dashboards.session``: the selection, the
shared settings, the URL), the controls column (``dashboards.controls``), the tabs in ``TABS`` (one module
each under ``dashboards/tabs/``), the banners above them, and the pages shown instead when the warehouse
cannot be shown (``dashboards.pages``). Data comes only through ``dashboards.data``.

Adding a tab: a module under ``dashboards/tabs/`` with a ``Tab`` subclass, and one line in ``TABS``.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from pathlib import Path

import holoviews as hv
import panel as pn

from dashboards import data
from dashboards.controls import Controls
from dashboards.pages import TITLE, EmptyWarehouse, WarehouseProblem, skipped_markdown
from dashboards.session import Session
from dashboards.state import Selection
from dashboards.tabs import Tab
from dashboards.tabs.alignment import AlignmentTab
from dashboards.tabs.compare import CompareTab
from dashboards.tabs.glossary import GlossaryTab
from dashboards.tabs.heads import HeadsTab
from dashboards.tabs.overview import OverviewTab
from dashboards.tabs.statistics import StatisticsTab
from ssl_attention.query import EmptyWarehouseError
from ssl_attention.settings import resolve_warehouse, warehouse_location
from ssl_attention.warehouse.paths import WarehouseLocationError

hv.extension("bokeh", logo=False)
pn.extension("tabulator", notifications=False)

log = logging.getLogger(__name__)

# The explorer's tabs, in order; the first is open by default.
TABS: list[type[Tab]] = [
    HeadsTab,
    OverviewTab,
    StatisticsTab,
    AlignmentTab,
    CompareTab,
    GlossaryTab,
]


class AttentionExplorer(pn.viewable.Viewer):
    """Fused vs. per-head attention maps over the warehouse, with the view kept in the URL."""

    def __init__(self, loaded: data.Loaded, tabs: Sequence[type[Tab]]) -> None:
        super().__init__()
        keys = [tab.key for tab in tabs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"tab keys must be unique; got {', '.join(keys)}")
        self.session = Session(loaded, keys)
        self.controls = Controls(self.session)
        self.tabs = {tab.key: tab(self.session) for tab in tabs}

    def shown_models(self, selection: Selection, tab: str) -> list[str]:
        """The models whose maps are on screen: those of the open tab."""
        return self.tabs[tab].shown_models(selection)

    def banner(self, selection: Selection, tab: str) -> str:
        return self.session.random_weights_markdown(self.shown_models(selection, tab))

    def is_random(self, selection: Selection, tab: str) -> bool:
        return bool(self.session.random_models(self.shown_models(selection, tab)))

    def _tabs(self) -> pn.Tabs:
        session, keys = self.session, list(self.tabs)
        tabs = pn.Tabs(
            *((tab.label, tab) for tab in self.tabs.values()),
            dynamic=True,  # only the open tab is in the page
            active=keys.index(session.tab),
            sizing_mode="stretch_width",
        )
        tabs.param.watch(lambda event: setattr(session, "tab", keys[event.new]), "active")
        session.param.watch(lambda event: setattr(tabs, "active", keys.index(event.new)), "tab")
        return tabs

    def __panel__(self) -> pn.viewable.Viewable:
        session, p = self.session, self.session.param
        banner = pn.pane.Alert(
            pn.bind(self.banner, p.selection, p.tab),
            alert_type="warning",
            visible=pn.bind(self.is_random, p.selection, p.tab),
            margin=(5, 10),
        )
        problem = pn.pane.Alert(p.problem, alert_type="danger", visible=p.problem.rx.bool(), margin=(5, 10))
        notice = pn.pane.Alert(
            p.notice.rx.pipe(lambda text: f"**Not as asked in the URL** — {html.escape(text)}."),
            alert_type="info",
            visible=p.notice.rx.bool(),
            margin=(5, 10),
            name="url-notice",
            css_classes=["url-notice"],
        )
        skipped = pn.pane.Alert(
            skipped_markdown(session.root, session.loaded.skipped),
            alert_type="warning",
            visible=bool(session.loaded.skipped),
            margin=(5, 10),
        )
        header = pn.pane.HTML(
            f"<h2 style='margin:4px 0'>{TITLE}</h2><small>warehouse: <code>{html.escape(session.root)}</code></small>",
            margin=(0, 10),
        )
        return pn.Column(
            header,
            session.browser_url,
            banner,
            notice,
            problem,
            skipped,
            pn.Row(self.controls, self._tabs(), sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
        )


def create_app(warehouse: str | Path | None = None) -> pn.viewable.Viewer:
    """One explorer per browser session; the empty-warehouse message when there is nothing to show; the
    what-failed message when the warehouse cannot be read. Never raises: a user never sees a traceback."""
    location = warehouse_location(warehouse)
    try:
        root = resolve_warehouse(location)
    except WarehouseLocationError as exc:  # not a local path or file:// URL
        return EmptyWarehouse(warehouse=location, detail=str(exc), unsupported=True)
    except Exception as exc:
        log.exception("cannot locate the warehouse %s", location)
        return WarehouseProblem(warehouse=location, failed="locating it", error=data.one_line(exc))
    try:
        loaded = data.load_index(root)
    except EmptyWarehouseError:
        return EmptyWarehouse(warehouse=str(root))
    except Exception as exc:  # QueryError, OSError, or whatever a damaged file makes the reader raise
        log.exception("cannot read the warehouse at %s", root)
        failed = "reading the list of models and images"
        return WarehouseProblem(warehouse=str(root), failed=failed, error=data.one_line(exc))
    if loaded.index.empty:
        if loaded.skipped:  # maps are there, but none can be read
            errors = "; ".join(f"{key}: {why}" for key, why in sorted(loaded.skipped.items()))
            return WarehouseProblem(warehouse=str(root), failed="reading the attention maps", error=errors)
        return EmptyWarehouse(warehouse=str(root))
    try:
        viewer = AttentionExplorer(loaded, TABS)
        if pn.state.location is not None:
            viewer.session.sync_url(pn.state.location.query_params)
    except Exception as exc:
        log.exception("cannot build the dashboard over %s", root)
        return WarehouseProblem(warehouse=str(root), failed="building the first view", error=data.one_line(exc))
    return viewer


if pn.state.served:
    create_app().servable(title=TITLE)
