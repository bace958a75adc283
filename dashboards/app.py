"""Per-head attention explorer: ``panel serve dashboards/app.py`` (or ``ssl-attention serve``), served at /app.

The warehouse is ``$SSL_ATTENTION_WAREHOUSE`` or ``data/warehouse``. Data comes only through the query layer
(``dashboards.data``); the selection rules live in ``dashboards.state``; the per-click views (overlays, head
grid, image picker) in ``dashboards.figures``; the HoloViews views of the other tabs in ``dashboards.views``.
"""

from __future__ import annotations

import contextlib
import html
import io
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import holoviews as hv
import numpy as np
import panel as pn
import param
from bokeh.models import CustomJSTickFormatter
from PIL import Image

from dashboards import data, export, figures, state, url_sync, views
from dashboards.glossary import empty_warehouse_markdown, glossary_markdown, unsupported_warehouse_markdown
from ssl_attention.query import STATISTICS, EmptyWarehouseError, HeadGrid, LayerHeadMaps, QueryError
from ssl_attention.render import COLORMAPS, overlay
from ssl_attention.settings import resolve_warehouse, warehouse_location
from ssl_attention.warehouse.paths import WarehouseLocationError

hv.extension("bokeh", logo=False)
pn.extension(notifications=False)

log = logging.getLogger(__name__)

TITLE = "SSL attention: fused and individual heads"
TABS = ("heads", "overview", "statistics", "compare", "glossary")
TAB_LABELS = {
    "heads": "Heads",
    "overview": "Layers × heads",
    "statistics": "Statistics",
    "compare": "Compare models",
    "glossary": "Glossary",
}
THUMB_COLUMNS = 4
THUMB_PAGE = 12
THUMB_PX = 64
GRID_WIDTH = 880  # px available to the head grid
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
COMPARE_METHODS = {"CLS-like (cls · probe · Grad-CAM)": "cls", "Mean attention": "mean", "Rollout": "rollout"}
SCOPES = {"This image": "image", "Mean over all images": "all"}

# URL query keys -> viewer parameters (selection keys are resolved by state.from_query, the rest by param;
# dashboards/url_sync.py keeps the URL and the view in step)
DISPLAY_KEYS = {
    "cmap": "cmap",
    "opacity": "opacity",
    "scale": "scale",
    "stat": "stat",
    "scope": "scope",
    "depth": "depth",
    "compare": "compare_method",
    "tab": "tab",
}


def _message_plot(text: str, width: int = 400, height: int = 120) -> hv.Text:
    return hv.Text(0.5, 0.5, text).opts(
        width=width, height=height, xaxis=None, yaxis=None, toolbar=None, text_font_size="10pt"
    )


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _plain(text: str) -> str:
    """A Markdown message for a plot title or text element (no code spans there)."""
    return text.replace("`", "")


def _set_options(parameter: param.Selector, options: dict[str, Any]) -> None:
    """Set a selector's labelled options unless they are already those (a change re-sends the widget)."""
    if dict(parameter.names or {}) != options or list(parameter.objects) != list(options.values()):
        parameter.objects = options


class AttentionExplorer(pn.viewable.Viewer):
    """Fused vs. per-head attention maps over the warehouse, with the selection kept in the URL."""

    # the controls (validated and kept consistent by _apply; see dashboards/state.py for the rules)
    image = param.Selector(objects=[], doc="image_id of the image shown")
    model = param.Selector(objects=[])
    method = param.Selector(objects=[])
    layer = param.Integer(default=0, bounds=(0, 1))
    head = param.Selector(objects={state.FUSED_LABEL: state.FUSED_VALUE}, default=state.FUSED_VALUE)
    # display
    cmap = param.Selector(objects=list(COLORMAPS), default="viridis", doc="colormap of the maps")
    opacity = param.Number(default=0.6, bounds=(0.0, 1.0), step=0.05)
    scale = param.Selector(objects={"Shared": "shared", "Independent": "independent"}, default="shared")
    stat = param.Selector(objects={v: k for k, v in STAT_LABELS.items() if k in STATISTICS}, default="entropy_norm")
    scope = param.Selector(objects=SCOPES, default="image")
    depth = param.Number(default=1.0, bounds=(0.0, 1.0), step=0.05, doc="relative depth for the model comparison")
    compare_method = param.Selector(objects=COMPARE_METHODS, default="cls")
    tab = param.Selector(objects=list(TABS), default="heads")

    # derived state, set by _apply only. Each view depends on the narrowest key that changes it.
    selection = param.ClassSelector(class_=state.Selection, default=None)
    image_key = param.String(default="", doc="image_id shown (model comparison)")
    shape_key = param.Tuple(default=("", ""), length=2, doc="(model, method): the overview's shape")
    show_heads = param.Boolean(default=True, doc="the method has per-head maps: head selector, head map and grid")
    multi_layer = param.Boolean(default=True)
    problem = param.String(default="", doc="why the maps on screen could not be loaded (Markdown); '' when fine")
    # What the HoloViews tabs draw, updated only while their tab is open: their plots stay alive (and would
    # redraw, ~60 ms each) after a visit, so a hidden tab must not see the selection change.
    overview_key = param.Tuple(default=None, length=3, allow_None=True, doc="(selection, cmap, scale)")
    stats_key = param.Tuple(default=None, length=2, allow_None=True, doc="(selection, cmap)")

    def __init__(self, loaded: data.Loaded, **params: Any) -> None:
        super().__init__(**params)
        self._loaded = loaded
        self._index = loaded.index
        self._root = str(loaded.root)
        self._applying = False
        self._file_names = {i.image_id: i.file_name for i in self._index.images}
        self._positions = {i.image_id: k for k, i in enumerate(self._index.images)}
        self._taps: dict[str, hv.streams.Tap] = {}  # Tap streams must stay referenced to keep firing
        self._thumb_page = -1
        self._overlays = figures.LinkedOverlays()
        self._grid_strip = figures.TileStrip(self._on_grid_tile, 80, columns=64, name="head-grid")
        self._thumbs = figures.TileStrip(self._on_thumb_tile, THUMB_PX, THUMB_COLUMNS, "thumbnails", captions=False)
        self._slider_labels: dict[str, str] = {}
        self.browser_url = url_sync.BrowserUrl()  # wired by _sync_url when served
        self.param.image.objects = {i.file_name: i.image_id for i in self._index.images}
        self.param.model.objects = {info.label: slug for slug, info in self._index.models.items()}
        self._build_widgets()
        self._apply(state.default_selection(self._index))

    # --- selection ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        self._applying = True
        try:
            yield
        finally:
            self._applying = False

    def _apply(self, selection: state.Selection) -> None:
        """Show ``selection`` (already valid): update the dependent options, then the controls, then views.

        Every change of one switch goes to the browser as one message (``pn.io.hold``): Bokeh otherwise sends
        each model change on its own (a head switch was 4 messages, a layer switch 9), and the browser parses
        and applies each one separately."""
        with pn.io.hold():
            self._apply_held(selection)

    def _apply_held(self, selection: state.Selection) -> None:
        info = self._index.models[selection.model]
        layers = info.layers_of(selection.method)
        with self._guard():
            # options only when they change: re-sending them costs a round of widget updates per switch
            _set_options(self.param.method, {state.method_label(m): m for m in info.methods})
            bounds = (layers[0], max(layers[-1], layers[0] + 1))  # a slider needs start < end
            if self.param.layer.bounds != bounds:
                self.param.layer.bounds = bounds
            self._label_slider(info, layers)
            _set_options(self.param.head, state.head_options(info, selection.method))
            self.param.update(
                image=selection.image,
                model=selection.model,
                method=selection.method,
                layer=selection.layer,
                head=state.FUSED_VALUE if selection.head is None else selection.head,
                show_heads=state.has_heads(info, selection.method),
                multi_layer=len(layers) > 1,
            )
        self.param.update(selection=selection, image_key=selection.image, shape_key=(selection.model, selection.method))
        self._render_heads()
        self._render_thumbs()

    @param.depends("image", "model", "method", "layer", "head", watch=True)
    def _on_controls(self) -> None:
        if self._applying or self.selection is None:
            return
        requested = state.apply_request(
            self.selection,
            self._index,
            image=self.image,
            model=self.model,
            method=self.method,
            layer=self.layer,
            head=self.head,
        )
        self._apply(requested)

    def apply_query(self, query: Mapping[str, Any]) -> None:
        """Restore a view from URL values; anything invalid keeps its default."""
        self._apply(state.from_query(query, self._index))
        for key, name in DISPLAY_KEYS.items():
            value = query.get(key)
            if value is None:
                continue
            with contextlib.suppress(ValueError, TypeError):
                setattr(self, name, value)

    def query(self) -> dict[str, str]:
        """The URL query of the current view."""
        values = state.to_query(self.selection, self._index)
        for key, name in DISPLAY_KEYS.items():
            value = getattr(self, name)
            values[key] = f"{value:g}" if isinstance(value, float) else str(value)
        return values

    def _label_slider(self, info: state.ModelInfo, layers: tuple[int, ...]) -> None:
        """The layer slider shows the layer's name, not its index: "Layer: block 3", "Stage: layer2".

        Bokeh redraws a slider's text when its value or title changes, not its format: the title (Layer for
        a ViT, Stage for the CNN) changes together with the labels, so the text follows a model switch that
        keeps the index (ViT layers share their labels)."""
        cnn = info.num_heads == 0
        labels = {
            str(layer): (info.layer_names.get(layer) or str(layer)) if cnn else info.layer_label(layer)
            for layer in layers
        }
        if labels != self._slider_labels:
            self._slider_labels = labels
            self._layer_slider.param.update(
                name="Stage" if cnn else "Layer",
                format=CustomJSTickFormatter(
                    args={"labels": labels}, code="return labels[String(Math.round(tick))] ?? String(tick);"
                ),
            )

    def _layer_label(self, layer: int | None = None) -> str:
        info = self._index.models[self.selection.model]
        return info.layer_label(self.selection.layer if layer is None else layer)

    def _map_title(self, head: int | None) -> str:
        s = self.selection
        return state.map_title(self._index.models[s.model], s.method, s.layer, head)

    def _failure(self, what: str, exc: Exception) -> str:
        """Log a failed read and say in one line (Markdown) what failed, in which warehouse, and why."""
        if isinstance(exc, QueryError):  # an answer of the query layer, written for users: no traceback needed
            log.warning("could not %s (warehouse %s): %s", what, self._root, exc)
        else:
            log.error("could not %s (warehouse %s)", what, self._root, exc_info=exc)
        reason = data.one_line(exc).replace("`", "'")
        return f"Could not {what} from the warehouse at `{self._root}`: `{reason}`"

    # --- data ----------------------------------------------------------------------------------------------

    def _grid(self) -> HeadGrid:
        s = self.selection
        return data.head_grid(self._root, s.image, s.model, s.method, s.layer)

    def _rgb(self, image: str, model: str) -> np.ndarray:
        try:
            return data.input_rgb(self._root, image, model)
        except Exception as exc:  # the maps can still be shown, over a grey square
            self._failure(f"load the input image of {model}", exc)
            return np.full((224, 224, 3), 200, dtype=np.uint8)

    def _view_maps(self) -> export.ViewMaps:
        grid = self._grid()
        s = self.selection
        return export.ViewMaps(
            s.image,
            self._file_names.get(s.image, s.image),
            s.model,
            s.method,
            s.layer,
            grid.layer_name,
            grid.heads,
            grid.maps,
            grid.provenance.mode,
        )

    # --- the heads tab and the image picker (Bokeh models updated in place) ---------------------------------

    @param.depends("cmap", "opacity", "scale", watch=True)
    def _render_heads(self) -> None:
        """Fused and selected head over the input image, and the head grid, for the current selection."""
        with pn.io.hold():  # one message for the browser (see _apply)
            self._render_heads_held()

    def _render_heads_held(self) -> None:
        s = self.selection
        rgb = self._rgb(s.image, s.model)
        label = state.value_label(s.method)
        try:
            grid = self._grid()
        except Exception as exc:  # never a traceback: say what failed where the maps would be
            self.problem = self._failure(f"load the {s.model}/{s.method} maps of {self._layer_label()}", exc)
            empty = figures.MapLayer(np.zeros((1, 1), np.float32), 1.0, "maps unavailable (see the message above)")
            self._overlays.render(rgb, empty, empty, self.cmap, 0.0, label)
            return
        self.problem = ""
        shared = self.scale == "shared"
        head = s.head if s.head in grid.heads else None
        heads = len(grid.heads) > 1  # else the head map and the grid are hidden (self.show_heads): left as they are
        layers = []
        for shown in (None, head) if heads else (None,):
            values = grid.maps[grid.heads.index(shown)]
            title = self._map_title(shown)
            layers.append(figures.MapLayer(values, views.display_max(grid.maps, values, shared), title))
        self._overlays.render(rgb, layers[0], layers[1] if heads else None, self.cmap, self.opacity, label)
        if not heads:
            return
        self._grid_strip.tile_px = max(40, min(110, GRID_WIDTH // len(grid.heads)))
        captions = ["fused" if h is None else f"h{h}" for h in grid.heads]
        self._grid_strip.render_maps(views.normalise_tiles(list(grid.maps), shared), captions, self.cmap)
        self._grid_strip.select(grid.heads.index(head))

    def _on_grid_tile(self, index: int) -> None:
        try:
            heads = self._grid().heads
        except Exception as exc:
            self.problem = self._failure("load the head grid", exc)
            return
        if 0 <= index < len(heads):
            head = heads[index]
            self.head = state.FUSED_VALUE if head is None else head

    def _render_thumbs(self) -> None:
        """The page of thumbnails holding the current image, with that image outlined."""
        position = self._positions[self.selection.image]
        page = position // THUMB_PAGE
        if page != self._thumb_page:
            self._thumb_page = page
            images = self._index.images[page * THUMB_PAGE : (page + 1) * THUMB_PAGE]
            try:
                tiles = [data.thumbnail(self._root, i.image_id) for i in images]
            except Exception as exc:  # blank tiles: the picker still works, by file name
                self._failure("load the thumbnails", exc)
                tiles = [np.full((data.THUMB_SIZE, data.THUMB_SIZE, 3), 255, np.uint8) for _ in images]
            self._thumbs.render_rgb(tiles, [i.file_name for i in images])
        self._thumbs.select(position % THUMB_PAGE)

    def _on_thumb_tile(self, index: int) -> None:
        position = self._thumb_page * THUMB_PAGE + index
        if 0 <= index < THUMB_PAGE and position < len(self._index.images):
            self.image = self._index.images[position].image_id

    def _step_image(self, step: int) -> None:
        images = self._index.images
        self.image = images[(self._positions[self.selection.image] + step) % len(images)].image_id

    # --- other tabs (HoloViews; views of a hidden tab skip their updates) ----------------------------------

    def _only_on(self, tab: str, active: str) -> None:
        if tab != active:
            raise param.Skip

    def _overview_maps(self, selection: state.Selection) -> LayerHeadMaps | str:
        """The layers x heads maps, or why they cannot be loaded."""
        try:
            return data.layer_head_maps(self._root, selection.image, selection.model, selection.method)
        except Exception as exc:
            return self._failure(f"load the {selection.model}/{selection.method} maps", exc)

    @param.depends("tab", "selection", "cmap", "scale", watch=True)
    def _update_tab_keys(self) -> None:
        if self.tab == "overview":
            self.overview_key = (self.selection, self.cmap, self.scale)
        elif self.tab == "statistics":
            self.stats_key = (self.selection, self.cmap)

    def _overview_plot(self, overview_key: tuple[state.Selection, str, str]) -> hv.Image:
        selection, cmap, scale = overview_key
        maps = self._overview_maps(selection)
        if isinstance(maps, str):
            blank = views.overview_image([np.zeros((1, 1, 1), np.float32)], (None,), ["—"], cmap, True)
            return blank.opts(title=_plain(maps)[:160])
        labels = [self._layer_label(layer) for layer in maps.layers]
        method = state.method_label(selection.method)
        return views.overview_image(maps.per_layer, maps.heads, labels, cmap, scale == "shared", method)

    def _overview_marks(self, overview_key: tuple[state.Selection, str, str]) -> hv.Bounds:
        selection = overview_key[0]
        maps = self._overview_maps(selection)
        if isinstance(maps, str):
            return views.overview_marks(1, (0, 0))
        row = maps.layers.index(selection.layer) if selection.layer in maps.layers else 0
        col = maps.heads.index(selection.head) if selection.head in maps.heads else 0
        return views.overview_marks(len(maps.layers), (row, col))

    def _on_overview_tap(self, x: float | None = None, y: float | None = None) -> None:
        if x is None or y is None or self.selection is None:
            return
        maps = self._overview_maps(self.selection)
        if isinstance(maps, str):
            return
        rows = len(maps.layers)
        row = min(max(rows - 1 - int(y // 1), 0), rows - 1)
        col = min(max(int(x // 1), 0), len(maps.heads) - 1)
        head = maps.heads[col]
        self.param.update(layer=maps.layers[row], head=state.FUSED_VALUE if head is None else head)

    def _overview_pane(self, shape_key: tuple[str, str], tab: str) -> pn.viewable.Viewable:
        """Layers x heads of the whole model; re-created per (model, method), whose shape fixes its size."""
        self._only_on("overview", tab)
        p = self.param
        self._update_tab_keys()
        maps = self._overview_maps(self.selection)
        if isinstance(maps, str):
            return pn.pane.Alert(maps, alert_type="danger")
        image = hv.DynamicMap(pn.bind(self._overview_plot, overview_key=p.overview_key))
        marks = hv.DynamicMap(pn.bind(self._overview_marks, overview_key=p.overview_key))
        # a Tap stream needs a DynamicMap of an element (not of an overlay) as its source
        self._taps["overview"] = hv.streams.Tap(source=image, x=None, y=None)
        self._taps["overview"].add_subscriber(self._on_overview_tap)
        return pn.pane.HoloViews(image * marks, linked_axes=False)

    def _stat_plot(self, stats_key: tuple[state.Selection, str], stat: str, scope: str) -> hv.HeatMap | hv.Text:
        selection, cmap = stats_key
        image = selection.image if scope == "image" else None
        try:
            grid = data.stat_grid(self._root, selection.model, selection.method, stat, image)
        except Exception as exc:
            what = f"load the {STAT_LABELS.get(stat, stat)} statistic of {selection.model}/{selection.method}"
            return _message_plot(_plain(self._failure(what, exc)), width=700)
        labels = [self._layer_label(layer) for layer in grid.layers]
        where = self._file_names.get(selection.image, selection.image) if image else "mean over all images"
        title = f"{STAT_LABELS.get(stat, stat)} · {selection.model}/{selection.method} · {where}"
        method = state.method_label(selection.method)
        return views.stat_heatmap_element(grid.values, labels, grid.heads, stat, cmap, title, method)

    def _stat_pane(self, shape_key: tuple[str, str], tab: str) -> pn.pane.HoloViews:
        self._only_on("statistics", tab)
        p = self.param
        self._update_tab_keys()
        plot = hv.DynamicMap(pn.bind(self._stat_plot, stats_key=p.stats_key, stat=p.stat, scope=p.scope))
        return pn.pane.HoloViews(plot, linked_axes=False)

    def _stats_table(self, selection: state.Selection, tab: str) -> str:
        self._only_on("statistics", tab)
        info = self._index.models[selection.model]
        fused = "fused" if state.has_heads(info, selection.method) else state.method_label(selection.method)
        rows = [(None, fused)] + ([(selection.head, f"head {selection.head}")] if selection.head is not None else [])
        columns = []
        try:
            for head, label in rows:
                stats = data.head_statistics(
                    self._root, selection.image, selection.model, selection.method, selection.layer, head
                )
                columns.append((label, stats))
        except Exception as exc:
            what = f"load the statistics of {selection.model}/{selection.method}"
            return f"<p>{html.escape(_plain(self._failure(what, exc)))}</p>"
        header = "".join(f"<th>{html.escape(label)}</th>" for label, _ in columns)
        body = []
        for key, name in STAT_LABELS.items():
            cells = []
            for _, stats in columns:
                value = stats.get(key)
                cells.append("<td>—</td>" if value is None or not np.isfinite(value) else f"<td>{value:.4g}</td>")
            body.append(f"<tr><th>{html.escape(name)}</th>{''.join(cells)}</tr>")
        where = html.escape(f"{selection.model}/{selection.method}, {self._layer_label()}")
        return (
            f"<h4>This selection ({where})</h4><table class='ssl-stats'><tr><th></th>{header}</tr>"
            f"{''.join(body)}</table>"
        )

    def _compare_view(
        self, image_key: str, depth: float, compare_method: str, cmap: str, opacity: float, tab: str
    ) -> pn.viewable.Viewable:
        """The current image in every model at one relative depth: small PNG overlays, drawn server-side."""
        self._only_on("compare", tab)
        methods = {slug: state.counterpart_method(info, compare_method) for slug, info in self._index.models.items()}
        try:
            comparison = data.compare_models(self._root, image_key, float(depth), methods)
        except Exception as exc:
            return pn.pane.Alert(self._failure("compare the models", exc), alert_type="danger")
        cards = []
        for entry in comparison.entries:
            blended = overlay(self._rgb(image_key, entry.model), entry.map.values, alpha=opacity, cmap=cmap)
            label = self._index.models[entry.model].layer_label(entry.layer)
            caption = f"**{entry.model}** · {entry.method} · {label} (depth {entry.depth:.2f})"
            if entry.model in self._loaded.random_weights:
                caption += "<br>⚠ **random weights**"
            png = pn.pane.PNG(_png(blended), width=200, height=200, fixed_aspect=True)
            cards.append(pn.Column(pn.pane.Markdown(caption, margin=(0, 5)), png, width=215))
        missing = "".join(f"\n- {m}: {why}" for m, why in comparison.missing.items())
        notes = [pn.pane.Markdown(f"Not shown:{missing}")] if missing else []
        return pn.Column(pn.FlexBox(*cards, sizing_mode="stretch_width"), *notes, sizing_mode="stretch_width")

    # --- export --------------------------------------------------------------------------------------------

    def _export_png(self) -> io.BytesIO:
        return self._export(self._png_download, "the view as PNG", self._build_png)

    def _export_csv(self) -> io.BytesIO:
        return self._export(self._csv_download, "the maps as CSV", self._build_csv)

    def _export_parquet(self) -> io.BytesIO:
        return self._export(self._parquet_download, "the maps as Parquet", self._build_parquet)

    def _export(self, download: pn.widgets.FileDownload, what: str, build: Any) -> io.BytesIO:
        """A download, or (when the maps cannot be read) a text file saying why, and the same message on screen."""
        try:
            return build()
        except Exception as exc:
            self.problem = self._failure(f"export {what}", exc)
            download.filename = "export_failed.txt"
            return io.BytesIO((_plain(self.problem) + "\n").encode())

    def _build_png(self) -> io.BytesIO:
        view = self._view_maps()
        s = self.selection
        shared = self.scale == "shared"
        head = view.maps[view.heads.index(s.head)] if s.head in view.heads else view.maps[0]
        vmaxes = (views.display_max(view.maps, view.maps[0], shared), views.display_max(view.maps, head, shared))
        title = f"{view.file_name} · {s.model}/{s.method} · {self._layer_label()} · {view.weights_mode} weights"
        captions = (self._map_title(None), self._map_title(s.head))
        self._png_download.filename = export.file_stem(view, s.head) + ".png"
        rgb = self._rgb(s.image, s.model)
        return export.view_png(view, rgb, s.head, self.opacity, self.cmap, vmaxes, title, captions, shared)

    def _build_csv(self) -> io.BytesIO:
        view = self._view_maps()
        self._csv_download.filename = export.file_stem(view, None).removesuffix("_fused") + "_maps.csv"
        return export.csv_bytes(view)

    def _build_parquet(self) -> io.BytesIO:
        view = self._view_maps()
        self._parquet_download.filename = export.file_stem(view, None).removesuffix("_fused") + "_maps.parquet"
        return export.parquet_bytes(view)

    # --- layout --------------------------------------------------------------------------------------------

    def _build_widgets(self) -> None:
        p = self.param
        stretch = {"sizing_mode": "stretch_width"}
        self._image_select = pn.widgets.Select.from_param(p.image, label="Image", **stretch)
        self._prev = pn.widgets.Button(label="◀ Prev", width=70, margin=(5, 5))
        self._next = pn.widgets.Button(label="Next ▶", width=70, margin=(5, 5))
        self._prev.on_click(lambda _: self._step_image(-1))
        self._next.on_click(lambda _: self._step_image(1))
        self._model_select = pn.widgets.Select.from_param(p.model, label="Model", **stretch)
        self._method_select = pn.widgets.Select.from_param(p.method, label="Method", **stretch)
        self._layer_slider = pn.widgets.IntSlider.from_param(p.layer, label="Layer", visible=p.multi_layer, **stretch)
        self._head_select = pn.widgets.Select.from_param(p.head, label="Head", visible=p.show_heads, **stretch)
        self._cmap_select = pn.widgets.Select.from_param(p.cmap, label="Colormap", **stretch)
        self._opacity_slider = pn.widgets.FloatSlider.from_param(p.opacity, label="Opacity", **stretch)
        self._scale_select = pn.widgets.Select.from_param(p.scale, label="Colour scale", **stretch)
        self._png_download = pn.widgets.FileDownload(
            callback=self._export_png, filename="view.png", label="PNG view", color="primary", width=85
        )
        self._csv_download = pn.widgets.FileDownload(
            callback=self._export_csv, filename="maps.csv", label="CSV maps", width=85
        )
        self._parquet_download = pn.widgets.FileDownload(
            callback=self._export_parquet, filename="maps.parquet", label="Parquet maps", width=100
        )
        # Panel waits 50 ms after a browser change before processing it (to merge bursts); for one-value
        # selections that is pure latency on every switch.
        for widget in (
            self._image_select,
            self._model_select,
            self._method_select,
            self._head_select,
            self._layer_slider,
        ):
            widget._debounce = 0

    def _selection_note(self, selection: state.Selection, multi_layer: bool) -> str:
        """The layer's name (and its index, as the URL and SQL know it) and what the head selector offers (or
        why it is hidden)."""
        info = self._index.models[selection.model]
        name = self._layer_label()
        layer = f"Showing <b>{html.escape(name)}</b>"
        if str(selection.layer) not in name.split():
            layer += f" <small>(layer {selection.layer} in the URL and SQL)</small>"
        if not multi_layer:
            layer += f", the only layer of {html.escape(state.method_label(selection.method))}"
        if info.num_heads == 0:
            heads = f"<i>{html.escape(info.label)} is a CNN: no attention heads, one Grad-CAM map per stage.</i>"
        elif not state.has_heads(info, selection.method):
            method = html.escape(state.method_label(selection.method))
            heads = f"<i>{method} is fused by construction: no per-head maps.</i>"
        else:
            heads = f"{info.num_heads} heads per layer"
        return f"{layer}<br>{heads}"

    def _random_models(self, selection: state.Selection, tab: str) -> list[str]:
        """The models with random weights among those whose maps are shown: every model on the compare tab,
        the selected one elsewhere."""
        shown = list(self._index.models) if tab == "compare" else [selection.model]
        return [model for model in shown if model in self._loaded.random_weights]

    def _banner(self, selection: state.Selection, tab: str) -> str:
        models = self._random_models(selection, tab)
        named = [f"{self._index.models[m].label} ({self._loaded.random_weights[m]})" for m in models]
        if not named:  # hidden (_is_random)
            return ""
        if len(named) == 1:
            source = f"these maps come from {named[0]}, with randomly initialised weights."
        else:
            source = f"the maps of {', '.join(named[:-1])} and {named[-1]} come from randomly initialised weights."
        return f"⚠ **Random weights** — {source} They show the machinery, not what a trained model attends to."

    def _is_random(self, selection: state.Selection, tab: str) -> bool:
        return bool(self._random_models(selection, tab))

    def __panel__(self) -> pn.viewable.Viewable:
        p = self.param
        controls = pn.Column(
            self._image_select,
            pn.pane.Bokeh(self._thumbs.figure, margin=(0, 10)),
            pn.Row(self._prev, self._next),
            self._model_select,
            self._method_select,
            self._layer_slider,
            self._head_select,
            pn.pane.HTML(pn.bind(self._selection_note, p.selection, p.multi_layer), margin=(0, 10)),
            self._cmap_select,
            self._opacity_slider,
            self._scale_select,
            pn.Row(self._png_download, self._csv_download, self._parquet_download, margin=(10, 0)),
            width=300,
        )
        # A method without heads (rollout, Grad-CAM) has one map: no head map, no grid. The Bokeh panes sit in
        # layouts that hide them: a Bokeh pane created hidden would still be drawn (its figure is its model).
        heads_tab = pn.Column(
            pn.Row(
                pn.pane.Bokeh(self._overlays.fused.figure),
                pn.Column(pn.pane.Bokeh(self._overlays.head.figure), visible=p.show_heads, margin=0),
            ),
            pn.Column(
                pn.pane.HTML(
                    "<b>Head grid</b> — fused first, then every head of this layer (tiles scaled as chosen under "
                    "<i>Colour scale</i>: shared = one scale for the layer, independent = each tile its own). "
                    "Click a tile to select it.",
                    margin=(0, 10),
                ),
                pn.pane.Bokeh(self._grid_strip.figure, margin=(0, 10)),
                visible=p.show_heads,
                margin=0,
            ),
        )
        overview_tab = pn.Column(
            pn.pane.Markdown(
                "Every layer (rows) × fused and every head (columns) of the whole model for this image and method. "
                "Click a tile to select that layer and head."
            ),
            pn.bind(self._overview_pane, p.shape_key, p.tab),
        )
        stats_tab = pn.Row(
            pn.pane.HTML(pn.bind(self._stats_table, p.selection, p.tab), width=360, stylesheets=[_STATS_CSS]),
            pn.Column(
                pn.Row(
                    pn.widgets.Select.from_param(p.stat, label="Statistic", width=280),
                    pn.widgets.RadioButtonGroup.from_param(p.scope, margin=(28, 10)),
                ),
                pn.bind(self._stat_pane, p.shape_key, p.tab),
            ),
        )
        compare_tab = pn.Column(
            pn.Row(
                pn.widgets.FloatSlider.from_param(p.depth, label="Relative depth (0 = first layer, 1 = last)"),
                pn.widgets.Select.from_param(p.compare_method, label="Method", width=260),
            ),
            pn.bind(
                self._compare_view,
                image_key=p.image_key,
                depth=p.depth,
                compare_method=p.compare_method,
                cmap=p.cmap,
                opacity=p.opacity,
                tab=p.tab,
            ),
            sizing_mode="stretch_width",
        )
        tabs = pn.Tabs(
            (TAB_LABELS["heads"], heads_tab),
            (TAB_LABELS["overview"], overview_tab),
            (TAB_LABELS["statistics"], stats_tab),
            (TAB_LABELS["compare"], compare_tab),
            (TAB_LABELS["glossary"], pn.pane.Markdown(glossary_markdown(), width=900)),
            dynamic=True,  # only the open tab is in the page
            active=TABS.index(self.tab),
            sizing_mode="stretch_width",
        )
        tabs.param.watch(lambda event: setattr(self, "tab", TABS[event.new]), "active")
        self.param.watch(lambda event: setattr(tabs, "active", TABS.index(event.new)), "tab")
        banner = pn.pane.Alert(
            pn.bind(self._banner, p.selection, p.tab),
            alert_type="warning",
            visible=pn.bind(self._is_random, p.selection, p.tab),
            margin=(5, 10),
        )
        problem = pn.pane.Alert(p.problem, alert_type="danger", visible=p.problem.rx.bool(), margin=(5, 10))
        skipped = pn.pane.Alert(
            skipped_markdown(self._root, self._loaded.skipped),
            alert_type="warning",
            visible=bool(self._loaded.skipped),
            margin=(5, 10),
        )
        header = pn.pane.HTML(
            f"<h2 style='margin:4px 0'>{TITLE}</h2><small>warehouse: <code>{html.escape(self._root)}</code></small>",
            margin=(0, 10),
        )
        return pn.Column(
            header,
            self.browser_url,
            banner,
            problem,
            skipped,
            pn.Row(controls, tabs, sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
        )


_STATS_CSS = """
table.ssl-stats { border-collapse: collapse; font-size: 12px; }
table.ssl-stats th, table.ssl-stats td { padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: right; }
table.ssl-stats th:first-child { text-align: left; font-weight: normal; }
"""


def skipped_markdown(root: str, skipped: dict[str, str]) -> str:
    """Which model/method maps could not be read when the dashboard opened, and why."""
    lines = "".join(f"\n- **{key}**: `{why.replace('`', chr(39))}`" for key, why in sorted(skipped.items()))
    return (
        f"Some maps in the warehouse at `{root}` could not be read and are not offered:{lines}\n\n"
        "Re-run the extraction for these models (`ssl-attention run --images DIR --models MODEL --warehouse "
        f"{root}`) to rewrite their files."
    )


class EmptyWarehouse(pn.viewable.Viewer):
    """Shown instead of the explorer when there is nothing to explore (never a traceback)."""

    warehouse = param.String(default="", doc="the location as given (a path, a URL)")
    detail = param.String(default="")
    unsupported = param.Boolean(default=False, doc="the location is not a local path or file:// URL")

    def message(self) -> str:
        if self.unsupported:
            return unsupported_warehouse_markdown(self.warehouse, self.detail)
        return empty_warehouse_markdown(self.warehouse, self.detail)

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(
            pn.pane.Markdown(f"## {TITLE}"),
            pn.pane.Alert(self.message(), alert_type="info"),
            sizing_mode="stretch_width",
        )


class WarehouseProblem(pn.viewable.Viewer):
    """Shown instead of the explorer when the warehouse cannot be read (a damaged file, an unexpected error):
    what failed, which warehouse, the error in one line — never a traceback (that goes to the server log)."""

    warehouse = param.String(default="")
    failed = param.String(default="", doc="what the dashboard was doing, e.g. 'reading the list of models'")
    error = param.String(default="", doc="the error in one line")

    def message(self) -> str:
        error = self.error.replace("`", "'")
        return (
            "## The warehouse cannot be read\n\n"
            f"The dashboard failed while {self.failed} from the warehouse at `{self.warehouse}`:\n\n"
            f"`{error}`\n\n"
            "A file may be damaged or half-written. Re-run the extraction to rewrite it "
            f"(`ssl-attention run --images DIR --warehouse {self.warehouse}`), or point the dashboard at another "
            "warehouse with `$SSL_ATTENTION_WAREHOUSE` or `ssl-attention serve --warehouse DIR`, then reload this "
            "page. The server log has the details."
        )

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(
            pn.pane.Markdown(f"## {TITLE}"),
            pn.pane.Alert(self.message(), alert_type="danger"),
            sizing_mode="stretch_width",
        )


def _sync_url(viewer: AttentionExplorer) -> None:
    """Two-way: the URL's values restore the view; every change of the view rewrites the URL, and Back/Forward
    bring the view of the URL back (dashboards/url_sync.py)."""
    location = pn.state.location
    if location is None:
        return
    watched = ["selection", *DISPLAY_KEYS.values()]
    url_sync.sync_url(viewer, viewer.browser_url, location.query_params, watched)


def create_app(warehouse: str | Path | None = None) -> pn.viewable.Viewer:
    """One explorer per browser session; the empty-warehouse message when there is nothing to show; the
    what-failed message when the warehouse cannot be read. Never raises: a user never sees a traceback."""
    try:
        root = resolve_warehouse(warehouse)
    except WarehouseLocationError as exc:  # not a local path or file:// URL
        return EmptyWarehouse(warehouse=warehouse_location(warehouse), detail=str(exc), unsupported=True)
    except Exception as exc:
        location = warehouse_location(warehouse)
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
        viewer = AttentionExplorer(loaded)
        _sync_url(viewer)
    except Exception as exc:
        log.exception("cannot build the dashboard over %s", root)
        return WarehouseProblem(warehouse=str(root), failed="building the first view", error=data.one_line(exc))
    return viewer


if pn.state.served:
    create_app().servable(title=TITLE)
