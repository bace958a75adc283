"""One browser session's shared state, which the controls and every tab receive.

- the selection (image, model, method, layer, head), kept valid by the rules of ``dashboards.state``;
- the display settings the tabs share (colormap, opacity, colour scale) and the open tab;
- the warehouse index, and reads through ``dashboards.data`` with a one-line message when they fail;
- the URL: the selection, the shared settings and every key a tab registers (``add_url_keys``) are written
  to and restored from the browser's URL, with Back/Forward (``dashboards.url_sync``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import panel as pn
import param

from dashboards import data, state, url_sync
from ssl_attention.query import HeadGrid, QueryError
from ssl_attention.render import COLORMAPS

CONTRAST_MODES = {  # label -> value (dashboards.views.display_range)
    "0 → max": "zero",
    "min → max": "min",
    "Clip to 2nd–98th percentile": "clip",
    "Top 60% of the mass (mask)": "mass",
    "Top 60% of the mass (contour)": "contour",
}

log = logging.getLogger(__name__)

# URL key -> Session parameter
SHARED_URL_KEYS = {"cmap": "cmap", "opacity": "opacity", "scale": "scale", "contrast": "contrast"}
TAB_URL_KEY = "tab"
GREY_INPUT = (224, 224, 3)  # shape of the grey square shown when an input image cannot be read


def plain(text: str) -> str:
    """A Markdown message (``Session.failure``) for a plot title or text element: no code spans there."""
    return text.replace("`", "")


def _same(name: str, value: Any) -> Any:
    return value


@dataclass(frozen=True)
class UrlKeys:
    """Parameters of ``owner`` kept in the URL: URL key -> parameter name; ``parse`` turns a URL value into
    the parameter's (e.g. an older spelling), given the parameter name."""

    owner: param.Parameterized
    keys: Mapping[str, str]
    parse: Callable[[str, Any], Any] = _same


def _valid_values(parameter: param.Parameter) -> str:
    """ " (valid: a, b, c)" for a selector, " (from a to b)" for a bounded number, "" otherwise."""
    if isinstance(parameter, param.Selector):
        return f" (valid: {', '.join(str(v) for v in parameter.objects)})"
    bounds = getattr(parameter, "bounds", None)
    if bounds and None not in bounds:
        return f" (from {bounds[0]:g} to {bounds[1]:g})"
    return ""


def set_options(parameter: param.Selector, options: dict[str, Any]) -> None:
    """Set a selector's labelled options unless they are already those (a change re-sends the widget)."""
    if dict(parameter.names or {}) != options or list(parameter.objects) != list(options.values()):
        parameter.objects = options


class Session(param.Parameterized):
    """The selection, shared display settings, open tab and URL of one browser session."""

    # the controls (validated and kept consistent by _apply; see dashboards/state.py for the rules)
    image = param.Selector(objects=[], doc="image_id of the image shown")
    model = param.Selector(objects=[])
    method = param.Selector(objects=[])
    layer = param.Integer(default=0, bounds=(0, 1))
    head = param.Selector(objects={state.FUSED_LABEL: state.FUSED_VALUE}, default=state.FUSED_VALUE)
    # display, shared by the tabs
    cmap = param.Selector(objects=list(COLORMAPS), default="viridis", doc="colormap of the maps")
    opacity = param.Number(default=0.6, bounds=(0.0, 1.0), step=0.05)
    scale = param.Selector(objects={"Shared": "shared", "Independent": "independent"}, default="shared")
    contrast = param.Selector(
        objects=CONTRAST_MODES, default="zero", doc="what the colour scale spans (dashboards.views.display_range)"
    )
    tab = param.Selector(objects=[], check_on_set=True, doc="key of the open tab (objects: set per session)")

    # derived state, set by _apply only. Each view depends on the narrowest key that changes it.
    selection = param.ClassSelector(class_=state.Selection, default=None)
    image_key = param.String(default="", doc="image_id shown (model comparison)")
    shape_key = param.Tuple(default=("", ""), length=2, doc="(model, method): the overview's shape")
    show_heads = param.Boolean(default=True, doc="the method has per-head maps: head selector, head map and grid")
    multi_layer = param.Boolean(default=True)
    layer_title = param.String(default="Layer", doc="the layer slider's title: Layer (a ViT) or Stage (a CNN)")
    layer_names = param.Dict(default={}, doc="the layer slider's labels: str(layer index) -> name")
    problem = param.String(default="", doc="why the maps on screen could not be loaded (Markdown); '' when fine")
    notice = param.String(default="", doc="URL values that were replaced: what was asked, what is shown instead")
    head_panel = param.Boolean(default=False, doc="a head is selected: the head map is shown beside the fused map")

    def __init__(self, loaded: data.Loaded, tabs: Sequence[str], **params: Any) -> None:
        super().__init__(**params)
        if not tabs:
            raise ValueError("a session needs at least one tab")
        self.param.tab.objects = list(tabs)
        self.tab = tabs[0]
        self.loaded = loaded
        self.index = loaded.index
        self.root = str(loaded.root)
        self.file_names = {i.image_id: i.file_name for i in self.index.images}
        self.positions = {i.image_id: k for k, i in enumerate(self.index.images)}
        self.browser_url = url_sync.BrowserUrl()  # placed in the page by the app; wired by sync_url
        self._url_keys = [UrlKeys(self, SHARED_URL_KEYS)]
        self._applying = False
        self.param.image.objects = {i.file_name: i.image_id for i in self.index.images}
        self.param.model.objects = {info.label: slug for slug, info in self.index.models.items()}
        self._apply(state.default_selection(self.index))

    # --- selection ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        self._applying = True
        try:
            yield
        finally:
            self._applying = False

    def _apply(self, selection: state.Selection) -> None:
        """Show ``selection`` (already valid): update the dependent options, then the controls, then the
        derived keys the views watch.

        Every change of one switch goes to the browser as one message (``pn.io.hold``): Bokeh otherwise sends
        each model change on its own (a head switch was 4 messages, a layer switch 9), and the browser parses
        and applies each one separately."""
        with pn.io.hold():
            self._apply_held(selection)

    def _apply_held(self, selection: state.Selection) -> None:
        info = self.index.models[selection.model]
        layers = info.layers_of(selection.method)
        with self._guard():
            # options only when they change: re-sending them costs a round of widget updates per switch
            set_options(self.param.method, {state.method_label(m): m for m in info.methods})
            bounds = (layers[0], max(layers[-1], layers[0] + 1))  # a slider needs start < end
            if self.param.layer.bounds != bounds:
                self.param.layer.bounds = bounds
            self._name_layers(info, layers)
            set_options(self.param.head, state.head_options(info, selection.method))
            self.param.update(
                image=selection.image,
                model=selection.model,
                method=selection.method,
                layer=selection.layer,
                head=state.FUSED_VALUE if selection.head is None else selection.head,
                show_heads=state.has_heads(info, selection.method),
                head_panel=state.has_heads(info, selection.method) and selection.head is not None,
                multi_layer=len(layers) > 1,
            )
        self.param.update(selection=selection, image_key=selection.image, shape_key=(selection.model, selection.method))

    def _name_layers(self, info: state.ModelInfo, layers: tuple[int, ...]) -> None:
        """The layer slider shows the layer's name, not its index: "Layer: block 3", "Stage: layer2". Set before
        the layer itself (the slider's text is redrawn when its value or title changes, not its labels)."""
        cnn = info.num_heads == 0
        names = {
            str(layer): (info.layer_names.get(layer) or str(layer)) if cnn else info.layer_label(layer)
            for layer in layers
        }
        if names != self.layer_names:
            self.param.update(layer_title="Stage" if cnn else "Layer", layer_names=names)

    @param.depends("image", "model", "method", "layer", "head", watch=True)
    def _on_controls(self) -> None:
        if self._applying or self.selection is None:
            return
        self.notice = ""  # the user has moved on from what the URL asked
        requested = state.apply_request(
            self.selection,
            self.index,
            image=self.image,
            model=self.model,
            method=self.method,
            layer=self.layer,
            head=self.head,
        )
        self._apply(requested)

    def step_image(self, step: int) -> None:
        images = self.index.images
        self.image = images[(self.positions[self.selection.image] + step) % len(images)].image_id

    def select_head(self, head: int | None) -> None:
        self.head = state.FUSED_VALUE if head is None else head

    # --- names ---------------------------------------------------------------------------------------------

    @property
    def model_info(self) -> state.ModelInfo:
        return self.index.models[self.selection.model]

    def layer_label(self, layer: int | None = None) -> str:
        return self.model_info.layer_label(self.selection.layer if layer is None else layer)

    def map_title(self, head: int | None) -> str:
        s = self.selection
        return state.map_title(self.model_info, s.method, s.layer, head)

    @property
    def value_label(self) -> str:
        """What the selected method's values are (the colour bar's title, the hover label)."""
        return state.value_label(self.selection.method)

    def file_name(self, image: str) -> str:
        return self.file_names.get(image, image)

    # --- reads ---------------------------------------------------------------------------------------------

    def failure(self, what: str, exc: Exception) -> str:
        """Log a failed read and say in one line (Markdown) what failed, in which warehouse, and why."""
        if isinstance(exc, QueryError):  # an answer of the query layer, written for users: no traceback needed
            log.warning("could not %s (warehouse %s): %s", what, self.root, exc)
        else:
            log.error("could not %s (warehouse %s)", what, self.root, exc_info=exc)
        reason = data.one_line(exc).replace("`", "'")
        return f"Could not {what} from the warehouse at `{self.root}`: `{reason}`"

    def head_grid(self) -> HeadGrid:
        """Fused + every head of the selected layer (raises what the query layer raises)."""
        s = self.selection
        return data.head_grid(self.root, s.image, s.model, s.method, s.layer)

    def rgb(self, image: str, model: str) -> np.ndarray:
        """What ``model`` saw of ``image``, or a grey square (logged) when it cannot be read."""
        try:
            return data.input_rgb(self.root, image, model)
        except Exception as exc:  # the maps can still be shown, over a grey square
            self.failure(f"load the input image of {model}", exc)
            return np.full(GREY_INPUT, 200, dtype=np.uint8)

    # --- random weights ------------------------------------------------------------------------------------

    def random_models(self, models: Sequence[str]) -> list[str]:
        """Those of ``models`` whose maps come from random weights."""
        return [model for model in models if model in self.loaded.random_weights]

    def random_weights_markdown(self, models: Sequence[str]) -> str:
        """The banner over maps of ``models``: which have random weights, with their provenance ('' if none)."""
        named = [f"{self.index.models[m].label} ({self.loaded.random_weights[m]})" for m in self.random_models(models)]
        if not named:
            return ""
        if len(named) == 1:
            source = f"these maps come from {named[0]}, with randomly initialised weights."
        else:
            source = f"the maps of {', '.join(named[:-1])} and {named[-1]} come from randomly initialised weights."
        return f"⚠ **Random weights** — {source} They show the machinery, not what a trained model attends to."

    # --- URL -----------------------------------------------------------------------------------------------

    def add_url_keys(
        self, owner: param.Parameterized, keys: Mapping[str, str], parse: Callable[[str, Any], Any] = _same
    ) -> None:
        """Keep ``owner``'s parameters in the URL: ``keys`` maps a URL key to a parameter name of ``owner``."""
        taken = {*state.URL_KEYS, TAB_URL_KEY, *(k for entry in self._url_keys for k in entry.keys)}
        clash = sorted(taken & set(keys))
        if clash:
            raise ValueError(
                f"URL key(s) {', '.join(clash)} of {type(owner).__name__} are taken; taken: {', '.join(sorted(taken))}"
            )
        unknown = sorted(name for name in keys.values() if name not in owner.param)
        if unknown:
            raise ValueError(f"{type(owner).__name__} has no parameter(s) {', '.join(unknown)} to keep in the URL")
        self._url_keys.append(UrlKeys(owner, dict(keys), parse))

    def _all_url_keys(self) -> list[UrlKeys]:
        return [*self._url_keys, UrlKeys(self, {TAB_URL_KEY: "tab"})]  # the tab last: opened once all is set

    def query(self) -> dict[str, str]:
        """The URL query of the current view."""
        values = state.to_query(self.selection, self.index)
        for entry in self._all_url_keys():
            for key, name in entry.keys.items():
                value = getattr(entry.owner, name)
                if isinstance(value, bool):  # a switch: annotations=1
                    values[key] = str(int(value))
                else:
                    values[key] = f"{value:g}" if isinstance(value, float) else str(value)
        return values

    def apply_query(self, query: Mapping[str, Any]) -> None:
        """Restore a view from URL values; anything invalid keeps its current value (the selection: its
        default), and ``notice`` says what was asked and what is shown instead."""
        reading = state.read_query(query, self.index)
        self._apply(reading.selection)
        notices = list(reading.notices)
        for entry in self._all_url_keys():
            for key, name in entry.keys.items():
                value = query.get(key)
                if value is None:
                    continue
                try:
                    setattr(entry.owner, name, entry.parse(name, value))
                except (ValueError, TypeError):
                    kept = getattr(entry.owner, name)
                    valid = _valid_values(entry.owner.param[name])
                    notices.append(f"{key} “{state.asked(value)}” is not valid{valid}: showing {key}={kept}")
        self.notice = "; ".join(notices)

    def url_watched(self) -> list[tuple[param.Parameterized, list[str]]]:
        """The parameters the URL depends on, per owner."""
        watched: dict[int, tuple[param.Parameterized, list[str]]] = {id(self): (self, ["selection"])}
        for entry in self._all_url_keys():
            watched.setdefault(id(entry.owner), (entry.owner, []))[1].extend(entry.keys.values())
        return list(watched.values())

    def sync_url(self, opened: Mapping[str, Any]) -> None:
        """Two-way: the opening URL's values restore the view; every change of the view rewrites the URL, and
        Back/Forward bring the view of the URL back (dashboards/url_sync.py)."""
        url_sync.sync_url(self, self.browser_url, opened, self.url_watched())
