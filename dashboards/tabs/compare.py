"""The compare tab: the selected image in every model at one relative depth, small overlays drawn server-side
with ``ssl_attention.render``. The groups offered are the roles of the methods present (CLS-like, mean
attention, ...: ``MethodSpec.role``); each model shows its method of that role (``state.role_method``)."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import panel as pn
import param
from PIL import Image

from dashboards import data, state
from dashboards.session import Session
from dashboards.state import Selection
from dashboards.tabs.base import Tab
from ssl_attention.registry import METHODS
from ssl_attention.render import colorbar_image, overlay

CARD_PX = 200  # longer side of each card's map
CAPTION_PX = 64  # every caption the same height: a wrapped one does not shift its card's map


def card_bar(values: np.ndarray, cmap: str, height: int) -> np.ndarray:
    """The card's colour bar, ``height`` px as the map is shown: 0 → the map's maximum, as ``overlay`` colours it."""
    top = float(np.nanmax(values)) if np.isfinite(values).any() else 0.0
    return np.asarray(colorbar_image(0.0, top if top > 0 else 1.0, cmap, height))


def png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


class CompareTab(Tab):
    key = "compare"
    label = "Compare models"
    url_keys: ClassVar[Mapping[str, str]] = {"depth": "depth", "compare": "role"}

    depth = param.Number(default=1.0, bounds=(0.0, 1.0), step=0.05, doc="relative depth (0 = first layer, 1 = last)")
    role = param.Selector(objects=[], check_on_set=True, doc="the role of the methods compared (MethodSpec.role)")

    def __init__(self, session: Session, **params: Any) -> None:
        super().__init__(session, **params)
        self.param.role.objects = state.role_options(session.index)
        self.role = state.default_role(session.index)

    def from_url(self, name: str, value: Any) -> Any:
        """``compare=`` names a role; a method's name (older links: ``compare=rollout``) stands for its role."""
        if name == "role" and isinstance(value, str) and value in METHODS:
            return METHODS[value].role
        return value

    def shown_models(self, selection: Selection) -> list[str]:
        return list(self.session.index.models)  # every model's map is on screen

    def view(
        self, image_key: str, depth: float, role: str, cmap: str, opacity: float, tab: str
    ) -> pn.viewable.Viewable:
        """The image in every model at relative depth ``depth``, each with its method of ``role``."""
        self.skip_unless_open(tab)
        session = self.session
        methods = {slug: state.role_method(info, role) for slug, info in session.index.models.items()}
        try:
            comparison = data.compare_models(session.root, image_key, float(depth), methods)
        except Exception as exc:
            return pn.pane.Alert(session.failure("compare the models", exc), alert_type="danger")
        cards = []
        for entry in comparison.entries:
            rgb = session.rgb(image_key, entry.model)
            blended = overlay(rgb, entry.map.values, alpha=opacity, cmap=cmap)  # at the input's size and aspect
            label = session.index.models[entry.model].layer_label(entry.layer)
            caption = f"**{entry.model}** · {entry.method} · {label} (depth {entry.depth:.2f})"
            if entry.model in session.loaded.random_weights:
                caption += "<br>⚠ **random weights**"
            zoom = CARD_PX / max(rgb.shape[:2])  # a non-square input keeps its aspect: 200 x 133 for 3:2
            height, width = round(rgb.shape[0] * zoom), round(rgb.shape[1] * zoom)
            png = pn.pane.PNG(png_bytes(blended), width=width, height=height, fixed_aspect=True, margin=0)
            bar = pn.pane.PNG(png_bytes(card_bar(entry.map.values, cmap, height)), margin=(0, 0, 0, 4))
            text = pn.pane.Markdown(caption, margin=(0, 5), height=CAPTION_PX, width=width + 70)
            card = pn.Row(png, bar, margin=0)
            cards.append(pn.Column(text, card, width=width + 85))
        missing = "".join(f"\n- {m}: {why}" for m, why in comparison.missing.items())
        notes = [pn.pane.Markdown(f"Not shown:{missing}")] if missing else []
        return pn.Column(pn.FlexBox(*cards, sizing_mode="stretch_width"), *notes, sizing_mode="stretch_width")

    def __panel__(self) -> pn.viewable.Viewable:
        session, p = self.session.param, self.param
        return pn.Column(
            pn.Row(
                pn.widgets.FloatSlider.from_param(p.depth, label="Relative depth (0 = first layer, 1 = last)"),
                pn.widgets.Select.from_param(p.role, label="Method", width=320),
            ),
            pn.bind(
                self.view,
                image_key=session.image_key,
                depth=p.depth,
                role=p.role,
                cmap=session.cmap,
                opacity=session.opacity,
                tab=session.tab,
            ),
            sizing_mode="stretch_width",
        )
