"""Input resolution: what the user asks for per model, and the pixel size it gives each image.

``Resolution`` is ``"default"`` (the model's own image processor decides, today's behaviour: mostly a 224-px
centre crop) or an ``int`` N: the shorter side becomes N px, the other side follows the image's aspect ratio,
both rounded to multiples of the patch size (a CNN: its total stride), with no crop. A request whose patch grid
would exceed ``max_tokens`` patches is scaled down, aspect ratio kept (``scaled_size``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

Resolution = Literal["default"] | int
DEFAULT_RESOLUTION: Resolution = "default"
DEFAULT_MAX_TOKENS = 4096  # patches per image at most, for an N request


class ResolutionError(ValueError):
    """A resolution or token bound that cannot be used; the message names the model and the valid values."""


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def parse_resolution_value(text: str, model: str | None = None) -> Resolution:
    """``"default"`` or a positive integer (pixels of the shorter side)."""
    value = text.strip().lower()
    where = f" for {model}" if model else ""
    if value == "default":
        return "default"
    if not value.isdigit() or int(value) < 1:
        raise ResolutionError(
            f"resolution {text.strip()!r}{where}: expected 'default' or a positive number of pixels (e.g. 448)"
        )
    return int(value)


def parse_resolution(text: str, valid: Sequence[str]) -> dict[str, Resolution]:
    """``"default"``, ``"N"`` or ``"MODEL=VALUE,..."`` (plus at most one bare ``VALUE`` for the models not named)
    -> the resolution of every model in ``valid``; unnamed models get the bare value, else ``"default"``."""
    fallback: Resolution = DEFAULT_RESOLUTION
    named: dict[str, Resolution] = {}
    bare_seen = False
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise ResolutionError("--resolution is empty; valid: default, N (pixels), or MODEL=VALUE,...")
    for item in items:
        if not item:
            raise ResolutionError(f"--resolution {text!r}: an empty item between commas")
        model, sep, value = item.partition("=")
        if not sep:
            if bare_seen:
                raise ResolutionError(f"--resolution {text!r}: more than one value without a model name")
            fallback, bare_seen = parse_resolution_value(item), True
            continue
        model = model.strip().lower()
        if model not in valid:
            raise ResolutionError(f"--resolution {item!r}: unknown model {model!r}; valid models: {', '.join(valid)}")
        if model in named:
            raise ResolutionError(f"--resolution {text!r}: {model} is given twice")
        named[model] = parse_resolution_value(value, model)
    return {slug: named.get(slug, fallback) for slug in valid}


def check_resolution(resolution: Resolution, model: str, patch_size: int, unit: str = "patch") -> None:
    """A request below one patch (a CNN: one stride) is an error naming the model's patch size."""
    if resolution == "default":
        return
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
        raise ResolutionError(f"{model}: resolution {resolution!r}: expected 'default' or a positive integer")
    if resolution < patch_size:
        raise ResolutionError(
            f"{model}: resolution {resolution} px is below one {unit} ({patch_size} px); "
            f"use at least {patch_size} px, or 'default'"
        )


def check_max_tokens(max_tokens: int) -> None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ResolutionError(f"max tokens {max_tokens!r}: expected a positive integer (patches per image)")


def scaled_size(height: int, width: int, short_side: int, multiple: int, max_tokens: int) -> tuple[int, int]:
    """(H, W) for an image of ``height`` x ``width``: shorter side ``short_side``, the other following the aspect
    ratio, both rounded to the nearest multiple of ``multiple`` (at least one); then, if the grid
    (H / multiple) x (W / multiple) has more than ``max_tokens`` cells, shrunk by one factor (aspect kept) and
    rounded down until it fits.
    """
    if height < 1 or width < 1:
        raise ResolutionError(f"image size {width}x{height}: no pixels")
    check_max_tokens(max_tokens)
    scale = short_side / min(height, width)
    cells_h, cells_w = height * scale / multiple, width * scale / multiple  # fractional grid
    grid_h, grid_w = max(1, _round_half_up(cells_h)), max(1, _round_half_up(cells_w))
    if grid_h * grid_w > max_tokens:
        shrink = math.sqrt(max_tokens / (cells_h * cells_w))
        grid_h, grid_w = max(1, math.floor(cells_h * shrink)), max(1, math.floor(cells_w * shrink))
        while grid_h * grid_w > max_tokens:  # floor of a 1-wide side can still overshoot: trim the longer side
            if grid_h >= grid_w:
                grid_h -= 1
            else:
                grid_w -= 1
    return grid_h * multiple, grid_w * multiple


def describe(resolutions: Mapping[str, Resolution]) -> str:
    """{"dinov2": 518, "clip": "default"} -> "dinov2=518,clip=default" (the parser's own syntax)."""
    return ",".join(f"{model}={value}" for model, value in resolutions.items())
