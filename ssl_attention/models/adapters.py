"""Per-architecture forward adapters: one call per batch yields every method's maps.

``ViTAdapter`` runs one eager forward pass with ``output_attentions=True`` (plus SigLIP's pooling-head
weights, captured by hooks during the same pass); ``CNNAdapter`` runs Grad-CAM (one forward, one
backward). Heads, layers, patch size and registers are read from the loaded model's config.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ssl_attention.methods.blocks import MapBlock, TokenLayout, check_attentions
from ssl_attention.methods.gradcam import grad_cam
from ssl_attention.methods.passes import CNNPass, ForwardPass, ViTPass
from ssl_attention.models.weights import Provenance
from ssl_attention.registry import ModelSpec, get_method

CNN_STAGES = ("layer1", "layer2", "layer3", "layer4")


@contextlib.contextmanager
def full_float32(device: torch.device) -> Iterator[None]:
    """On CUDA, run float32 matmuls and convolutions without TF32 (10-bit mantissa), which would move
    softmax outputs by more than the 1e-3 the maps are meant to be accurate to. A no-op on the CPU."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@dataclass
class ModelAdapter:
    spec: ModelSpec
    module: nn.Module
    preprocess: Any  # a transformers image processor or a timm transform
    provenance: Provenance
    device: torch.device
    image_mean: tuple[float, ...] = field(init=False)
    image_std: tuple[float, ...] = field(init=False)

    def __post_init__(self) -> None:
        mean, std = _normalisation(self.preprocess)
        self.image_mean, self.image_std = tuple(mean), tuple(std)

    # --- shape facts, all from the model's own config ---
    @property
    def num_layers(self) -> int:
        raise NotImplementedError

    @property
    def num_heads(self) -> int:
        return 0

    @property
    def num_registers(self) -> int:
        return 0

    @property
    def patch_size(self) -> int | None:
        return None

    @property
    def layer_names(self) -> list[str]:
        raise NotImplementedError

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> (B, 3, H, W) float32 on the model's device, by the model's own preprocessing."""
        if hasattr(self.preprocess, "image_mean"):  # transformers image processor
            batch = self.preprocess(images=images, return_tensors="pt")["pixel_values"]
        else:  # timm transform, one image at a time
            batch = torch.stack([self.preprocess(img) for img in images])
        return batch.to(self.device, torch.float32)

    def display_images(self, pixel_values: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) normalised input -> (B, H, W, 3) uint8: exactly what the model saw (crop included)."""
        mean = torch.tensor(self.image_mean, device=pixel_values.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=pixel_values.device).view(1, 3, 1, 1)
        rgb = (pixel_values.detach() * std + mean).clamp(0, 1)
        return (rgb * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def forward(self, pixel_values: torch.Tensor) -> ForwardPass:
        """The one forward pass (Grad-CAM: forward and backward) every method of the model reads."""
        raise NotImplementedError

    def run(self, pixel_values: torch.Tensor) -> dict[str, list[MapBlock]]:
        """Every method of the model, computed from one forward pass, in registry order."""
        forward = self.forward(pixel_values)
        blocks: dict[str, list[MapBlock]] = {}
        for name in self.spec.methods:
            method = get_method(name)  # an unknown name raises, naming the valid ones
            if method.family != self.spec.family:
                raise ValueError(f"{self.spec.slug}: method {name!r} needs a {method.family} model")
            blocks[name] = method.compute(forward)
        return blocks


def _normalisation(preprocess: Any) -> tuple[list[float], list[float]]:
    if hasattr(preprocess, "image_mean"):
        mean, std = preprocess.image_mean, preprocess.image_std
        if isinstance(mean, float):
            mean, std = [mean] * 3, [std] * 3
        return list(mean), list(std)
    for transform in getattr(preprocess, "transforms", []):
        if hasattr(transform, "mean") and hasattr(transform, "std"):
            return [float(v) for v in transform.mean], [float(v) for v in transform.std]
    raise ValueError(f"cannot find the normalisation of preprocessing {preprocess!r}")


@dataclass
class ViTAdapter(ModelAdapter):
    @property
    def config(self) -> Any:
        return self.module.config

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def num_registers(self) -> int:
        return int(getattr(self.config, "num_register_tokens", 0) or 0)

    @property
    def patch_size(self) -> int:
        size = self.config.patch_size
        return int(size[0] if isinstance(size, list | tuple) else size)

    @property
    def needs_pooling_head(self) -> bool:
        return any(get_method(m).needs_pooling_head for m in self.spec.methods)

    @property
    def layer_names(self) -> list[str]:
        names = [f"block {i}" for i in range(self.num_layers)]
        if self.needs_pooling_head:
            names.append("pooling head")  # stored at layer index L, one past the last block
        return names

    def layout(self, pixel_values: torch.Tensor) -> TokenLayout:
        height, width = pixel_values.shape[-2:]
        return TokenLayout(
            has_cls=self.spec.has_cls,
            num_registers=self.num_registers,
            grid_h=height // self.patch_size,
            grid_w=width // self.patch_size,
        )

    def _call_kwargs(self, pixel_values: torch.Tensor, layout: TokenLayout) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        batch = pixel_values.shape[0]
        if self.spec.patch_order == "identity_noise":
            # ViTMAE shuffles patches by argsort(noise) and keeps the first (1 - mask_ratio) of them.
            # noise = arange(N) makes the shuffle the identity, so token i is raster patch i.
            kwargs["noise"] = (
                torch.arange(layout.num_patches, device=pixel_values.device, dtype=torch.float32)
                .unsqueeze(0)
                .expand(batch, -1)
            )
        if self.spec.position_interpolation == "flag":
            image_size = self.config.image_size
            expected = image_size if isinstance(image_size, list | tuple) else (image_size, image_size)
            if tuple(pixel_values.shape[-2:]) != tuple(expected):
                kwargs["interpolate_pos_encoding"] = True
        return kwargs

    def forward(self, pixel_values: torch.Tensor) -> ViTPass:
        layout = self.layout(pixel_values)
        captured: dict[str, torch.Tensor] = {}
        hooks = []
        if self.needs_pooling_head:
            head = getattr(self.module, "head", None)
            if head is None or not hasattr(head, "attention"):
                raise ValueError(f"{self.spec.slug}: the probe method needs the pooling head (vision_use_head)")
            hooks = _capture_probe(head.attention, captured)
        try:
            with torch.inference_mode(), full_float32(self.device):
                out = self.module(
                    pixel_values=pixel_values, output_attentions=True, **self._call_kwargs(pixel_values, layout)
                )
        finally:
            for hook in hooks:
                hook.remove()
        check_attentions(out.attentions, layout, self.num_layers, self.num_heads, pixel_values.shape[0])
        return ViTPass(
            attentions=out.attentions,
            layout=layout,
            layer_names=self.layer_names,
            pooling_attention=captured.get("probe"),
        )


def _capture_probe(attention: nn.MultiheadAttention, captured: dict[str, torch.Tensor]) -> list[Any]:
    """Hooks that make SigLIP's pooling MultiheadAttention return per-head weights and record them.

    The head calls ``attention(probe, x, x)`` and keeps only the output; asking the same call for
    unaveraged weights changes nothing else, so the pass stays a single forward.
    """

    def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = {**kwargs, "need_weights": True, "average_attn_weights": False}
        return args, kwargs

    def post_hook(_module: nn.Module, _args: tuple, _kwargs: dict, output: tuple) -> None:
        weights = output[1]  # (B, H, 1, N): the probe query over the N patch tokens
        if weights is None:
            raise RuntimeError("SigLIP pooling head returned no attention weights")
        captured["probe"] = weights

    return [
        attention.register_forward_pre_hook(pre_hook, with_kwargs=True),
        attention.register_forward_hook(post_hook, with_kwargs=True),
    ]


@dataclass
class CNNAdapter(ModelAdapter):
    @property
    def num_layers(self) -> int:
        return len(CNN_STAGES)

    @property
    def layer_names(self) -> list[str]:
        return list(CNN_STAGES)

    def forward(self, pixel_values: torch.Tensor) -> CNNPass:
        with full_float32(self.device):
            return CNNPass(gradcam=grad_cam(self.module, pixel_values, CNN_STAGES), stage_names=self.layer_names)
