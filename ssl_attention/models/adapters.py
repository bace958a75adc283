"""Per-architecture forward adapters: one call per batch yields every method's maps.

``ViTAdapter`` runs one eager forward pass with ``output_attentions=True`` (plus SigLIP's pooling-head
weights, captured by hooks during the same pass); ``CNNAdapter`` runs Grad-CAM (one forward, one
backward). Heads, layers, patch size and registers are read from the loaded model's config.

Every adapter takes images as (B, 3, H, W) at any size its resolution gives (``input_size``): ViTs interpolate
their position embeddings (``ModelSpec.position_interpolation``) or use RoPE; a NaFlex model gets the images as
patch sequences (``ModelSpec.pixel_layout``); the CNN takes any size. A batch holds images of one size.
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

from ssl_attention.methods.blocks import AttentionShapeError, MapBlock, TokenLayout, check_attentions
from ssl_attention.methods.gradcam import grad_cam
from ssl_attention.methods.passes import CNNPass, ForwardPass, ViTPass
from ssl_attention.models import preprocessing as prep
from ssl_attention.models.preprocessing import InputSizeError, Size
from ssl_attention.models.resolution import DEFAULT_MAX_TOKENS, Resolution, scaled_size
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


@dataclass(frozen=True)
class PatchSequence:
    """NaFlex input as its processor makes it: ``patches`` (B, S, p*p*3), each image's gh*gw patches in raster
    order followed by padding; ``mask`` (B, S), 1 for a real patch and 0 for padding; ``spatial_shapes``
    (B, 2) = (gh, gw). The adapter runs it and drops the padded positions from every attention it reads."""

    patches: torch.Tensor
    mask: torch.Tensor
    spatial_shapes: torch.Tensor


ModelInput = torch.Tensor | PatchSequence


@dataclass
class ModelAdapter:
    spec: ModelSpec
    module: nn.Module
    preprocess: Any  # a transformers image processor or a timm transform
    provenance: Provenance
    device: torch.device
    resolution: Resolution = "default"  # "default": the processor's own size; N: shorter side N px, no crop
    max_tokens: int = DEFAULT_MAX_TOKENS  # an N request with more patches than this is scaled down
    image_mean: tuple[float, ...] = field(init=False)
    image_std: tuple[float, ...] = field(init=False)
    _default_sizes: dict[tuple[int, int], Size] = field(init=False, default_factory=dict, repr=False)

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
    def size_multiple(self) -> int:
        """Input sides are multiples of this: the patch size of a ViT, the total stride of a CNN."""
        raise NotImplementedError

    @property
    def layer_names(self) -> list[str]:
        raise NotImplementedError

    def sequence_length(self, input_h: int, input_w: int) -> int:
        """Tokens T per image at this input size (a CNN: cells of its last stage); attention memory ~ T²."""
        return (input_h // self.size_multiple) * (input_w // self.size_multiple)

    # --- input sizes ---
    def input_size(self, width: int, height: int) -> Size:
        """(H, W) of the input made from an image of ``width`` x ``height`` pixels at this adapter's resolution."""
        if self.resolution == "default":
            key = (width, height)
            if key not in self._default_sizes:
                self._default_sizes[key] = self._default_size(width, height) or self._probe_size(width, height)
            return self._default_sizes[key]
        return scaled_size(height, width, int(self.resolution), self.size_multiple, self.max_tokens)

    def _default_size(self, width: int, height: int) -> Size | None:
        """The processor's own size, read from its config; None when only running it can tell."""
        return None

    def _probe_size(self, width: int, height: int) -> Size:
        height_px, width_px = self._preprocess([Image.new("RGB", (width, height))], None).shape[-2:]
        return int(height_px), int(width_px)

    def pixel_values(self, images: list[Image.Image], size: Size | None = None) -> torch.Tensor:
        """RGB PIL images -> (B, 3, H, W) float32 on the model's device, by the model's own preprocessing.

        At the default resolution the processor decides the size; at N every image must come out at the
        same ``input_size``: a batch holds one input size. ``size``, when given, is checked against the result.
        """
        target = None
        if self.resolution != "default":
            target = prep.common_size([self.input_size(*image.size) for image in images])
            if size is not None and tuple(size) != target:
                raise InputSizeError(f"{self.spec.slug}: requested {size} but the images' input size is {target}")
        batch = self._preprocess(images, target)
        if size is not None or target is not None:
            prep.check_size(batch, target or size, self.spec.slug)
        return batch.to(self.device, torch.float32)

    def _preprocess(self, images: list[Image.Image], size: Size | None) -> torch.Tensor:
        """(B, 3, H, W) at ``size``, or at the processor's own size when ``size`` is None."""
        raise NotImplementedError

    def display_images(self, pixel_values: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) normalised input -> (B, H, W, 3) uint8: exactly what the model saw (crop included)."""
        mean = torch.tensor(self.image_mean, device=pixel_values.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=pixel_values.device).view(1, 3, 1, 1)
        rgb = (pixel_values.detach() * std + mean).clamp(0, 1)
        return (rgb * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def forward(self, pixel_values: ModelInput) -> ForwardPass:
        """The one forward pass (Grad-CAM: forward and backward) every method of the model reads."""
        raise NotImplementedError

    def run(self, pixel_values: ModelInput) -> dict[str, list[MapBlock]]:
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
    def size_multiple(self) -> int:
        return self.patch_size

    @property
    def naflex(self) -> bool:
        return self.spec.pixel_layout == "naflex"

    @property
    def needs_pooling_head(self) -> bool:
        return any(get_method(m).needs_pooling_head for m in self.spec.methods)

    @property
    def layer_names(self) -> list[str]:
        names = [f"block {i}" for i in range(self.num_layers)]
        if self.needs_pooling_head:
            names.append("pooling head")  # stored at layer index L, one past the last block
        return names

    def sequence_length(self, input_h: int, input_w: int) -> int:
        return int(self.spec.has_cls) + self.num_registers + super().sequence_length(input_h, input_w)

    # --- preprocessing ---
    def _default_size(self, width: int, height: int) -> Size | None:
        if self.naflex:
            return prep.naflex_output_size(self.preprocess, width, height)
        return prep.processor_output_size(self.preprocess, width, height)

    def _preprocess(self, images: list[Image.Image], size: Size | None) -> torch.Tensor:
        processor = self.preprocess
        if self.naflex:
            if size is None:
                output = processor(images=images, return_tensors="pt")
            else:  # resized here (the processor's resample), patchified by the processor without padding
                height, width = size
                resized = [image.resize((width, height), prep.pil_resample(processor)) for image in images]
                patches = (height // self.patch_size) * (width // self.patch_size)
                output = processor(images=resized, return_tensors="pt", do_resize=False, max_num_patches=patches)
            return prep.naflex_images(output, self.patch_size)
        if size is None:
            return processor(images=images, return_tensors="pt")["pixel_values"]
        height, width = size
        kwargs = {"size": {"height": height, "width": width}, "do_center_crop": False}
        return processor(images=images, return_tensors="pt", **kwargs)["pixel_values"]

    # --- the forward pass ---
    def layout(self, pixel_values: ModelInput) -> TokenLayout:
        if isinstance(pixel_values, PatchSequence):
            grid_h, grid_w = _one_grid(pixel_values.spatial_shapes)
        else:
            height, width = pixel_values.shape[-2:]
            grid_h, grid_w = height // self.patch_size, width // self.patch_size
        return TokenLayout(has_cls=self.spec.has_cls, num_registers=self.num_registers, grid_h=grid_h, grid_w=grid_w)

    def model_inputs(self, pixel_values: ModelInput) -> dict[str, Any]:
        """The keyword arguments of the module's forward for this batch (attention outputs aside)."""
        if self.naflex:
            if isinstance(pixel_values, PatchSequence):
                sequence = pixel_values
            else:
                sequence = _as_sequence(pixel_values, self.patch_size)
            return {
                "pixel_values": sequence.patches,
                "pixel_attention_mask": sequence.mask,
                "spatial_shapes": sequence.spatial_shapes,
            }
        if isinstance(pixel_values, PatchSequence):
            raise TypeError(f"{self.spec.slug} takes images (B, 3, H, W), not a patch sequence")
        return {"pixel_values": pixel_values, **self._call_kwargs(pixel_values, self.layout(pixel_values))}

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

    def forward(self, pixel_values: ModelInput) -> ViTPass:
        layout = self.layout(pixel_values)
        inputs = self.model_inputs(pixel_values)
        captured: dict[str, torch.Tensor] = {}
        hooks = []
        if self.needs_pooling_head:
            head = getattr(self.module, "head", None)
            if head is None or not hasattr(head, "attention"):
                raise ValueError(f"{self.spec.slug}: the probe method needs the pooling head (vision_use_head)")
            hooks = _capture_probe(head.attention, captured)
        try:
            with torch.inference_mode(), full_float32(self.device):
                out = self.module(**inputs, output_attentions=True)
        finally:
            for hook in hooks:
                hook.remove()
        attentions, pooling = out.attentions, captured.get("probe")
        if "pixel_attention_mask" in inputs:
            attentions, pooling = _drop_padding(attentions, pooling, inputs["pixel_attention_mask"], layout)
        batch = int(inputs["pixel_values"].shape[0])
        check_attentions(attentions, layout, self.num_layers, self.num_heads, batch)
        return ViTPass(attentions=attentions, layout=layout, layer_names=self.layer_names, pooling_attention=pooling)


def _one_grid(spatial_shapes: torch.Tensor) -> tuple[int, int]:
    shapes = {tuple(int(v) for v in row) for row in spatial_shapes}
    if len(shapes) != 1:
        raise InputSizeError(f"images of different patch grids in one batch: {sorted(shapes)}; batch by input size")
    grid_h, grid_w = shapes.pop()
    return grid_h, grid_w


def _as_sequence(pixel_values: torch.Tensor, patch: int) -> PatchSequence:
    """Images (B, 3, H, W) -> their NaFlex patch sequence, no padding: every position is a real patch."""
    batch, _, height, width = pixel_values.shape
    patches = prep.patchify(pixel_values, patch)
    grid = torch.tensor([[height // patch, width // patch]] * batch, dtype=torch.long, device=pixel_values.device)
    mask = torch.ones(patches.shape[:2], dtype=torch.int32, device=pixel_values.device)
    return PatchSequence(patches=patches, mask=mask, spatial_shapes=grid)


PADDING_MASS_TOLERANCE = 1e-6


def _drop_padding(
    attentions: Any, pooling: torch.Tensor | None, mask: torch.Tensor, layout: TokenLayout
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Keep the N = gh*gw real patches of a NaFlex batch: rows and columns of the padded positions are cut from
    every attention (B, H, S, S) -> (B, H, N, N), and from the pooling head's (B, H, 1, S) -> (B, H, 1, N).

    Nothing is renormalised: the model masks padded keys out of every softmax, so they hold exactly zero
    mass and each kept row still sums to 1 over real patches (checked here); the padded query rows, which
    are not image content, are dropped whole.
    """
    count = layout.num_patches
    if not (bool(mask[:, :count].all()) and not bool(mask[:, count:].any())):
        raise InputSizeError("NaFlex mask does not mark exactly the first grid_h * grid_w positions as real")
    if attentions is None:
        return attentions, pooling
    kept = []
    for index, attn in enumerate(attentions):
        if attn is None:
            return list(attentions), pooling  # reported by check_attentions
        leaked = float(attn[:, :, :count, count:].sum(-1).max()) if attn.shape[-1] > count else 0.0
        if leaked > PADDING_MASS_TOLERANCE:
            raise AttentionShapeError(f"layer {index}: {leaked:.2e} of the attention went to padding patches")
        kept.append(attn[:, :, :count, :count])
    if pooling is not None:
        leaked = float(pooling[..., count:].sum(-1).max()) if pooling.shape[-1] > count else 0.0
        if leaked > PADDING_MASS_TOLERANCE:
            raise AttentionShapeError(f"pooling head: {leaked:.2e} of the attention went to padding patches")
        pooling = pooling[..., :count]
    return kept, pooling


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
    _transforms: dict[Size, Any] = field(init=False, default_factory=dict, repr=False)

    @property
    def num_layers(self) -> int:
        return len(CNN_STAGES)

    @property
    def layer_names(self) -> list[str]:
        return list(CNN_STAGES)

    @property
    def size_multiple(self) -> int:
        """The total stride of the last stage (32 for a ResNet), so every stage's grid divides the input."""
        info = getattr(self.module, "feature_info", None)
        reductions = []
        for entry in info or []:
            if isinstance(entry, dict) and entry.get("module") in CNN_STAGES:
                reductions.append(int(entry["reduction"]))
        return max(reductions, default=32)

    def _default_size(self, width: int, height: int) -> Size | None:
        return prep.timm_output_size(self.preprocess)

    def _preprocess(self, images: list[Image.Image], size: Size | None) -> torch.Tensor:
        transform = self.preprocess
        if size is not None:
            if size not in self._transforms:
                self._transforms[size] = prep.timm_transform_at(self.preprocess, size)
            transform = self._transforms[size]
        return torch.stack([transform(img) for img in images])  # one image at a time

    def forward(self, pixel_values: ModelInput) -> CNNPass:
        if isinstance(pixel_values, PatchSequence):
            raise TypeError(f"{self.spec.slug} takes images (B, 3, H, W), not a patch sequence")
        with full_float32(self.device):
            return CNNPass(gradcam=grad_cam(self.module, pixel_values, CNN_STAGES), stage_names=self.layer_names)
