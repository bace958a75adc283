"""Images -> the pixel tensors a model sees, at its own default size or at a requested one.

Every model's input is kept as images (B, 3, H, W), normalised the model's way; a NaFlex model's patch
sequence is derived from them (``patchify``) right before its forward pass, so no padding ever enters it.

- transformers processors at a requested (H, W): the processor's own resize (its resample, its antialiasing)
  with ``size={"height": H, "width": W}`` and ``do_center_crop=False``;
- the NaFlex processor (SigLIP 2) at (H, W): the image is resized here with the processor's resample, then
  patchified by the processor without a resize and with ``max_num_patches`` = its own patch count;
- timm transforms at (H, W): the same transform with its resize and centre crop replaced by one resize to (H, W).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

Size = tuple[int, int]  # (height, width) in pixels


class InputSizeError(ValueError):
    """Images of different input sizes in one batch, or a preprocessing that missed its requested size."""


def is_transformers_processor(preprocess: Any) -> bool:
    return hasattr(preprocess, "image_mean")


def _field(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def processor_output_size(processor: Any, width: int, height: int) -> Size | None:
    """What a transformers processor makes of an image of ``width`` x ``height`` at its defaults, from its
    config (crop, fixed size, or shortest edge); None where the config says something else."""
    crop = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and crop is not None:
        crop_h, crop_w = _field(crop, "height"), _field(crop, "width")
        if crop_h and crop_w:
            return crop_h, crop_w
    size = getattr(processor, "size", None)
    if size is None:
        return None
    fixed_h, fixed_w = _field(size, "height"), _field(size, "width")
    if fixed_h and fixed_w:
        return fixed_h, fixed_w
    shortest, longest = _field(size, "shortest_edge"), _field(size, "longest_edge")
    if shortest and not longest:  # transformers' rule: short side -> shortest_edge, long side scaled, truncated
        short, long = min(width, height), max(width, height)
        other = int(shortest * long / short)
        return (shortest, other) if height <= width else (other, shortest)
    return None


def naflex_output_size(processor: Any, width: int, height: int) -> Size:
    """The NaFlex processor's own size for an image: the largest at its aspect ratio within max_num_patches."""
    from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

    return get_image_size_for_max_num_patches(height, width, int(processor.patch_size), int(processor.max_num_patches))


def timm_output_size(transform: Any) -> Size | None:
    """The centre crop of a timm eval transform (its output size whatever the input), if it has one."""
    from torchvision import transforms as T

    for step in getattr(transform, "transforms", []):
        if isinstance(step, T.CenterCrop):
            height, width = step.size if len(step.size) == 2 else (step.size[0], step.size[0])
            return int(height), int(width)
    return None


def timm_transform_at(transform: Any, size: Size) -> Any:
    """``transform`` with its resize and centre crop replaced by one resize to exactly ``size``, no crop."""
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", []))
    resize = next((s for s in steps if isinstance(s, T.Resize)), None)
    interpolation = resize.interpolation if resize is not None else T.InterpolationMode.BICUBIC
    rest = [s for s in steps if not isinstance(s, T.Resize | T.CenterCrop)]
    return T.Compose([T.Resize(size, interpolation=interpolation, antialias=True), *rest])


def pil_resample(processor: Any) -> Image.Resampling:
    resample = getattr(processor, "resample", None)
    try:
        return Image.Resampling(int(resample))
    except (TypeError, ValueError):
        return Image.Resampling.BILINEAR


# --- NaFlex patch sequences ---------------------------------------------------------------------------------


def patchify(pixel_values: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, gh*gw, p*p*C): raster order of patches; within a patch (row, column, channel), the
    order of the SigLIP 2 processor's ``convert_image_to_patches``."""
    batch, channels, height, width = pixel_values.shape
    grid_h, grid_w = height // patch, width // patch
    x = pixel_values.reshape(batch, channels, grid_h, patch, grid_w, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, grid_h * grid_w, patch * patch * channels)


def unpatchify(patches: torch.Tensor, grid_h: int, grid_w: int, patch: int) -> torch.Tensor:
    """The inverse of ``patchify`` for the first gh*gw patches of each row: (B, S, p*p*C) -> (B, C, H, W)."""
    batch = patches.shape[0]
    channels = patches.shape[-1] // (patch * patch)
    x = patches[:, : grid_h * grid_w].reshape(batch, grid_h, grid_w, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, grid_h * patch, grid_w * patch)


def naflex_images(output: Any, patch: int) -> torch.Tensor:
    """A NaFlex processor's output (padded patch sequences) -> images (B, 3, H, W), padding dropped; every
    image of the batch must have the same patch grid."""
    shapes = {tuple(int(v) for v in s) for s in output["spatial_shapes"]}
    if len(shapes) != 1:
        raise InputSizeError(f"images of different patch grids in one batch: {sorted(shapes)}; batch by input size")
    grid_h, grid_w = shapes.pop()
    mask = torch.as_tensor(output["pixel_attention_mask"])
    count = grid_h * grid_w
    if not (bool(mask[:, :count].all()) and not bool(mask[:, count:].any())):
        raise InputSizeError("NaFlex mask does not mark exactly the first grid_h * grid_w patches as real")
    return unpatchify(torch.as_tensor(output["pixel_values"]), grid_h, grid_w, patch)


def check_size(pixel_values: torch.Tensor, size: Size, what: str) -> None:
    got = tuple(int(v) for v in pixel_values.shape[-2:])
    if got != tuple(size):
        raise InputSizeError(f"{what}: preprocessing gave {got[0]}x{got[1]} px, expected {size[0]}x{size[1]}")


def common_size(sizes: Sequence[Size]) -> Size:
    distinct = sorted(set(sizes))
    if len(distinct) != 1:
        listed = ", ".join(f"{h}x{w}" for h, w in distinct)
        raise InputSizeError(f"images of different input sizes in one batch ({listed}); batch by input size")
    return distinct[0]
