"""What the project knows about each model and method before loading anything.

Heads, layers, patch size and register count are *not* here: they always come from the loaded
checkpoint's own config (see ``ssl_attention.models.loading``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    name: str
    per_head: bool
    label: str
    description: str


@dataclass(frozen=True)
class ModelSpec:
    slug: str
    label: str
    family: str  # "vit" (attention) or "cnn" (Grad-CAM)
    default_weights: str  # hub id (transformers) or timm model name with tag
    methods: tuple[str, ...]
    has_cls: bool
    accepted_model_types: tuple[str, ...]  # transformers config.model_type values a checkpoint may have
    notes: str

    @property
    def per_head_methods(self) -> tuple[str, ...]:
        return tuple(m for m in self.methods if METHODS[m].per_head)


METHODS: dict[str, MethodSpec] = {
    "cls": MethodSpec(
        "cls", True, "CLS attention", "Attention of the CLS query over the patch tokens: A[l, h][cls, P]."
    ),
    "mean": MethodSpec(
        "mean", True, "Mean attention", "Attention received by each patch, averaged over all query tokens."
    ),
    "probe": MethodSpec(
        "probe",
        True,
        "Probe attention (SigLIP)",
        "Attention of the learned probe query of SigLIP's pooling head over the patch tokens.",
    ),
    "rollout": MethodSpec(
        "rollout",
        False,
        "Attention rollout",
        "Abnar & Zuidema (2020): R_l = norm(mean_h A_l + I) R_{l-1}; layer l holds layers 0..l.",
    ),
    "gradcam": MethodSpec(
        "gradcam",
        False,
        "Grad-CAM",
        "Selvaraju et al. (2017): ReLU(sum_k alpha_k F^k) for the top-1 class, per ResNet stage.",
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
    ),
}


class UnknownNameError(ValueError):
    """A user-supplied model, method or other name that is not one of the valid values."""


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
