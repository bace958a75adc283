"""The controls column of the explorer: image (select, a page of thumbnails, ◀ ▶), model, method, layer,
head, what the selection is, the shared display settings and the downloads. Widgets follow the session's
parameters; the image picker and the layer slider's labels are updated in place."""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import numpy as np
import panel as pn
from bokeh.models import CustomJSTickFormatter

from dashboards import data, export, figures, state
from dashboards.session import Session

THUMB_COLUMNS = 4
THUMB_PAGE = 12
THUMB_PX = 64
WIDTH = 280


class Controls(pn.viewable.Viewer):
    """The widgets over the session, the thumbnail picker and the export buttons."""

    def __init__(self, session: Session, **params: Any) -> None:
        super().__init__(**params)
        self.session = session
        p = session.param
        stretch = {"sizing_mode": "stretch_width"}
        self.image_select = pn.widgets.Select.from_param(p.image, label="Image", **stretch)
        self.prev = pn.widgets.Button(label="◀ Prev", width=70, margin=(5, 5))
        self.next = pn.widgets.Button(label="Next ▶", width=70, margin=(5, 5))
        self.prev.on_click(lambda _: session.step_image(-1))
        self.next.on_click(lambda _: session.step_image(1))
        self.model_select = pn.widgets.Select.from_param(p.model, label="Model", **stretch)
        self.method_select = pn.widgets.Select.from_param(p.method, label="Method", **stretch)
        self.layer_slider = pn.widgets.IntSlider.from_param(p.layer, label="Layer", visible=p.multi_layer, **stretch)
        self.head_select = pn.widgets.Select.from_param(p.head, label="Head", visible=p.show_heads, **stretch)
        self.cmap_select = pn.widgets.Select.from_param(p.cmap, label="Colormap", **stretch)
        self.opacity_slider = pn.widgets.FloatSlider.from_param(p.opacity, label="Opacity", **stretch)
        self.scale_select = pn.widgets.Select.from_param(p.scale, label="Colour scale", **stretch)
        self.contrast_select = pn.widgets.Select.from_param(p.contrast, label="Contrast", **stretch)
        self.png_download = self._download(export.png_view, "the view as PNG", "PNG view", 80, color="primary")
        self.csv_download = self._download(export.csv_maps, "the maps as CSV", "CSV maps", 80)
        self.parquet_download = self._download(export.parquet_maps, "the maps as Parquet", "Parquet", 80)
        # Panel waits 50 ms after a browser change before processing it (to merge bursts); for one-value
        # selections that is pure latency on every switch.
        for widget in (self.image_select, self.model_select, self.method_select, self.head_select, self.layer_slider):
            widget._debounce = 0
        self.thumbs = figures.TileStrip(self.on_thumb_tile, THUMB_PX, THUMB_COLUMNS, "thumbnails", captions=False)
        self._thumb_page = -1
        session.param.watch(self._name_layers, ["layer_title", "layer_names"])
        session.param.watch(self.render_thumbs, ["selection"])
        self._name_layers()
        self.render_thumbs()

    def _download(
        self, build: Callable[[Session], export.Download], what: str, label: str, width: int, **kwargs: Any
    ) -> pn.widgets.FileDownload:
        """A button whose file is ``build(session)``, named as it says (or the text of why it failed)."""
        widget = pn.widgets.FileDownload(label=label, width=width, margin=(5, 4), **kwargs)

        def callback() -> Any:
            download = export.safely(self.session, build, what)
            widget.filename = download.filename
            return download.data

        widget.callback = callback
        return widget

    def _name_layers(self, *_: Any) -> None:
        """The slider's title and the names it shows for its values ("Layer: block 3", "Stage: layer2")."""
        self.layer_slider.param.update(
            name=self.session.layer_title,
            format=CustomJSTickFormatter(
                args={"labels": dict(self.session.layer_names)},
                code="return labels[String(Math.round(tick))] ?? String(tick);",
            ),
        )

    # --- the image picker ------------------------------------------------------------------------------------

    def render_thumbs(self, *_: Any) -> None:
        """The page of thumbnails holding the current image, with that image outlined."""
        session = self.session
        position = session.positions[session.selection.image]
        page = position // THUMB_PAGE
        if page != self._thumb_page:
            self._thumb_page = page
            images = session.index.images[page * THUMB_PAGE : (page + 1) * THUMB_PAGE]
            try:
                tiles = [data.thumbnail(session.root, i.image_id) for i in images]
            except Exception as exc:  # blank tiles: the picker still works, by file name
                session.failure("load the thumbnails", exc)
                tiles = [np.full((data.THUMB_SIZE, data.THUMB_SIZE, 3), 255, np.uint8) for _ in images]
            self.thumbs.render_rgb(tiles, [i.file_name for i in images])
        self.thumbs.select(position % THUMB_PAGE)

    def on_thumb_tile(self, index: int) -> None:
        images = self.session.index.images
        position = self._thumb_page * THUMB_PAGE + index
        if 0 <= index < THUMB_PAGE and position < len(images):
            self.session.image = images[position].image_id

    # --- what is selected ------------------------------------------------------------------------------------

    def selection_note(self, selection: state.Selection, multi_layer: bool) -> str:
        """The layer's name (and its index, as the URL and SQL know it) and what the head selector offers (or
        why it is hidden)."""
        info = self.session.index.models[selection.model]
        name = info.layer_label(selection.layer)
        method = html.escape(state.method_label(selection.method))
        layer = f"Showing <b>{html.escape(name)}</b>"
        if str(selection.layer) not in name.split():
            layer += f" <small>(layer {selection.layer} in the URL and SQL)</small>"
        if not multi_layer:
            layer += f", the only layer of {method}"
        if info.num_heads == 0:
            heads = f"<i>{html.escape(info.label)} is a CNN: no attention heads, one {method} map per stage.</i>"
        elif not state.has_heads(info, selection.method):
            heads = f"<i>{method} is fused by construction: no per-head maps.</i>"
        else:
            heads = f"{info.num_heads} heads per layer"
        return f"{layer}<br>{heads}"

    def __panel__(self) -> pn.viewable.Viewable:
        p = self.session.param
        return pn.Column(
            self.image_select,
            pn.pane.Bokeh(self.thumbs.figure, margin=(0, 10)),
            pn.Row(self.prev, self.next),
            self.model_select,
            self.method_select,
            self.layer_slider,
            self.head_select,
            pn.pane.HTML(pn.bind(self.selection_note, p.selection, p.multi_layer), margin=(0, 10)),
            self.cmap_select,
            self.opacity_slider,
            self.scale_select,
            self.contrast_select,
            pn.FlexBox(self.png_download, self.csv_download, self.parquet_download, margin=(10, 5)),
            width=WIDTH,
        )
