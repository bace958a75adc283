"""The dashboard's selection logic (dashboards/state.py): pure functions, no Panel, no warehouse."""

from __future__ import annotations

import pytest

from dashboards import state
from dashboards.state import FUSED_LABEL, ModelInfo, Selection, WarehouseIndex
from ssl_attention.query import ImageInfo


def _blocks(layers: int) -> dict[int, str]:
    return {i: f"block {i}" for i in range(layers)}  # the names a ViT's maps are stored with


def _vit(slug: str, heads: int, layers: int, methods: tuple[str, ...] = ("cls", "mean", "rollout")) -> ModelInfo:
    return ModelInfo(slug, slug.upper(), heads, methods, {m: tuple(range(layers)) for m in methods}, _blocks(layers))


def _image(image_id: str, file_name: str) -> ImageInfo:
    return ImageInfo(image_id, file_name, width=64, height=48, format="JPEG", thumbnail=None)


SIGLIP = ModelInfo(
    "siglip",
    "SigLIP",
    12,
    ("mean", "probe", "rollout"),
    {"mean": tuple(range(12)), "probe": (12,), "rollout": tuple(range(12))},
    _blocks(12) | {12: "pooling head"},
)
RESNET = ModelInfo(
    "resnet50",
    "ResNet-50",
    0,
    ("gradcam",),
    {"gradcam": (0, 1, 2, 3)},
    {0: "layer1", 1: "layer2", 2: "layer3", 3: "layer4"},
)
INDEX = WarehouseIndex(
    models={
        "dinov2": _vit("dinov2", 12, 12),
        "small": _vit("small", 6, 12),  # a ViT-S: fewer heads
        "large": _vit("large", 16, 24),  # a ViT-L: more heads and layers
        "siglip": SIGLIP,
        "resnet50": RESNET,
    },
    images=(_image("a" * 32, "astronaut.jpg"), _image("0123456789", "cat.png"), _image("c" * 32, "sub/c.jpg")),
)


def sel(**kw: object) -> Selection:
    base = {"image": "a" * 32, "model": "dinov2", "method": "cls", "layer": 11, "head": None}
    return Selection(**(base | kw))  # type: ignore[arg-type]


# --- visibility and options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "method", "visible"),
    [
        ("dinov2", "cls", True),
        ("dinov2", "mean", True),
        ("dinov2", "rollout", False),
        ("siglip", "probe", True),
        ("siglip", "rollout", False),
        ("resnet50", "gradcam", False),
    ],
)
def test_head_selector_visible_only_for_per_head_methods_of_vits(model: str, method: str, visible: bool) -> None:
    assert state.has_heads(INDEX.models[model], method) is visible


def test_head_options_come_from_the_model() -> None:
    options = state.head_options(INDEX.models["small"], "cls")
    assert list(options) == [FUSED_LABEL, *(f"Head {h}" for h in range(6))]
    assert options[FUSED_LABEL] == state.FUSED_VALUE and options["Head 5"] == 5
    assert list(state.head_options(INDEX.models["large"], "mean"))[-1] == "Head 15"
    assert state.head_options(RESNET, "gradcam") == {FUSED_LABEL: state.FUSED_VALUE}
    assert state.head_options(INDEX.models["dinov2"], "rollout") == {FUSED_LABEL: state.FUSED_VALUE}


# --- reset to fused ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rollout"])
def test_switching_to_a_method_without_heads_resets_to_fused(method: str) -> None:
    moved = state.with_method(sel(head=7), method, INDEX)
    assert (moved.method, moved.head, moved.layer) == (method, None, 11)


def test_switching_between_per_head_methods_keeps_the_head() -> None:
    assert state.with_method(sel(head=7), "mean", INDEX).head == 7


def test_switching_to_resnet_resets_head_and_method() -> None:
    moved = state.with_model(sel(head=3, layer=11), "resnet50", INDEX)
    assert (moved.method, moved.head, moved.layer) == ("gradcam", None, 3)


def test_apply_request_with_head_on_a_fused_only_method_stays_fused() -> None:
    current = sel(method="rollout")
    assert state.apply_request(current, INDEX, head=4).head is None
    assert state.apply_request(sel(), INDEX, head=4).head == 4
    assert state.apply_request(sel(head=4), INDEX, head=state.FUSED_VALUE).head is None


# --- model change: keep where valid, clamp or reset where not ----------------------------------------------


def test_model_change_keeps_head_and_layer_where_valid() -> None:
    moved = state.with_model(sel(head=5, layer=7), "large", INDEX)
    assert (moved.method, moved.layer, moved.head) == ("cls", 7, 5)


def test_model_change_clamps_layer_and_resets_out_of_range_head() -> None:
    moved = state.with_model(sel(model="large", head=14, layer=23), "small", INDEX)
    assert (moved.layer, moved.head) == (11, None)  # 24 -> 12 layers: clamped; head 14 of 6: fused


def test_model_change_maps_cls_to_siglip_probe_and_back() -> None:
    moved = state.with_model(sel(head=3, layer=4), "siglip", INDEX)
    assert (moved.method, moved.layer, moved.head) == ("probe", 12, 3)  # probe lives at the pooling head only
    back = state.with_model(moved, "dinov2", INDEX)
    assert (back.method, back.layer, back.head) == ("cls", 11, 3)


def test_method_change_clamps_the_layer_to_the_methods_layers() -> None:
    on_probe = state.with_method(sel(model="siglip", method="mean", layer=3), "probe", INDEX)
    assert on_probe.layer == 12
    assert state.with_method(on_probe, "mean", INDEX).layer == 11


def test_apply_request_orders_model_before_method() -> None:
    # the URL (or a batched widget update) may ask for model and method together
    moved = state.apply_request(sel(), INDEX, model="siglip", method="rollout", layer=30, head=2)
    assert (moved.model, moved.method, moved.layer, moved.head) == ("siglip", "rollout", 11, None)
    unknown = state.apply_request(sel(), INDEX, model="nope", image="missing")
    assert unknown == sel()


# --- URL state -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "selection",
    [
        sel(),
        sel(head=0),
        sel(model="large", layer=23, head=15, method="mean"),
        sel(model="siglip", method="probe", layer=12, head=11, image="c" * 32),
        sel(model="resnet50", method="gradcam", layer=0),
        sel(image="0123456789"),
    ],
)
def test_url_round_trip(selection: Selection) -> None:
    query = state.to_query(selection, INDEX)
    assert all(isinstance(v, str) for v in query.values())
    assert state.from_query(query, INDEX) == selection


def test_url_round_trip_survives_panels_number_parsing() -> None:
    """Panel's query parser turns "3" into 3 and "0.5" into 0.5; values must still restore."""
    query = {"image": "astronaut.jpg", "model": "large", "method": "cls", "layer": 20, "head": 3}
    assert state.from_query(query, INDEX) == sel(model="large", layer=20, head=3)
    assert state.from_query({"head": 4.0, "layer": 2.0}, INDEX) == sel(head=4, layer=2)


def test_image_may_be_given_by_id_or_file_name() -> None:
    assert state.from_query({"image": "c" * 32}, INDEX).image == "c" * 32
    assert state.from_query({"image": "sub/c.jpg"}, INDEX).image == "c" * 32


@pytest.mark.parametrize(
    "query",
    [
        {"model": "nope"},
        {"model": 3},
        {"method": "gradcam"},
        {"layer": 99},
        {"layer": -1},
        {"layer": "x"},
        {"layer": 1.5},
        {"head": 99},
        {"head": -3},
        {"head": "banana"},
        {"head": True},
        {"image": "missing.jpg"},
        {"image": None},
        {},
    ],
)
def test_bad_url_values_fall_back_to_defaults(query: dict[str, object]) -> None:
    assert state.from_query(query, INDEX) == state.default_selection(INDEX)


def test_bad_values_only_affect_their_own_key() -> None:
    restored = state.from_query({"model": "small", "method": "mean", "layer": 99, "head": 2}, INDEX)
    assert restored == sel(model="small", method="mean", layer=11, head=2)
    assert state.from_query({"model": "resnet50", "head": 2}, INDEX).head is None
    assert state.from_query({"method": "rollout", "head": 2}, INDEX).head is None


def test_head_parsing() -> None:
    assert state.parse_head("fused") is None
    assert state.parse_head("Head 3") == 3
    assert state.parse_head("3") == 3
    assert state.parse_head(None) is None


def test_default_selection_is_the_last_layer_fused() -> None:
    assert state.default_selection(INDEX) == sel()
    with pytest.raises(ValueError, match="no images"):
        state.default_selection(WarehouseIndex({}, ()))


def test_layer_labels_name_the_layer_not_its_index() -> None:
    assert SIGLIP.layer_label(12) == "pooling head"
    assert RESNET.layer_label(1) == "stage layer2"  # timm's stage name, not "1 · layer2"
    assert INDEX.models["dinov2"].layer_label(4) == "block 4"
    assert ModelInfo("x", "X", 4, ("cls",), {"cls": (0, 1)}).layer_label(1) == "layer 1"  # no stored name


@pytest.mark.parametrize(
    ("model", "method", "layer", "head", "title"),
    [
        ("dinov2", "cls", 11, None, "All heads (fused) · block 11"),
        ("dinov2", "mean", 3, 7, "Head 7 · block 3"),
        ("siglip", "probe", 12, 2, "Head 2 · pooling head"),
        ("dinov2", "rollout", 5, None, "Attention rollout · up to block 5"),
        ("resnet50", "gradcam", 1, None, "Grad-CAM · stage layer2"),
    ],
)
def test_map_titles_are_method_specific(model: str, method: str, layer: int, head: int | None, title: str) -> None:
    assert state.map_title(INDEX.models[model], method, layer, head) == title


def test_value_labels() -> None:
    assert [state.value_label(m) for m in ("cls", "mean", "probe")] == ["attention"] * 3
    assert (state.value_label("rollout"), state.value_label("gradcam")) == ("rollout", "Grad-CAM")


# --- rules derived from the registry (roles, value labels, cumulative) ----------------------------------------


def test_defaults_follow_the_registrys_role_preference() -> None:
    """The most comparable method first: CLS-like (SigLIP's probe), whatever order the warehouse lists them."""
    assert state.default_method(SIGLIP) == "probe"  # listed second
    assert state.default_method(RESNET) == "gradcam"
    assert state.default_method(_vit("x", 4, 2, ("rollout", "mean"))) == "mean"  # no CLS-like: mean before flow
    first_siglip = WarehouseIndex({"siglip": SIGLIP, **INDEX.models}, INDEX.images)
    assert state.default_selection(first_siglip) == sel(model="siglip", method="probe", layer=12)


@pytest.mark.parametrize(
    ("model", "method", "expected"),
    [
        ("siglip", "cls", "probe"),  # same role
        ("dinov2", "probe", "cls"),
        ("resnet50", "cls", "gradcam"),  # the role's fallback
        ("resnet50", "rollout", "gradcam"),
        ("dinov2", "gradcam", "cls"),  # saliency falls back to CLS-like ...
        ("siglip", "gradcam", "probe"),
        ("dinov2", "unknown", "cls"),  # ... and an unknown method to the model's default
    ],
)
def test_counterparts_come_from_the_roles(model: str, method: str, expected: str) -> None:
    assert state.counterpart_method(INDEX.models[model], method) == expected


def test_compare_groups_are_the_roles_present() -> None:
    assert state.roles_present(INDEX) == ["cls", "mean", "flow", "saliency"]
    assert state.role_options(INDEX) == {
        "CLS-like (cls · probe · gradcam)": "cls",
        "Mean attention (mean · gradcam)": "mean",
        "Attention flow (rollout · gradcam)": "flow",
        "Saliency (cls · probe · gradcam)": "saliency",
    }
    assert [state.role_method(INDEX.models[m], "cls") for m in ("dinov2", "siglip", "resnet50")] == [
        "cls",
        "probe",
        "gradcam",
    ]
    assert state.default_role(INDEX) == "cls"
    vits_only = WarehouseIndex({"x": _vit("x", 4, 2, ("mean", "rollout"))}, INDEX.images)
    assert state.role_options(vits_only) == {"Mean attention (mean)": "mean", "Attention flow (rollout)": "flow"}
    assert state.default_role(vits_only) == "mean"
    with pytest.raises(ValueError, match="unknown role 'colour'; valid roles: cls, mean, flow, saliency"):
        state.role_method(INDEX.models["dinov2"], "colour")


def test_a_registered_method_brings_its_own_rules() -> None:
    """A method added to the registry only: its label, value label, cumulative title, role, counterpart and
    compare group reach the dashboard's rules with no change here."""
    import dataclasses

    from ssl_attention import registry

    toy = dataclasses.replace(
        registry.METHODS["rollout"], name="toyflow", label="Toy flow", value_label="toy mass", role="mean"
    )
    with registry.registered(toy, models=[]):
        info = _vit("toy", 4, 3, ("toyflow", "cls"))
        assert state.method_label("toyflow") == "Toy flow" and state.value_label("toyflow") == "toy mass"
        assert state.map_title(info, "toyflow", 2, None) == "Toy flow · up to block 2"  # cumulative
        assert not state.has_heads(info, "toyflow")
        assert state.counterpart_method(info, "mean") == "toyflow"  # the same role
        assert state.counterpart_method(INDEX.models["dinov2"], "toyflow") == "mean"
        index = WarehouseIndex({"toy": info}, INDEX.images)
        assert state.role_options(index) == {"CLS-like (cls)": "cls", "Mean attention (toyflow)": "mean"}
        plain = dataclasses.replace(toy, name="toyplain", label="Toy plain", cumulative=False)
    with registry.registered(plain, models=[]):
        assert state.map_title(_vit("toy", 4, 3, ("toyplain",)), "toyplain", 2, None) == "Toy plain · block 2"
    assert state.value_label("toyflow") == "attention"  # gone again: the registry's default label


# --- URL values that had to be replaced: each one named ------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "shown", "asked", "instead"),
    [
        ({"model": "nope"}, sel(), "model “nope”", "showing DINOV2 (dinov2)"),
        ({"method": "gradcam"}, sel(), "method “gradcam”", "showing CLS attention"),
        ({"layer": "99"}, sel(), "layer “99”", "(layers 0–11): showing block 11"),
        ({"layer": "1.5"}, sel(), "layer “1.5”", "showing block 11"),
        ({"head": "99"}, sel(), "head “99”", "does not exist (0–11): showing the fused map"),
        ({"head": "-3"}, sel(), "head “-3”", "does not exist (0–11): showing the fused map"),
        ({"head": "banana"}, sel(), "head “banana”", "not a head number: showing the fused map"),
        ({"method": "rollout", "head": "2"}, sel(method="rollout"), "head “2”", "no per-head maps"),
        ({"image": "gone.jpg"}, sel(), "image “gone.jpg” is not in this warehouse", "showing astronaut.jpg instead"),
    ],
)
def test_each_replaced_url_value_has_a_notice(
    query: dict[str, str], shown: Selection, asked: str, instead: str
) -> None:
    reading = state.read_query(query, INDEX)
    assert reading.selection == shown == state.from_query(query, INDEX)
    assert len(reading.notices) == 1, reading.notices
    assert asked in reading.notices[0] and instead in reading.notices[0]


def test_valid_url_values_have_no_notice() -> None:
    query = {"image": "cat.png", "model": "large", "method": "mean", "layer": "20", "head": "15"}
    assert state.read_query(query, INDEX) == state.QueryReading(
        sel(image="0123456789", model="large", method="mean", layer=20, head=15)
    )
    assert state.read_query({"head": "fused"}, INDEX).notices == ()
    # several bad values: one notice each, in the order model, method, layer, head, image
    notices = state.read_query({"model": "x", "layer": "x", "head": "x", "image": "x"}, INDEX).notices
    assert [n.split(" ", 1)[0] for n in notices] == ["model", "layer", "head", "image"]
