"""The one registry: what the project knows about each method and each model before loading anything.

Every room reads its facts from here (extraction, checks, views, the dashboard, the CLI, the docs' tables);
none branches on a method's or a model's name. Adding a method is one ``MethodSpec`` here plus its ``compute``
function in ``ssl_attention.methods``; adding a model is one ``ModelSpec`` plus its random-mode config files in
``models/configs/<slug>/`` (see docs/architecture.md).

Heads, layers, patch size and register count are *not* here: they always come from the loaded checkpoint's
own config (see ``ssl_attention.models.loading``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ssl_attention.methods.attention import cls_maps, mean_maps, probe_maps
from ssl_attention.methods.blocks import MapBlock
from ssl_attention.methods.gradcam import gradcam_maps
from ssl_attention.methods.passes import ForwardPass
from ssl_attention.methods.rollout import rollout_maps

Family = Literal["vit", "cnn"]
# The part a method plays, from which the dashboard's counterparts, defaults and compare groups derive:
# "cls": one query's view of the image (CLS row, SigLIP's probe); "mean": attention received, averaged over
# queries; "flow": attention propagated through the layers; "saliency": gradient-based class evidence.
Role = Literal["cls", "mean", "flow", "saliency"]
ROLE_LABELS: dict[str, str] = {
    "cls": "CLS-like",
    "mean": "Mean attention",
    "flow": "Attention flow",
    "saliency": "Saliency",
}
# Where a model lacks every method of a role, the roles that stand in for it, in order.
ROLE_FALLBACKS: dict[str, tuple[str, ...]] = {
    "cls": ("saliency",),
    "mean": ("saliency",),
    "flow": ("saliency",),
    "saliency": ("cls", "flow"),
}
# The most comparable map across models first: a model's default method is its first by this order.
ROLE_PREFERENCE: tuple[str, ...] = ("cls", "saliency", "mean", "flow")


def all_layers(num_layers: int) -> list[int]:
    return list(range(num_layers))


def after_last_layer(num_layers: int) -> list[int]:
    """A pooling head after the last encoder block is stored at layer index L."""
    return [num_layers]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    label: str
    role: Role
    family: Family  # which forward pass feeds ``compute``: a ViT's attentions or a CNN's Grad-CAM pass
    compute: Callable[[ForwardPass], list[MapBlock]]
    per_head: bool  # per-head maps plus the fused map (head NULL), or the fused map alone
    mass_sums_to_one: bool  # patch mass + prefix mass = 1 for every row (softmax rows and their means/products)
    cumulative: bool  # layer l summarises layers 0..l (rollout), rather than layer l alone
    value_label: str  # what the values are: the colour bar's title and the hover label
    glossary: str  # one-line definition, shown in the dashboard's glossary and the docs
    stored_layers: Callable[[int], list[int]] = all_layers  # layer indices stored, given the model's L
    needs_pooling_head: bool = False  # the forward pass must capture the attention-pooling head's weights


@dataclass(frozen=True)
class ModelSpec:
    slug: str
    label: str
    family: Family
    default_weights: str  # hub id (transformers) or timm model name with tag
    methods: tuple[str, ...]
    has_cls: bool
    accepted_model_types: tuple[str, ...]  # transformers config.model_type values a checkpoint may have
    notes: str
    model_class: str = "AutoModel"  # the transformers class that loads it ("timm" for timm models)
    config_overrides: Mapping[str, Any] = field(default_factory=dict)  # applied to every config it loads with
    # How patch tokens are ordered: "raster", or "identity_noise" for MAE, which shuffles patches by
    # argsort(noise) and so is called with noise = arange(N) to keep raster order.
    patch_order: Literal["raster", "identity_noise"] = "raster"
    # How inputs of another size than config.image_size are handled: "native" (the model interpolates or uses
    # RoPE by itself), or "flag" (it must be called with interpolate_pos_encoding=True).
    position_interpolation: Literal["native", "flag"] = "native"
    gated: bool = False  # the hub repository needs an accepted licence and a token
    processor_defaults: Mapping[str, Any] = field(default_factory=dict)  # kwargs for its image processor
    # How pixels enter the model: "grid", images (B, 3, H, W); or "naflex", each image as a sequence of
    # flattened patches with pixel_attention_mask and spatial_shapes (SigLIP 2 NaFlex, any aspect ratio).
    pixel_layout: Literal["grid", "naflex"] = "grid"

    @property
    def per_head_methods(self) -> tuple[str, ...]:
        return tuple(m for m in self.methods if METHODS[m].per_head)


METHODS: dict[str, MethodSpec] = {
    "cls": MethodSpec(
        name="cls",
        label="CLS attention",
        role="cls",
        family="vit",
        compute=cls_maps,
        per_head=True,
        mass_sums_to_one=True,
        cumulative=False,
        value_label="attention",
        glossary="Attention of the CLS query over the patch tokens: A[l, h][cls, P].",
    ),
    "mean": MethodSpec(
        name="mean",
        label="Mean attention",
        role="mean",
        family="vit",
        compute=mean_maps,
        per_head=True,
        mass_sums_to_one=True,
        cumulative=False,
        value_label="attention",
        glossary="Attention received by each patch, averaged over all query tokens.",
    ),
    "probe": MethodSpec(
        name="probe",
        label="Probe attention (SigLIP)",
        role="cls",
        family="vit",
        compute=probe_maps,
        per_head=True,
        mass_sums_to_one=True,
        cumulative=False,
        value_label="attention",
        glossary="Attention of the learned probe query of SigLIP's pooling head over the patch tokens.",
        stored_layers=after_last_layer,
        needs_pooling_head=True,
    ),
    "rollout": MethodSpec(
        name="rollout",
        label="Attention rollout",
        role="flow",
        family="vit",
        compute=rollout_maps,
        per_head=False,
        mass_sums_to_one=True,
        cumulative=True,
        value_label="rollout",
        glossary="Abnar & Zuidema (2020): R_l = norm(mean_h A_l + I) R_{l-1}; layer l holds layers 0..l.",
    ),
    "gradcam": MethodSpec(
        name="gradcam",
        label="Grad-CAM",
        role="saliency",
        family="cnn",
        compute=gradcam_maps,
        per_head=False,
        mass_sums_to_one=False,  # sums to 1, or to 0 where the cam is all zero
        cumulative=False,
        value_label="Grad-CAM",
        glossary="Selvaraju et al. (2017): ReLU(sum_k alpha_k F^k) for the top-1 class, per ResNet stage.",
    ),
}

MODELS: dict[str, ModelSpec] = {
    "dinov2": ModelSpec(
        slug="dinov2",
        label="DINOv2 ViT-B/14 (registers)",
        family="vit",
        default_weights="facebook/dinov2-with-registers-base",
        methods=("cls", "mean", "rollout"),
        has_cls=True,
        accepted_model_types=("dinov2_with_registers", "dinov2"),
        notes="Sequence: CLS, registers, patches. Register tokens are dropped from the map; their mass is kept.",
    ),
    "dinov3": ModelSpec(
        slug="dinov3",
        label="DINOv3 ViT-B/16",
        family="vit",
        default_weights="facebook/dinov3-vitb16-pretrain-lvd1689m",
        methods=("cls", "mean", "rollout"),
        has_cls=True,
        accepted_model_types=("dinov3_vit",),
        notes="Sequence: CLS, registers, patches; RoPE positions. The hub repository is gated.",
        gated=True,
    ),
    "mae": ModelSpec(
        slug="mae",
        label="MAE ViT-B/16",
        family="vit",
        default_weights="facebook/vit-mae-base",
        methods=("cls", "mean", "rollout"),
        has_cls=True,
        accepted_model_types=("vit_mae",),
        notes="Run with mask_ratio=0 and noise=arange(N) so the encoder sees every patch in raster order.",
        config_overrides={"mask_ratio": 0.0},  # never drop patches
        patch_order="identity_noise",
        position_interpolation="flag",
    ),
    "clip": ModelSpec(
        slug="clip",
        label="CLIP ViT-B/16 (vision tower)",
        family="vit",
        default_weights="openai/clip-vit-base-patch16",
        methods=("cls", "mean", "rollout"),
        has_cls=True,
        accepted_model_types=("clip", "clip_vision_model"),
        notes="Pre-LayerNorm ViT; only the vision tower is loaded.",
        model_class="CLIPVisionModel",
        position_interpolation="flag",
    ),
    "siglip": ModelSpec(
        slug="siglip",
        label="SigLIP ViT-B/16 (vision tower)",
        family="vit",
        default_weights="google/siglip-base-patch16-224",
        methods=("mean", "probe", "rollout"),
        has_cls=False,
        accepted_model_types=("siglip", "siglip_vision_model"),
        notes="No CLS token: the pooling head's probe query plays its part. Rollout uses the mean row.",
        model_class="SiglipVisionModel",
        position_interpolation="flag",
    ),
    "siglip2": ModelSpec(
        slug="siglip2",
        label="SigLIP 2 ViT-B/16 (vision tower)",
        family="vit",
        default_weights="google/siglip2-base-patch16-224",
        methods=("mean", "probe", "rollout"),
        has_cls=False,
        accepted_model_types=("siglip", "siglip_vision_model"),
        notes="Fixed resolution (224 px); SigLIP's architecture with SigLIP 2 weights. No CLS token: the pooling "
        "head's probe query plays its part.",
        model_class="SiglipVisionModel",
        position_interpolation="flag",
    ),
    "siglip2_naflex": ModelSpec(
        slug="siglip2_naflex",
        label="SigLIP 2 ViT-B/16 NaFlex (vision tower)",
        family="vit",
        default_weights="google/siglip2-base-patch16-naflex",
        methods=("mean", "probe", "rollout"),
        has_cls=False,
        accepted_model_types=("siglip2", "siglip2_vision_model"),
        notes="NaFlex: each image at its own aspect ratio (up to 256 patches by default), fed as a patch "
        "sequence; padding patches are never stored, nor counted in a mass.",
        model_class="Siglip2VisionModel",
        pixel_layout="naflex",
    ),
    "resnet50": ModelSpec(
        slug="resnet50",
        label="ResNet-50 (timm, ImageNet)",
        family="cnn",
        default_weights="resnet50.a1_in1k",
        methods=("gradcam",),
        has_cls=False,
        accepted_model_types=(),
        notes="A CNN: no heads. Grad-CAM for the top-1 class at each stage (layer1..layer4).",
        model_class="timm",
    ),
}


class UnknownNameError(ValueError):
    """A user-supplied model, method or other name that is not one of the valid values."""


def get_method(name: str) -> MethodSpec:
    spec = METHODS.get(name)
    if spec is None:
        raise UnknownNameError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return spec


def get_model(slug: str) -> ModelSpec:
    spec = MODELS.get(slug)
    if spec is None:
        raise UnknownNameError(f"unknown model {slug!r}; valid models: {', '.join(MODELS)}")
    return spec


def parse_model_list(text: str) -> list[str]:
    """``"all"`` or a comma-separated list of model slugs, validated, in registry order."""
    text = text.strip()
    if text in ("", "all"):
        return list(MODELS)
    wanted = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [m for m in wanted if m not in MODELS]
    if unknown:
        raise UnknownNameError(f"unknown model(s): {', '.join(unknown)}; valid models: all, {', '.join(MODELS)}")
    return [m for m in MODELS if m in wanted]


# --- rules derived from the roles ----------------------------------------------------------------------


def default_method(available: Sequence[str]) -> str:
    """The most comparable method across models among ``available`` (registry names): the first by role
    preference (CLS-like, then saliency, mean, flow), registry order within a role."""
    if not available:
        raise ValueError("no methods to choose from")
    for role in ROLE_PREFERENCE:
        for name in METHODS:
            if name in available and METHODS[name].role == role:
                return name
    return available[0]


def counterpart(method: str, available: Sequence[str]) -> str:
    """``method`` if available, else the available method that plays its part (same role, then the role's
    fallbacks), else the default of ``available``."""
    if method in available:
        return method
    spec = METHODS.get(method)
    if spec is not None:
        for role in (spec.role, *ROLE_FALLBACKS.get(spec.role, ())):
            for name in METHODS:
                if name in available and METHODS[name].role == role:
                    return name
    return default_method(available)


# --- temporary registration (tests) ---------------------------------------------------------------------


@contextlib.contextmanager
def registered(method: MethodSpec, models: Sequence[str]) -> Iterator[None]:
    """Register ``method`` and add it to ``models`` for the duration of the block, then restore the registry.

    The registry's tables are module-level dicts that every room reads, so a method registered here flows
    through extraction, the warehouse, SQL and the dashboard like a built-in one (tests/test_registry.py).
    """
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered already")
    saved = {slug: get_model(slug) for slug in models}
    METHODS[method.name] = method
    for slug, spec in saved.items():
        MODELS[slug] = dataclasses.replace(spec, methods=(*spec.methods, method.name))
    try:
        yield
    finally:
        METHODS.pop(method.name, None)
        MODELS.update(saved)
