"""Pure selection logic of the dashboard: which (image, model, method, layer, head) is shown, how a change of
one control moves the others, which controls are visible, how maps and layers are named on screen, and how a
selection round-trips through the URL.

Nothing here imports Panel or touches the warehouse, so every rule is unit-tested on its own
(tests/test_dashboard_state.py). ``head=None`` is the fused map everywhere in this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ssl_attention import registry
from ssl_attention.query import ImageInfo
from ssl_attention.registry import METHODS, ROLE_LABELS

FUSED_LABEL = "All heads (fused)"
FUSED_VALUE = -1  # the head selector's value for the fused map (widgets cannot hold None)
FUSED_URL = "fused"


# Not ssl_attention.query.ModelInfo: the rules need the layers each method stores and their names (SigLIP's probe
# sits at the pooling head, one past the last block), which the query layer answers per partition (data.load_index).
@dataclass(frozen=True)
class ModelInfo:
    """What the selection rules need to know about one model in the warehouse."""

    slug: str
    label: str
    num_heads: int  # 0 for a CNN
    methods: tuple[str, ...]  # methods with maps in the warehouse, registry order
    layers: Mapping[str, tuple[int, ...]]  # per method: the layer indices stored (SigLIP's probe: one)
    layer_names: Mapping[int, str] = field(default_factory=dict)  # as stored: "block 3", "layer2", "pooling head"

    def layers_of(self, method: str) -> tuple[int, ...]:
        return self.layers[method]

    def layer_label(self, layer: int) -> str:
        """The layer as the dashboard names it: "block 3" (ViT), "pooling head" (SigLIP's probe), "stage layer2"
        (a ResNet stage, timm's name); "layer N" when the warehouse stores no name."""
        name = self.layer_names.get(layer)
        if self.num_heads == 0:
            return f"stage {name or layer}"
        return name or f"layer {layer}"


@dataclass(frozen=True)
class WarehouseIndex:
    """Models (registry order) and images present in the warehouse."""

    models: Mapping[str, ModelInfo]
    images: Sequence[ImageInfo]

    @property
    def empty(self) -> bool:
        return not self.models or not self.images

    def image_by_key(self, key: Any) -> ImageInfo | None:
        """An image by id or file name (URL values may arrive as numbers when they look like one)."""
        if key is None:
            return None
        text = str(key)
        for image in self.images:
            if text in (image.image_id, image.file_name):
                return image
        return None


@dataclass(frozen=True)
class Selection:
    image: str
    model: str
    method: str
    layer: int
    head: int | None  # None = fused


# --- rules ---------------------------------------------------------------------------------------------


def has_heads(info: ModelInfo, method: str) -> bool:
    """Per-head maps exist: a ViT (heads > 0) and a per-head method (the registry's ``per_head``)."""
    spec = METHODS.get(method)
    return info.num_heads > 0 and spec is not None and spec.per_head


def head_options(info: ModelInfo, method: str) -> dict[str, int]:
    """The head selector's options: fused first, then "Head 0" … "Head H-1" (only fused without heads)."""
    options = {FUSED_LABEL: FUSED_VALUE}
    if has_heads(info, method):
        options.update({f"Head {h}": h for h in range(info.num_heads)})
    return options


def head_label(head: int | None) -> str:
    return FUSED_LABEL if head is None else f"Head {head}"


def method_label(method: str) -> str:
    spec = METHODS.get(method)
    return spec.label if spec else method


def map_title(info: ModelInfo, method: str, layer: int, head: int | None) -> str:
    """The title of a shown map: "Head 3 · block 11" and "All heads (fused) · block 11" for per-head methods;
    the method's own name for maps without heads ("Attention rollout · up to block 11", "Grad-CAM · stage
    layer4"), where "fused" or "head" would mean nothing."""
    where = info.layer_label(layer)
    if has_heads(info, method):
        return f"{head_label(head)} · {where}"
    spec = METHODS.get(method)
    if spec is not None and spec.cumulative:  # layer l summarises layers 0..l
        return f"{method_label(method)} · up to {where}"
    return f"{method_label(method)} · {where}"


def value_label(method: str) -> str:
    """What a map's values are (the registry's ``value_label``: "attention", "rollout", "Grad-CAM");
    "attention" for a method the registry does not know."""
    spec = METHODS.get(method)
    return spec.value_label if spec else "attention"


def default_method(info: ModelInfo) -> str:
    """The model's most comparable method (``registry.default_method``: by role preference)."""
    return registry.default_method(info.methods)


def counterpart_method(info: ModelInfo, method: str) -> str:
    """``method`` if the model has it, else the method that plays its part there (``registry.counterpart``:
    same role, then the role's fallbacks), else the model's default."""
    return registry.counterpart(method, info.methods)


# --- roles (the compare tab's groups) ------------------------------------------------------------------


def roles_present(index: WarehouseIndex) -> list[str]:
    """The roles of the methods with maps in the warehouse, in ``ROLE_LABELS`` order."""
    present = {METHODS[m].role for info in index.models.values() for m in info.methods if m in METHODS}
    return [role for role in ROLE_LABELS if role in present]


def role_method(info: ModelInfo, role: str) -> str:
    """The model's method playing ``role``: the first registered method of the role if the model has it,
    else its counterpart there (same role, then the role's fallbacks, then the model's default)."""
    first = next((name for name, spec in METHODS.items() if spec.role == role), None)
    if first is None:
        raise ValueError(f"unknown role {role!r}; valid roles: {', '.join(ROLE_LABELS)}")
    return counterpart_method(info, first)


def role_options(index: WarehouseIndex) -> dict[str, str]:
    """The compare tab's groups: label -> role, one per role present; each label names the methods the
    models use for it (registry order), e.g. "CLS-like (cls · probe · gradcam)"."""
    options = {}
    for role in roles_present(index):
        used = {role_method(info, role) for info in index.models.values()}
        names = [m for m in METHODS if m in used] + sorted(used - set(METHODS))
        options[f"{ROLE_LABELS[role]} ({' · '.join(names)})"] = role
    return options


def default_role(index: WarehouseIndex) -> str:
    """The role of the most comparable method among all the warehouse's methods."""
    available = [m for m in METHODS if any(m in info.methods for info in index.models.values())]
    if not available:
        raise ValueError("the warehouse holds no registered methods")
    return METHODS[registry.default_method(available)].role


def clamp_layer(info: ModelInfo, method: str, layer: Any) -> int:
    """``layer`` if the method stores it, else the nearest stored layer (the last one for non-numbers)."""
    layers = info.layers_of(method)
    try:
        value = int(layer)
    except (TypeError, ValueError, OverflowError):
        return layers[-1]
    return min(layers, key=lambda candidate: (abs(candidate - value), -candidate))


def valid_head(info: ModelInfo, method: str, head: int | None) -> int | None:
    """``head`` if it exists for this model and method, else fused."""
    if head is None or not has_heads(info, method):
        return None
    return head if 0 <= head < info.num_heads else None


def default_selection(index: WarehouseIndex) -> Selection:
    """First image, first model, its first method, the last layer (where heads are most distinct), fused."""
    if index.empty:
        raise ValueError("the warehouse holds no images or models")
    info = next(iter(index.models.values()))
    method = default_method(info)
    return Selection(index.images[0].image_id, info.slug, method, info.layers_of(method)[-1], None)


def with_model(selection: Selection, model: str, index: WarehouseIndex) -> Selection:
    """Switch model: keep method, layer and head where the new model has them; otherwise take the method's
    counterpart, clamp the layer into range and fall back to the fused map."""
    info = index.models[model]
    method = counterpart_method(info, selection.method)
    layer = clamp_layer(info, method, selection.layer)
    return replace(selection, model=model, method=method, layer=layer, head=valid_head(info, method, selection.head))


def with_method(selection: Selection, method: str, index: WarehouseIndex) -> Selection:
    """Switch method (of the current model): a method without heads resets the head to fused; the layer is
    kept if the method stores it, else clamped to the nearest one it does."""
    info = index.models[selection.model]
    if method not in info.methods:
        method = counterpart_method(info, method)
    layer = clamp_layer(info, method, selection.layer)
    return replace(selection, method=method, layer=layer, head=valid_head(info, method, selection.head))


def apply_request(
    selection: Selection,
    index: WarehouseIndex,
    *,
    image: str | None = None,
    model: str | None = None,
    method: str | None = None,
    layer: int | None = None,
    head: int | str | None = "keep",
) -> Selection:
    """Apply what the controls ask for, model first, then method, layer, head and image; every value that
    is not valid for the result falls back as described in ``with_model``/``with_method``."""
    current = selection
    if model is not None and model != current.model and model in index.models:
        current = with_model(current, model, index)
    info = index.models[current.model]
    if method is not None and method != current.method:
        current = with_method(current, method, index)
    if layer is not None:
        current = replace(current, layer=clamp_layer(info, current.method, layer))
    if head != "keep":
        requested = None if head is None or head == FUSED_VALUE else head
        current = replace(current, head=valid_head(info, current.method, requested))  # type: ignore[arg-type]
    if image is not None and index.image_by_key(image) is not None:
        current = replace(current, image=index.image_by_key(image).image_id)  # type: ignore[union-attr]
    return current


# --- URL --------------------------------------------------------------------------------------------------

URL_KEYS = ("image", "model", "method", "layer", "head")


def to_query(selection: Selection, index: WarehouseIndex) -> dict[str, str]:
    """URL query values: the image by file name (readable, unique in the catalog), head as ``fused`` or N."""
    image = index.image_by_key(selection.image)
    return {
        "image": image.file_name if image else selection.image,
        "model": selection.model,
        "method": selection.method,
        "layer": str(selection.layer),
        "head": FUSED_URL if selection.head is None else str(selection.head),
    }


def parse_head(value: Any) -> int | None:
    """``fused``/missing → None; an integer (or its string) → that head; anything else → None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, int):
        return value
    text = str(value).strip().lower()
    if text.startswith("head"):
        text = text[4:].strip()
    return int(text) if text.lstrip("-").isdigit() else None


def _parse_layer(value: Any) -> int | None:
    """An integer layer from a URL value (``"3"``, ``3``, ``3.0``); None for anything else."""
    if not isinstance(value, int | float | str) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def asked(value: Any) -> str:
    """A URL value as the user typed it (the page parses ``-3`` as the number -3.0)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _span(values: Sequence[int]) -> str:
    return f"{values[0]}–{values[-1]}" if len(values) > 1 else str(values[0])


@dataclass(frozen=True)
class QueryReading:
    """The selection a URL asks for, and one notice per value that had to be replaced: what was asked and
    what is shown instead (plain text, shown above the maps)."""

    selection: Selection
    notices: tuple[str, ...] = ()


def read_query(query: Mapping[str, Any], index: WarehouseIndex) -> QueryReading:
    """The selection a URL asks for; each missing value takes its default, each invalid one too, with a notice
    saying what was asked and what is shown instead (never a silent replacement)."""
    base = default_selection(index)
    notices: list[str] = []
    asked_model = query.get("model")
    model = asked_model if isinstance(asked_model, str) and asked_model in index.models else base.model
    info = index.models[model]
    if asked_model is not None and model != asked_model:
        notices.append(
            f"model “{asked(asked_model)}” is not in this warehouse (models: {', '.join(index.models)}): "
            f"showing {info.label} ({model})"
        )
    asked_method = query.get("method")
    method = asked_method if isinstance(asked_method, str) and asked_method in info.methods else None
    if method is None:
        method = default_method(info)
        if asked_method is not None:
            notices.append(
                f"method “{asked(asked_method)}” is not stored for {model} (methods: {', '.join(info.methods)}): "
                f"showing {method_label(method)}"
            )
    layers = info.layers_of(method)
    layer = layers[-1]
    asked_layer = query.get("layer")
    if asked_layer is not None:
        number = _parse_layer(asked_layer)
        if number is not None and number in layers:
            layer = number
        else:
            notices.append(
                f"layer “{asked(asked_layer)}” is not stored for {model}/{method} (layers {_span(layers)}): "
                f"showing {info.layer_label(layer)}"
            )
    asked_head = query.get("head")
    requested = parse_head(asked_head)
    head = valid_head(info, method, requested)
    if asked_head is not None and head is None and str(asked_head).strip().lower() != FUSED_URL:
        if not has_heads(info, method):
            why = f"{method_label(method)} of {model} has no per-head maps"
        elif requested is None:
            why = "it is not a head number"
        else:
            why = f"it does not exist ({_span(range(info.num_heads))})"
        notices.append(f"head “{asked(asked_head)}”: {why}: showing the fused map")
    asked_image = query.get("image")
    image = index.image_by_key(asked_image)
    if asked_image is not None and image is None:
        first = index.images[0]
        notices.append(
            f"image “{asked(asked_image)}” is not in this warehouse: showing {first.file_name} instead "
            f"(the first of its {len(index.images)} images)"
        )
    return QueryReading(Selection(image.image_id if image else base.image, model, method, layer, head), tuple(notices))


def from_query(query: Mapping[str, Any], index: WarehouseIndex) -> Selection:
    """The selection a URL asks for; each missing or invalid value falls back to its default."""
    return read_query(query, index).selection
