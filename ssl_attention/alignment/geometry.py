"""Regions carried through a model's preprocessing onto its grid.

Coordinates are continuous pixel coordinates: pixel (row i, column j) covers [j, j+1) x [i, i+1), so a box
(x0, y0, x1, y1) with x1 = image width reaches the right edge. The original image is the one after EXIF
orientation (what ``ssl_attention.images`` decodes and what the processors see).

A processor resizes the (W, H) image to (resized_w, resized_h) and then takes an (input_w, input_h) window
at (crop_left, crop_top) of the resized image (a centre crop, or the whole image when there is none).
Both torchvision and PIL resample with pixel edges mapped onto pixel edges, so a point x of the original
lands at ``x * resized_w / W - crop_left`` in the input: ``InputTransform`` holds exactly these numbers.

The model's grid (grid_h x grid_w cells, raster order) is stretched uniformly over the input, as the
overlays draw it: cell (r, c) spans [c * input_w / grid_w, (c + 1) * input_w / grid_w) horizontally and
likewise vertically. Pooling a raster to the grid is the exact area average over that span: when the grid
divides the input (s x s pixels per cell) it is the plain mean of each s x s block; otherwise a pixel cut by
a cell boundary contributes to each cell in proportion to the part of it inside (Grad-CAM stages of inputs
that are not a multiple of 32, a ViT input that is not a multiple of the patch size).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Image-processor settings this module understands (transformers), and timm/torchvision transform classes
# that change pixel values only and so leave the geometry alone.
SUPPORTED_SIZE_FORMS = '{"shortest_edge": N} or {"height": H, "width": W}'
VALUE_ONLY_TRANSFORMS = frozenset(
    {"ToTensor", "MaybeToTensor", "PILToTensor", "MaybePILToTensor", "Normalize", "ConvertImageDtype", "ToDtype"}
)
GEOMETRIC_TRANSFORMS = ("Resize", "CenterCrop")


@dataclass(frozen=True)
class InputTransform:
    """What a processor did to an image of size (W, H): resize by (scale_x, scale_y), then keep the
    (input_w, input_h) window whose top-left corner is (crop_left, crop_top) in the resized image.
    A negative offset means the crop was larger than the resized image and was padded."""

    scale_x: float  # resized_w / W
    scale_y: float  # resized_h / H
    crop_left: int
    crop_top: int
    input_w: int
    input_h: int

    def apply(self, boxes: np.ndarray) -> np.ndarray:
        """(R, 4) boxes in original pixels -> (R, 4) boxes in input pixels, not clipped to the input."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        scale = np.array([self.scale_x, self.scale_y, self.scale_x, self.scale_y])
        offset = np.array([self.crop_left, self.crop_top, self.crop_left, self.crop_top], dtype=np.float64)
        return b * scale - offset


# --- deriving the transform ---------------------------------------------------------------------------


def shortest_edge_size(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """(w, h) after resizing the shorter side to ``shortest_edge`` keeping the aspect ratio; the longer side
    is truncated, as both transformers and torchvision do (``int(short_target * long / short)``)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (shortest_edge, new_long) if width <= height else (new_long, shortest_edge)


def _crop_offset(resized: int, crop: int, rounding: str) -> int:
    """Offset of a centre crop of length ``crop`` in a side of length ``resized`` (negative: padded).

    transformers' torchvision backend: ``int((n - c) / 2)``, padding ``(c - n) // 2`` on the left/top;
    transformers' PIL backend: ``(n - c) // 2`` in both cases; torchvision's CenterCrop (timm):
    ``int(round((n - c) / 2))`` (round half to even), padding ``(c - n) // 2``.
    """
    if rounding == "pil":
        return (resized - crop) // 2
    if crop > resized:
        return -((crop - resized) // 2)
    if rounding == "torchvision":
        return round((resized - crop) / 2.0)  # Python rounds half to even, as torchvision does
    return int((resized - crop) / 2.0)  # "transformers-torchvision"


def _setting(processor: Any, name: str) -> Any:
    if isinstance(processor, Mapping):
        return processor.get(name)
    return getattr(processor, name, None)


def _size_fields(size: Any, what: str) -> dict[str, int]:
    """A transformers size setting (a dict or a SizeDict) -> its non-empty fields."""
    if size is None:
        return {}
    if isinstance(size, int | float) or not hasattr(size, "__iter__"):
        raise ValueError(f"{what} {size!r} is a bare number; give it as {SUPPORTED_SIZE_FORMS}")
    fields = dict(size)
    return {k: v for k, v in fields.items() if v is not None}


def transform_from_processor(processor: Any, width: int, height: int) -> InputTransform:
    """The transform a transformers image processor (or a dict of its settings, as in
    ``preprocessor_config.json``) applies to a (width, height) image: ``do_resize`` with ``size`` as
    {"shortest_edge": N} (keep the aspect ratio) or {"height", "width"} (plain resize), then
    ``do_center_crop`` with ``crop_size`` {"height", "width"}. Any other size form raises ValueError."""
    _check_image_size(width, height)
    resized_w, resized_h = width, height
    if _setting(processor, "do_resize"):
        size = _size_fields(_setting(processor, "size"), "size")
        if set(size) == {"shortest_edge"}:
            resized_w, resized_h = shortest_edge_size(width, height, int(size["shortest_edge"]))
        elif set(size) == {"height", "width"}:
            resized_w, resized_h = int(size["width"]), int(size["height"])
        else:
            raise ValueError(f"unsupported processor size {size!r}; supported: {SUPPORTED_SIZE_FORMS}")
    crop_left = crop_top = 0
    input_w, input_h = resized_w, resized_h
    if _setting(processor, "do_center_crop"):
        crop = _size_fields(_setting(processor, "crop_size"), "crop_size")
        if set(crop) != {"height", "width"}:
            raise ValueError(f'unsupported crop_size {crop!r}; supported: {{"height": H, "width": W}}')
        input_w, input_h = int(crop["width"]), int(crop["height"])
        backend = _setting(processor, "backend") or "torchvision"  # transformers 5's default backend
        rounding = "pil" if backend == "pil" else "transformers-torchvision"
        crop_left = _crop_offset(resized_w, input_w, rounding)
        crop_top = _crop_offset(resized_h, input_h, rounding)
    return InputTransform(resized_w / width, resized_h / height, crop_left, crop_top, input_w, input_h)


def _resize_target(size: Any, max_size: int | None, width: int, height: int) -> tuple[int, int]:
    """torchvision Resize's output (w, h): an int or a 1-sequence resizes the shorter side, a pair is (h, w)."""
    if isinstance(size, int) or (isinstance(size, Sequence) and len(size) == 1):
        target = int(size if isinstance(size, int) else size[0])
        new_w, new_h = shortest_edge_size(width, height, target)
        if max_size is not None and max(new_w, new_h) > max_size:  # torchvision's second pass
            if new_w >= new_h:
                new_w, new_h = max_size, int(max_size * new_h / new_w)
            else:
                new_w, new_h = int(max_size * new_w / new_h), max_size
        return new_w, new_h
    h, w = size
    return int(w), int(h)


def transform_from_timm(transform: Any, width: int, height: int) -> InputTransform:
    """The transform a timm eval transform (a torchvision ``Compose`` of at most one ``Resize`` followed by
    at most one ``CenterCrop``, plus value-only steps such as ``Normalize``) applies to a (width, height)
    image. Any other geometric step raises ValueError naming it."""
    _check_image_size(width, height)
    steps = list(getattr(transform, "transforms", [transform]))
    geometric = [t for t in steps if type(t).__name__ not in VALUE_ONLY_TRANSFORMS]
    names = [type(t).__name__ for t in geometric]
    if names not in ([], ["Resize"], ["CenterCrop"], ["Resize", "CenterCrop"]):
        raise ValueError(
            f"unsupported preprocessing steps {names}: only {' then '.join(GEOMETRIC_TRANSFORMS)} (each optional) "
            f"change the geometry, besides value-only steps ({', '.join(sorted(VALUE_ONLY_TRANSFORMS))})"
        )
    resized_w, resized_h = width, height
    crop_left = crop_top = 0
    for step in geometric:
        if type(step).__name__ == "Resize":
            resized_w, resized_h = _resize_target(step.size, getattr(step, "max_size", None), width, height)
    input_w, input_h = resized_w, resized_h
    for step in geometric:
        if type(step).__name__ == "CenterCrop":
            size = step.size
            crop_h, crop_w = (size, size) if isinstance(size, int) else (size[0], size[-1])
            input_w, input_h = int(crop_w), int(crop_h)
            crop_left = _crop_offset(resized_w, input_w, "torchvision")
            crop_top = _crop_offset(resized_h, input_h, "torchvision")
    return InputTransform(resized_w / width, resized_h / height, crop_left, crop_top, input_w, input_h)


def input_transform(preprocess: Any, width: int, height: int) -> InputTransform:
    """The transform of a model adapter's ``preprocess``: a transformers image processor (it has
    ``image_mean``) or a timm/torchvision transform."""
    if hasattr(preprocess, "image_mean"):
        return transform_from_processor(preprocess, width, height)
    return transform_from_timm(preprocess, width, height)


def _check_image_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")


# --- regions in the input ----------------------------------------------------------------------------


def as_boxes(regions: Any) -> np.ndarray:
    """(R, 4) float64 boxes (x0, y0, x1, y1) from an array-like or from objects with x0, y0, x1, y1."""
    if isinstance(regions, np.ndarray):
        return regions.astype(np.float64).reshape(-1, 4)
    items = list(regions) if isinstance(regions, Iterable) else [regions]
    if not items:
        return np.zeros((0, 4))
    if hasattr(items[0], "x0"):
        return np.array([[r.x0, r.y0, r.x1, r.y1] for r in items], dtype=np.float64)
    return np.asarray(items, dtype=np.float64).reshape(-1, 4)


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def _clip(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    return np.clip(boxes, 0.0, np.array([width, height, width, height], dtype=np.float64))


@dataclass(frozen=True)
class MappedBoxes:
    boxes: np.ndarray  # (R, 4) in input pixels, not clipped (partly outside the view when cut by the crop)
    clipped: np.ndarray  # (R, 4) clipped to the input
    visible: np.ndarray  # (R,) visible fraction: clipped area / area; 0 = wholly outside the view, not scored

    @property
    def outside(self) -> np.ndarray:
        return self.visible <= 0


def map_boxes(regions: Any, transform: InputTransform) -> MappedBoxes:
    """Regions in original pixels -> the model input, with the fraction of each left visible by the crop."""
    boxes = transform.apply(as_boxes(regions))
    clipped = _clip(boxes, transform.input_w, transform.input_h)
    area = _area(boxes)
    visible = np.divide(_area(clipped), area, out=np.zeros(len(boxes)), where=area > 0)
    return MappedBoxes(boxes=boxes, clipped=clipped, visible=visible)


def _overlaps(lo: np.ndarray, hi: np.ndarray, bin_lo: np.ndarray, bin_hi: np.ndarray) -> np.ndarray:
    """(K, B) lengths of overlap of intervals [lo_k, hi_k) with bins [bin_lo_b, bin_hi_b)."""
    return np.clip(np.minimum(hi[:, None], bin_hi[None, :]) - np.maximum(lo[:, None], bin_lo[None, :]), 0, None)


def _elementary(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coordinate compression of a union of boxes: x edges (K+1,), y edges (L+1,) and inside (L, K), True
    where the elementary rectangle between consecutive edges lies in the union."""
    if len(boxes) == 1 and boxes[0, 0] < boxes[0, 2] and boxes[0, 1] < boxes[0, 3]:  # one box: itself
        return boxes[0, [0, 2]], boxes[0, [1, 3]], np.ones((1, 1), dtype=bool)
    xs = np.unique(np.concatenate([boxes[:, 0], boxes[:, 2]]))
    ys = np.unique(np.concatenate([boxes[:, 1], boxes[:, 3]]))
    xmid, ymid = (xs[:-1] + xs[1:]) / 2, (ys[:-1] + ys[1:]) / 2
    in_x = (boxes[:, 0, None] <= xmid[None, :]) & (xmid[None, :] < boxes[:, 2, None])  # (R, K)
    in_y = (boxes[:, 1, None] <= ymid[None, :]) & (ymid[None, :] < boxes[:, 3, None])  # (R, L)
    inside = (in_y[:, :, None] & in_x[:, None, :]).any(axis=0)
    return xs, ys, inside


def union_area(boxes: np.ndarray) -> float:
    """Exact area of the union of (R, 4) boxes."""
    boxes = as_boxes(boxes)
    boxes = boxes[_area(boxes) > 0]
    if len(boxes) == 0:
        return 0.0
    xs, ys, inside = _elementary(boxes)
    return float(np.diff(ys) @ inside.astype(np.float64) @ np.diff(xs))


def rasterise_union(boxes: np.ndarray, input_h: int, input_w: int) -> np.ndarray:
    """(input_h, input_w) exact fraction of each pixel covered by the union of (R, 4) input-pixel boxes."""
    boxes = _clip(as_boxes(boxes), input_w, input_h)
    boxes = boxes[_area(boxes) > 0]
    if len(boxes) == 0:
        return np.zeros((input_h, input_w))
    xs, ys, inside = _elementary(boxes)
    cols, rows = np.arange(input_w, dtype=np.float64), np.arange(input_h, dtype=np.float64)
    ox = _overlaps(xs[:-1], xs[1:], cols, cols + 1)  # (K, W)
    oy = _overlaps(ys[:-1], ys[1:], rows, rows + 1)  # (L, H)
    return oy.T @ inside.astype(np.float64) @ ox


def _pool_weights(size: int, cells: int) -> np.ndarray:
    """(cells, size): the share of each pixel [x, x+1) in each cell [c*size/cells, (c+1)*size/cells), divided
    by the cell's length, so a row dotted with a pixel row is the cell's mean."""
    edges = np.arange(cells + 1, dtype=np.float64) * size / cells
    pixels = np.arange(size, dtype=np.float64)
    return _overlaps(edges[:-1], edges[1:], pixels, pixels + 1) / (size / cells)


def pool_to_grid(raster: np.ndarray, grid_h: int, grid_w: int) -> np.ndarray:
    """(H, W) raster -> (grid_h, grid_w) area averages over the cells of the grid stretched over it."""
    if grid_h <= 0 or grid_w <= 0:
        raise ValueError(f"grid must be positive, got {grid_h}x{grid_w}")
    height, width = raster.shape
    if height % grid_h == 0 and width % grid_w == 0:  # whole pixels per cell: plain block means (no BLAS
        # call: OpenBLAS threads on these small products stall on a busy machine, ~100x slower), summed over
        # the rows of each block, then over its columns: contiguous reductions, 3-6x faster than .mean(axis=(1, 3))
        block_h, block_w = height // grid_h, width // grid_w
        rows = raster.reshape(grid_h, block_h, width).sum(axis=1)
        return rows.reshape(grid_h, grid_w, block_w).sum(axis=2) / (block_h * block_w)
    return _pool_weights(height, grid_h) @ raster @ _pool_weights(width, grid_w).T


def coverage_grid(regions: Any, transform: InputTransform, grid_h: int, grid_w: int) -> np.ndarray:
    """(grid_h * grid_w,) raster-order fraction of each cell's area covered by the union of the regions
    (original pixels), after the transform; the union is rasterised exactly at input resolution and
    area-pooled to the grid. All zeros when no region is visible."""
    mapped = map_boxes(regions, transform)
    raster = rasterise_union(mapped.clipped, transform.input_h, transform.input_w)
    return np.clip(pool_to_grid(raster, grid_h, grid_w).reshape(-1), 0.0, 1.0)


@dataclass
class _Gaussians:
    """Peak-1 Gaussians at pixel centres, one per region, as their separable factors: gy (R, H), gx (R, W)."""

    gy: np.ndarray
    gx: np.ndarray
    _raster: np.ndarray | None = None

    @classmethod
    def of(cls, centres: np.ndarray, sigmas: np.ndarray, input_h: int, input_w: int) -> _Gaussians:
        xc = np.arange(input_w, dtype=np.float64) + 0.5  # pixel centres
        yc = np.arange(input_h, dtype=np.float64) + 0.5
        gx = np.exp(-0.5 * ((xc[None, :] - centres[:, 0, None]) / sigmas[:, 0, None]) ** 2)  # (R, W)
        gy = np.exp(-0.5 * ((yc[None, :] - centres[:, 1, None]) / sigmas[:, 1, None]) ** 2)  # (R, H)
        return cls(gy, gx)

    def raster(self) -> np.ndarray:
        """(H, W) pixelwise max of the Gaussians (drawn once)."""
        if self._raster is None:
            raster = np.multiply(self.gy[0][:, None], self.gx[0][None, :])  # positive: the max's start
            scratch = np.empty_like(raster)
            for r in range(1, len(self.gy)):  # one region at a time keeps memory at two rasters
                np.maximum(raster, np.multiply(self.gy[r][:, None], self.gx[r][None, :], out=scratch), out=raster)
            self._raster = raster
        return self._raster

    def pooled(self, grid_h: int, grid_w: int) -> np.ndarray:
        """``pool_to_grid`` of the raster. One region on a dividing grid: its Gaussian is separable, so each
        cell's mean is the product of the 1-D block means (the same number, ~1e-16, without the raster)."""
        height, width = self.gy.shape[1], self.gx.shape[1]
        if len(self.gy) == 1 and height % grid_h == 0 and width % grid_w == 0:
            rows = self.gy[0].reshape(grid_h, height // grid_h).mean(axis=1)
            cols = self.gx[0].reshape(grid_w, width // grid_w).mean(axis=1)
            return np.outer(rows, cols)
        return pool_to_grid(self.raster(), grid_h, grid_w)


def _gaussian_raster(
    centres: np.ndarray, sigmas: np.ndarray, input_h: int, input_w: int
) -> np.ndarray:  # (R, 2) centres (x, y) and sigmas -> (H, W) pixelwise max of the peak-1 Gaussians
    return _Gaussians.of(centres, sigmas, input_h, input_w).raster()


def _normalised(values: np.ndarray) -> np.ndarray:
    total = values.sum()
    return values / total if total > 0 else np.zeros_like(values)


def soft_target_grid(regions: Any, transform: InputTransform, grid_h: int, grid_w: int) -> np.ndarray:
    """(grid_h * grid_w,) soft target, summing to 1 like a normalised map: per visible region an anisotropic
    Gaussian (peak 1) centred on the region's box in input pixels with sigma = max(side / 4, 1 px) per axis,
    evaluated at pixel centres, united by the pixelwise maximum, area-pooled to the grid and divided by its
    sum. A region cut by the crop keeps its whole box's centre and sigmas; a region wholly outside the view
    is left out. All zeros when no region is visible."""
    return _soft_target(map_boxes(regions, transform), transform, grid_h, grid_w)


def _soft_target(mapped: MappedBoxes, transform: InputTransform, grid_h: int, grid_w: int) -> np.ndarray:
    return _pooled_soft_target(_soft_raster(mapped, transform), grid_h, grid_w)


def _soft_raster(mapped: MappedBoxes, transform: InputTransform) -> _Gaussians | None:
    """The soft target before pooling: its regions' Gaussians at input resolution; None when no region is
    visible."""
    boxes = mapped.boxes[~mapped.outside]
    if len(boxes) == 0:
        return None
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
    sigmas = np.maximum(np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1) / 4, 1.0)
    return _Gaussians.of(centres, sigmas, transform.input_h, transform.input_w)


def _pooled_soft_target(gaussians: _Gaussians | None, grid_h: int, grid_w: int) -> np.ndarray:
    if gaussians is None:
        return np.zeros(grid_h * grid_w)
    return _normalised(gaussians.pooled(grid_h, grid_w).reshape(-1))


def uniform_baseline(grid_h: int, grid_w: int) -> np.ndarray:
    """(grid_h * grid_w,) the uniform map, 1 / N per cell."""
    n = grid_h * grid_w
    return np.full(n, 1.0 / n)


def centre_gaussian_baseline(input_h: int, input_w: int, grid_h: int, grid_w: int) -> np.ndarray:
    """(grid_h * grid_w,) a Gaussian centred on the input with sigma = 1/4 of each side, evaluated at pixel
    centres, area-pooled to the grid and normalised to sum 1 (the centre-bias baseline)."""
    centres = np.array([[input_w / 2, input_h / 2]])
    sigmas = np.array([[input_w / 4, input_h / 4]])
    raster = _gaussian_raster(centres, sigmas, input_h, input_w)
    return _normalised(pool_to_grid(raster, grid_h, grid_w).reshape(-1))


@dataclass(frozen=True)
class FeatureTargets:
    """One feature's regions on one model's grid for one image."""

    coverage: np.ndarray  # (N,) area fraction of each cell covered by the union
    soft_target: np.ndarray  # (N,) sums to 1 (all zeros when nothing is visible)
    area_fraction: float  # union area in the view / view area
    visible_fraction: float  # union area in the view / union area through the resize, crop ignored
    scored: bool  # False when every region lies wholly outside the view


def _cell_shares(edges: np.ndarray, size: int, cells: int) -> np.ndarray:
    """(K, cells): the length of each elementary interval [edges_k, edges_k+1) inside each cell, divided by
    the cell's length."""
    bounds = np.arange(cells + 1, dtype=np.float64) * size / cells
    return _overlaps(edges[:-1], edges[1:], bounds[:-1], bounds[1:]) / (size / cells)


def union_coverage(boxes: np.ndarray, input_h: int, input_w: int, grid_h: int, grid_w: int) -> np.ndarray:
    """(grid_h * grid_w,) the exact union area in each cell / the cell's area, straight from the union's
    elementary rectangles (input-pixel boxes), without a raster. Equal to ``coverage_grid`` when the grid
    divides the input; otherwise ``coverage_grid`` shares a pixel cut by a cell boundary in proportion to
    the pixel's area on each side, not to where inside the pixel the union lies."""
    return _union_cells(_union_elementary(boxes, input_h, input_w), input_h, input_w, grid_h, grid_w)


Elementary = tuple[np.ndarray, np.ndarray, np.ndarray]


def _union_elementary(boxes: np.ndarray, input_h: int, input_w: int) -> Elementary | None:
    """``_elementary`` of the boxes clipped to the input (None when none has an area there)."""
    boxes = _clip(as_boxes(boxes), input_w, input_h)
    boxes = boxes[_area(boxes) > 0]
    return _elementary(boxes) if len(boxes) else None


def _union_cells(elementary: Elementary | None, input_h: int, input_w: int, grid_h: int, grid_w: int) -> np.ndarray:
    if elementary is None:
        return np.zeros(grid_h * grid_w)
    xs, ys, inside = elementary
    cells = _cell_shares(ys, input_h, grid_h).T @ inside.astype(np.float64) @ _cell_shares(xs, input_w, grid_w)
    return np.clip(cells.reshape(-1), 0.0, 1.0)


def feature_targets(regions: Any, transform: InputTransform, grid_h: int, grid_w: int) -> FeatureTargets:
    """Coverage, soft target and the area and visible fractions of one feature's regions; the coverage is
    ``coverage_grid``'s (by ``union_coverage``, the same numbers, where the grid divides the input)."""
    return feature_targets_grids(regions, transform, [(grid_h, grid_w)])[(grid_h, grid_w)]


def feature_targets_grids(
    regions: Any, transform: InputTransform, grids: Iterable[tuple[int, int]]
) -> dict[tuple[int, int], FeatureTargets]:
    """``feature_targets`` on each (grid_h, grid_w) of ``grids`` (Grad-CAM's stages): the regions are mapped,
    their union measured and their soft target's raster drawn once, then pooled to each grid; the numbers are
    those of one grid at a time."""
    mapped = map_boxes(regions, transform)
    full = union_area(mapped.boxes)
    elementary = _union_elementary(mapped.clipped, transform.input_h, transform.input_w)  # the union in view
    seen = (
        0.0
        if elementary is None
        else float(np.diff(elementary[1]) @ elementary[2].astype(np.float64) @ np.diff(elementary[0]))
    )
    raster = _soft_raster(mapped, transform)
    out = {}
    for grid_h, grid_w in grids:
        if transform.input_h % grid_h == 0 and transform.input_w % grid_w == 0:
            coverage = _union_cells(elementary, transform.input_h, transform.input_w, grid_h, grid_w)
        else:  # the documented rule for grids that do not divide the input: the raster, pooled
            coverage = coverage_grid(regions, transform, grid_h, grid_w)
        out[(grid_h, grid_w)] = FeatureTargets(
            coverage=coverage,
            soft_target=_pooled_soft_target(raster, grid_h, grid_w),
            area_fraction=seen / (transform.input_w * transform.input_h),
            visible_fraction=seen / full if full > 0 else 0.0,
            scored=seen > 0,
        )
    return out


def observed_transform(preprocess: Any, width: int, height: int, input_h: int, input_w: int) -> InputTransform:
    """The transform of a (width, height) image that came out of ``preprocess`` at (input_h, input_w).

    ``input_transform`` of the processor's settings when its output size is the one observed; otherwise the
    size was set for this call (a per-image resolution: resize to the size asked for, no crop) and the
    transform is the plain resize to (input_w, input_h). Settings this module does not understand also
    fall back to the plain resize, which is exact for every preprocessing without a crop."""
    try:
        transform = input_transform(preprocess, width, height)
    except ValueError:
        transform = None
    if transform is not None and (transform.input_h, transform.input_w) == (input_h, input_w):
        return transform
    return InputTransform(input_w / width, input_h / height, 0, 0, input_w, input_h)
