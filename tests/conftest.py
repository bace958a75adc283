"""Shared fixtures: tiny checkpoints of every model, saved and loaded the way a user's local checkpoint is.

Nothing here downloads anything. Each tiny ViT is a real transformers model (2 layers, 4 heads, hidden 32,
patch 8, 32x32 input; the NaFlex SigLIP 2 takes at most 16 patches at each image's own aspect ratio) saved
with ``save_pretrained`` together with its image processor; the CNN is timm's
``test_resnet`` (stages layer1..layer4) saved with ``timm.models.save_for_hf``. Their weights are re-drawn
with a larger scale than the libraries' default init, so attention is peaked rather than nearly uniform
and the numeric tests below can tell right from almost-right.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = REPO_ROOT / "data" / "samples"

VIT_SLUGS = ("dinov2", "dinov3", "mae", "clip", "siglip", "siglip2", "siglip2_naflex")
ALL_SLUGS = (*VIT_SLUGS, "resnet50")
TINY_IMAGE = 32
TINY_PATCH = 8
TINY_NAFLEX_PATCHES = 16  # NaFlex: at most 16 patches of 8 px per image, at the image's own aspect ratio
TINY_REGISTERS = {"dinov2": 4, "dinov3": 2}


def _common(num_layers: int, num_heads: int, hidden: int, patch_size: int, image_size: int) -> dict[str, Any]:
    return {
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "hidden_size": hidden,
        "patch_size": patch_size,
        "image_size": image_size,
    }


def _vit_model_and_processor(
    slug: str,
    num_layers: int,
    num_heads: int,
    hidden: int,
    patch_size: int = TINY_PATCH,
    image_size: int = TINY_IMAGE,
) -> tuple[nn.Module, Any]:
    import transformers as tr

    common = _common(num_layers, num_heads, hidden, patch_size, image_size)
    size = {"height": image_size, "width": image_size}
    if slug == "dinov2":
        config = tr.Dinov2WithRegistersConfig(**common, mlp_ratio=2, num_register_tokens=TINY_REGISTERS["dinov2"])
        return tr.Dinov2WithRegistersModel(config), tr.BitImageProcessor(size=size, do_center_crop=False)
    if slug == "dinov3":
        config = tr.DINOv3ViTConfig(
            **common, intermediate_size=2 * hidden, num_register_tokens=TINY_REGISTERS["dinov3"]
        )
        return tr.DINOv3ViTModel(config), tr.DINOv3ViTImageProcessor(size=size)
    if slug == "mae":
        # mask_ratio stays at the hub default (0.75): the library must switch masking off itself.
        return tr.ViTMAEModel(tr.ViTMAEConfig(**common, intermediate_size=2 * hidden)), tr.ViTImageProcessor(size=size)
    if slug == "clip":
        config = tr.CLIPVisionConfig(**common, intermediate_size=2 * hidden)
        processor = tr.CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=size)
        return tr.CLIPVisionModel(config), processor
    if slug in ("siglip", "siglip2"):  # the fixed-resolution SigLIP 2 is SigLIP's architecture (bilinear resize)
        config = tr.SiglipVisionConfig(**common, intermediate_size=2 * hidden, vision_use_head=True)
        resample = 2 if slug == "siglip2" else 3
        return tr.SiglipVisionModel(config), tr.SiglipImageProcessor(size=size, resample=resample)
    if slug == "siglip2_naflex":
        naflex = {k: v for k, v in common.items() if k != "image_size"}  # no fixed size: num_patches instead
        config = tr.Siglip2VisionConfig(
            **naflex, intermediate_size=2 * hidden, num_patches=TINY_NAFLEX_PATCHES, vision_use_head=True
        )
        processor = tr.Siglip2ImageProcessor(patch_size=patch_size, max_num_patches=TINY_NAFLEX_PATCHES)
        return tr.Siglip2VisionModel(config), processor
    raise ValueError(slug)


@torch.no_grad()
def _sharpen(model: nn.Module) -> None:
    """Re-draw projection weights at a scale that gives peaked attention (default init is nearly uniform)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=1.5 / math.sqrt(module.in_features))
            if module.bias is not None:
                nn.init.normal_(module.bias, std=0.1)
        elif isinstance(module, nn.MultiheadAttention):
            nn.init.normal_(module.in_proj_weight, std=1.5 / math.sqrt(module.embed_dim))
            nn.init.normal_(module.in_proj_bias, std=0.1)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.5)
        elif isinstance(module, nn.LayerNorm) and module.weight is not None:
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.normal_(module.bias, std=0.1)
    for name, param in model.named_parameters():
        if name.endswith(("cls_token", "register_tokens", "probe", "class_embedding")):
            nn.init.normal_(param, std=1.0)


def save_tiny_vit(
    slug: str,
    directory: Path,
    seed: int = 0,
    num_layers: int = 2,
    num_heads: int = 4,
    hidden: int = 32,
    patch_size: int = TINY_PATCH,
    image_size: int = TINY_IMAGE,
) -> Path:
    """A tiny random ``slug`` ViT and its image processor, saved with ``save_pretrained`` into ``directory``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = _vit_model_and_processor(slug, num_layers, num_heads, hidden, patch_size, image_size)
        _sharpen(model)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def save_tiny_resnet(directory: Path, seed: int = 0) -> Path:
    """timm's tiny ``test_resnet`` (layer1..layer4), 64x64 input, 10 classes, with non-trivial BatchNorm."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model("test_resnet", num_classes=10, pretrained_cfg_overlay={"input_size": (3, 64, 64)})
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    nn.init.uniform_(module.weight, 0.5, 1.5)
                    nn.init.normal_(module.bias, std=0.1)
                    module.running_mean.normal_(std=0.1)
                    module.running_var.uniform_(0.5, 1.5)
            nn.init.normal_(model.fc.weight, std=0.5)
    directory.mkdir(parents=True, exist_ok=True)
    timm.models.save_for_hf(model.eval(), str(directory), safe_serialization=True)
    return directory


def save_tiny_checkpoint(slug: str, directory: Path, seed: int = 0, **sizes: int) -> Path:
    if slug == "resnet50":
        return save_tiny_resnet(directory, seed)
    return save_tiny_vit(slug, directory, seed, **sizes)


@pytest.fixture(scope="session")
def make_tiny_checkpoint() -> Callable[..., Path]:
    """``make(slug, directory, seed=0, num_layers=2, num_heads=4, hidden=32, patch_size=8, image_size=32)``
    -> directory (the sizes apply to ViTs)."""
    return save_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{slug: checkpoint dir} for every model, seeded."""
    root = tmp_path_factory.mktemp("tiny_checkpoints")
    return {slug: save_tiny_checkpoint(slug, root / slug, seed=index) for index, slug in enumerate(ALL_SLUGS)}


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    assert SAMPLES.is_dir(), f"bundled samples missing: {SAMPLES}"
    return SAMPLES


@pytest.fixture(scope="session")
def tiny_adapters(tiny_checkpoints: dict[str, Path]) -> dict[str, Any]:
    """{slug: adapter} loaded on the CPU through the local-checkpoint path (shared: do not mutate)."""
    from ssl_attention.models.loading import LoadRequest, load_model

    return {
        slug: load_model(slug, LoadRequest(checkpoint=path, device="cpu")) for slug, path in tiny_checkpoints.items()
    }


@pytest.fixture(scope="session")
def tiny_warehouse(tmp_path_factory: pytest.TempPathFactory, tiny_adapters: dict[str, Any], sample_dir: Path) -> Path:
    """A warehouse holding the bundled samples extracted by every tiny model (read-only for tests)."""
    from ssl_attention.extraction import catalog_images, extract_model

    warehouse = tmp_path_factory.mktemp("tiny_warehouse")
    report = catalog_images(sample_dir, warehouse)
    assert len(report.catalog.records) >= 4
    for adapter in tiny_adapters.values():
        run = extract_model(adapter, report.catalog.records, warehouse)
        assert run.images_extracted == len(report.catalog.records), run
    return warehouse


@pytest.fixture
def images_copy(tmp_path: Path, sample_dir: Path) -> Callable[[int], Path]:
    """``copy(n)``: a fresh folder with the first n bundled samples."""

    def copy(count: int) -> Path:
        folder = tmp_path / "images"
        folder.mkdir(exist_ok=True)
        for source in sorted(sample_dir.glob("*.jpg"))[:count]:
            shutil.copy(source, folder / source.name)
        return folder

    return copy
