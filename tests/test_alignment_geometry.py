"""Regions through each model's preprocessing, against hand computations and the real processors' output."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm.data
from PIL import Image
from transformers import AutoImageProcessor

from ssl_attention.alignment.annotations import parse_annotations
from ssl_attention.alignment.geometry import (
    InputTransform,
    centre_gaussian_baseline,
    coverage_grid,
    feature_targets,
    feature_targets_grids,
    input_transform,
    map_boxes,
    pool_to_grid,
    rasterise_union,
    soft_target_grid,
    transform_from_processor,
    transform_from_timm,
    uniform_baseline,
    union_area,
)
from ssl_attention.images import load_image, scan_images
from ssl_attention.models.weights import CONFIG_DIR

VIT_CONFIGS = ("clip", "dinov2", "dinov3", "mae", "siglip")


def processor(slug: str, **overrides):
    return AutoImageProcessor.from_pretrained(str(CONFIG_DIR / slug), **overrides)


def timm_transform():
    pretrained_cfg = json.loads((CONFIG_DIR / "resnet50" / "config.json").read_text())["pretrained_cfg"]
    return timm.data.create_transform(**timm.data.resolve_data_config({}, pretrained_cfg=pretrained_cfg))


def mapped(transform: InputTransform, box) -> np.ndarray:
    return map_boxes(np.array([box], dtype=np.float64), transform).boxes[0]


# --- the transform, by hand ------------------------------------------------------------------------


def test_shortest_edge_resize_and_centre_crop_dinov2():
    # 640 x 480: short side 480 -> 256, long side int(256 * 640 / 480) = int(341.33) = 341;
    # crop 224: left int((341 - 224) / 2) = 58, top int((256 - 224) / 2) = 16
    t = transform_from_processor(processor("dinov2"), 640, 480)
    assert t == InputTransform(341 / 640, 256 / 480, 58, 16, 224, 224)
    box = mapped(t, (100, 120, 300, 360))
    assert box == pytest.approx(
        [100 * 341 / 640 - 58, 120 * 256 / 480 - 16, 300 * 341 / 640 - 58, 360 * 256 / 480 - 16]
    )
    # a region cut by the crop: x from 100 * 0.5328 - 58 = -4.72 to 101.84, y from 48 to 176 (inside)
    m = map_boxes(np.array([[100, 120, 300, 360]]), t)
    width = 300 * 341 / 640 - 100 * 341 / 640
    assert m.visible[0] == pytest.approx((300 * 341 / 640 - 58) / width)


def test_shortest_edge_resize_and_centre_crop_clip_portrait():
    # 480 x 640 (portrait): short side 480 -> 224, long int(224 * 640 / 480) = int(298.67) = 298;
    # crop 224: left 0, top int((298 - 224) / 2) = 37
    t = transform_from_processor(processor("clip"), 480, 640)
    assert t == InputTransform(224 / 480, 298 / 640, 0, 37, 224, 224)
    assert mapped(t, (240, 320, 480, 640)) == pytest.approx([112, 320 * 298 / 640 - 37, 224, 298 - 37])


@pytest.mark.parametrize("slug", ["siglip", "mae", "dinov3"])
def test_plain_resize(slug):
    t = transform_from_processor(processor(slug), 640, 480)
    assert t == InputTransform(224 / 640, 224 / 480, 0, 0, 224, 224)
    # (160, 120, 480, 360) is the middle half of each side: (56, 56, 168, 168)
    assert mapped(t, (160, 120, 480, 360)) == pytest.approx([56, 56, 168, 168])


def test_timm_resize_and_centre_crop_rounds_half_to_even():
    # crop_pct 0.95: Resize(int(224 / 0.95) = 235) then CenterCrop(224). 640 x 480 -> 313 x 235
    # (int(235 * 640 / 480) = int(313.33)); torchvision's crop offsets: round(89 / 2 = 44.5) = 44 and
    # round(11 / 2 = 5.5) = 6 (half to even), where transformers would truncate both to 44 and 5
    t = transform_from_timm(timm_transform(), 640, 480)
    assert t == InputTransform(313 / 640, 235 / 480, 44, 6, 224, 224)


def test_settings_dict_gives_the_same_transform_as_the_processor():
    for slug in VIT_CONFIGS:
        settings = json.loads((CONFIG_DIR / slug / "preprocessor_config.json").read_text())
        for size in [(640, 480), (301, 517)]:
            assert transform_from_processor(settings, *size) == transform_from_processor(processor(slug), *size)
            assert input_transform(processor(slug), *size) == transform_from_processor(settings, *size)
    assert input_transform(timm_transform(), 640, 480) == transform_from_timm(timm_transform(), 640, 480)


def test_padded_centre_crop_follows_each_backend():
    # shortest edge 100 leaves a 121 x 100 image as it is; a 128 x 131 crop pads it: the torchvision backend
    # puts (128 - 121) // 2 = 3 columns and (131 - 100) // 2 = 15 rows before it, the PIL backend
    # ceil(7 / 2) = 4 and ceil(31 / 2) = 16
    settings = {"size": {"shortest_edge": 100}, "crop_size": {"height": 131, "width": 128}}
    fast = transform_from_processor(processor("clip", **settings), 121, 100)
    assert (fast.crop_left, fast.crop_top, fast.input_w, fast.input_h) == (-3, -15, 128, 131)
    slow = transform_from_processor(processor("clip", backend="pil", **settings), 121, 100)
    assert (slow.crop_left, slow.crop_top) == (-4, -16)


def test_unsupported_settings_are_refused_naming_what_is_supported():
    with pytest.raises(ValueError, match="shortest_edge"):
        transform_from_processor({"do_resize": True, "size": {"longest_edge": 300}}, 640, 480)
    with pytest.raises(ValueError, match="bare number"):
        transform_from_processor({"do_resize": True, "size": 224}, 640, 480)
    from torchvision import transforms

    with pytest.raises(ValueError, match="RandomResizedCrop"):
        transform_from_timm(transforms.Compose([transforms.RandomResizedCrop(224), transforms.ToTensor()]), 64, 64)


# --- the transform against what the processors really output -----------------------------------------


def bright_dot_centroid(run, width: int, height: int, x: int, y: int, background: int) -> tuple[float, float]:
    """Push a (width, height) image with a 3 x 3 bright dot at (x, y) through ``run``; the intensity centroid
    of the output's first channel above the background, in input pixel coordinates (pixel centres at +0.5)."""
    pixels = np.full((height, width, 3), background, dtype=np.uint8)
    pixels[y : y + 3, x : x + 3] = 250
    out = run(Image.fromarray(pixels))
    signal = out[0] - background
    rows, cols = np.mgrid[0 : signal.shape[0], 0 : signal.shape[1]]
    total = signal.sum()
    return float((signal * (cols + 0.5)).sum() / total), float((signal * (rows + 0.5)).sum() / total)


def unnormalised(pixel_values, mean, std) -> np.ndarray:
    return (np.asarray(pixel_values) * np.asarray(std)[:, None, None] + np.asarray(mean)[:, None, None]) * 255


def check_against_output(run, transform: InputTransform, width: int, height: int, background: int) -> None:
    blank = run(Image.new("RGB", (width, height)))
    assert blank.shape[1:] == (transform.input_h, transform.input_w)
    for fx, fy in [(0.5, 0.5), (0.3, 0.25), (0.65, 0.6)]:
        x, y = int(width * fx), int(height * fy)
        cx, cy = bright_dot_centroid(run, width, height, x, y, background)
        # the dot's centre (x + 1.5, y + 1.5) through the transform; resampling kernels are symmetric
        ex, ey = mapped(transform, (x + 1.5, y + 1.5, x + 1.5, y + 1.5))[:2]
        assert (cx, cy) == pytest.approx((ex, ey), abs=0.15), (width, height, x, y)


@pytest.mark.parametrize("slug", VIT_CONFIGS)
@pytest.mark.parametrize("size", [(301, 217), (217, 301), (250, 231)])
def test_transform_matches_the_processor_output(slug, size):
    proc = processor(slug)

    def run(image):
        return unnormalised(
            proc(images=[image], return_tensors="np")["pixel_values"][0], proc.image_mean, proc.image_std
        )

    check_against_output(run, transform_from_processor(proc, *size), *size, background=100)


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_padded_transform_matches_the_processor_output(backend):
    proc = processor("clip", backend=backend, size={"shortest_edge": 100}, crop_size={"height": 131, "width": 128})

    def run(image):
        return unnormalised(
            proc(images=[image], return_tensors="np")["pixel_values"][0], proc.image_mean, proc.image_std
        )

    for size in [(121, 100), (100, 100)]:
        check_against_output(run, transform_from_processor(proc, *size), *size, background=0)  # padding is 0


@pytest.mark.parametrize("size", [(301, 217), (217, 301), (250, 236)])
def test_transform_matches_the_timm_output(size):
    transform = timm_transform()
    normalise = transform.transforms[-1]

    def run(image):
        return unnormalised(transform(image).numpy(), normalise.mean.tolist(), normalise.std.tolist())

    check_against_output(run, transform_from_timm(transform, *size), *size, background=100)


def test_exif_rotated_image(tmp_path):
    """Stored 64 wide x 48 high with a bright block at x 10..22, y 6..14; EXIF orientation 6 displays it
    rotated 90 degrees clockwise: 48 wide x 64 high, a stored pixel (x, y) showing at (47 - y, x), so the
    block shows at x 48 - 14 .. 48 - 6 = 34..42, y 10..22."""
    stored = np.full((48, 64, 3), 20, dtype=np.uint8)
    stored[6:14, 10:22] = 240
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "rotated.jpg", quality=100, exif=exif.tobytes())
    catalog = scan_images(tmp_path, with_thumbnails=False)
    record = catalog.records[0]
    assert (record.width, record.height) == (48, 64)
    coco = {
        "images": [{"id": 1, "file_name": "rotated.jpg", "width": 48, "height": 64}],
        "annotations": [{"image_id": 1, "category_id": 1, "bbox": [34, 10, 8, 12]}],
        "categories": [{"id": 1, "name": "block"}],
    }
    entries = [(record.image_id, record.file_name, record.width, record.height)]
    regions = parse_annotations(json.dumps(coco).encode(), entries, "a.json").regions
    assert [(r.x0, r.y0, r.x1, r.y1) for r in regions] == [(34, 10, 42, 22)]

    image, _ = load_image(record.path)
    for slug in ("mae", "dinov2"):
        proc = processor(slug)
        t = transform_from_processor(proc, image.width, image.height)
        out = unnormalised(
            proc(images=[image], return_tensors="np")["pixel_values"][0], proc.image_mean, proc.image_std
        )
        x0, y0, x1, y1 = map_boxes(regions, t).clipped[0]  # DINOv2 crops off the block's top
        bright = out[0] > 130
        rows, cols = np.nonzero(bright)
        assert cols.mean() + 0.5 == pytest.approx((x0 + x1) / 2, abs=0.5)
        assert rows.mean() + 0.5 == pytest.approx((y0 + y1) / 2, abs=0.5)
        assert cols.min() >= math.floor(x0) - 1 and cols.max() <= math.ceil(x1)
        assert rows.min() >= math.floor(y0) - 1 and rows.max() <= math.ceil(y1)

    transposed = dict(coco, images=[{"id": 1, "file_name": "rotated.jpg", "width": 64, "height": 48}])
    result = parse_annotations(json.dumps(transposed).encode(), entries, "a.json")
    assert result.regions == [] and "before EXIF orientation" in result.errors[0].reason


# --- regions in the view ---------------------------------------------------------------------------


def test_visible_fraction_and_regions_outside_the_view():
    t = InputTransform(1.0, 1.0, 10, 0, 20, 20)  # a 40 x 20 image, its columns 10..30 kept
    m = map_boxes(np.array([[0, 0, 20, 10], [0, 0, 5, 5], [12, 2, 18, 8]]), t)
    assert m.visible == pytest.approx([0.5, 0.0, 1.0])  # half cut, wholly outside, wholly inside
    assert m.outside.tolist() == [False, True, False]
    gone = feature_targets(np.array([[0, 0, 5, 5], [32, 0, 40, 20]]), t, 4, 4)
    assert gone.scored is False and not gone.coverage.any() and not gone.soft_target.any()
    half = feature_targets(np.array([[0, 0, 20, 10]]), t, 4, 4)
    assert half.scored and half.visible_fraction == pytest.approx(0.5)
    assert half.area_fraction == pytest.approx(10 * 10 / (20 * 20))


def test_coverage_by_hand_on_a_dividing_grid():
    # 8 x 8 input, 4 x 4 grid of 2 x 2 cells; box (1, 1)-(4, 3): column 0 gets x 1..2, column 1 x 2..4,
    # row 0 y 1..2, row 1 y 2..3
    c = coverage_grid(np.array([[1, 1, 4, 3]]), InputTransform(1.0, 1.0, 0, 0, 8, 8), 4, 4).reshape(4, 4)
    expected = np.zeros((4, 4))
    expected[0, 0], expected[0, 1], expected[1, 0], expected[1, 1] = 1 / 4, 2 / 4, 1 / 4, 2 / 4
    assert c == pytest.approx(expected)


def overlap(lo: float, hi: float, a: float, b: float) -> float:
    return max(0.0, min(hi, b) - max(lo, a))


def test_coverage_of_a_union_on_a_grid_that_does_not_divide_the_input():
    # 10 wide x 7 high input, 2 rows x 3 columns: cells 10/3 wide and 3.5 high. Union of two overlapping
    # boxes by inclusion-exclusion: |A| + |B| - |A and B| inside each cell
    a, b = (1.0, 0.5, 6.0, 4.0), (4.0, 2.0, 9.5, 6.5)
    both = (4.0, 2.0, 6.0, 4.0)
    c = coverage_grid(np.array([a, b]), InputTransform(1.0, 1.0, 0, 0, 10, 7), 2, 3).reshape(2, 3)
    for row in range(2):
        for col in range(3):
            cx, cy = (col * 10 / 3, (col + 1) * 10 / 3), (row * 3.5, (row + 1) * 3.5)

            def inside(box, cx=cx, cy=cy):
                return overlap(*cx, box[0], box[2]) * overlap(*cy, box[1], box[3])

            expected = (inside(a) + inside(b) - inside(both)) / (10 / 3 * 3.5)
            assert c[row, col] == pytest.approx(expected, abs=1e-12), (row, col)


def test_rasterised_union_and_pooling_preserve_area():
    boxes = np.array([[0.3, 0.7, 5.2, 4.1], [2.5, 2.0, 7.9, 6.6], [6.0, 0.0, 8.0, 1.0]])
    raster = rasterise_union(boxes, 7, 8)
    # exact union area by inclusion-exclusion: A, B, C with A-B overlap (2.5..5.2) x (2..4.1), C disjoint
    union = 4.9 * 3.4 + 5.4 * 4.6 + 2.0 * 1.0 - 2.7 * 2.1
    assert raster.sum() == pytest.approx(union)
    assert raster.max() <= 1.0 + 1e-12
    pooled = pool_to_grid(raster, 3, 5)  # cells of 8/5 x 7/3 pixels
    assert pooled.sum() * (8 / 5) * (7 / 3) == pytest.approx(union)


def test_non_square_grid_is_raster_ordered():
    c = coverage_grid(np.array([[64, 0, 80, 16]]), InputTransform(1.0, 1.0, 0, 0, 80, 48), 3, 5)
    assert c.shape == (15,) and c[4] == 1.0 and c.sum() == 1.0  # row 0, column 4


# --- soft targets and baselines --------------------------------------------------------------------


def gaussian_1d(centres, mean: float, sigma: float) -> np.ndarray:
    return np.exp(-0.5 * ((np.asarray(centres) - mean) / sigma) ** 2)


def test_soft_target_of_one_region_by_hand():
    # 4 x 4 input and grid; the box (0, 0)-(4, 4) has sides 4: sigma = 4/4 = 1, centre (2, 2); pixel centres
    # 0.5 .. 3.5
    t = InputTransform(1.0, 1.0, 0, 0, 4, 4)
    g = gaussian_1d([0.5, 1.5, 2.5, 3.5], 2.0, 1.0)
    expected = np.outer(g, g) / np.outer(g, g).sum()
    assert soft_target_grid(np.array([[0, 0, 4, 4]]), t, 4, 4) == pytest.approx(expected.ravel())
    # pooled to 2 x 2, symmetry leaves a quarter in each cell
    assert soft_target_grid(np.array([[0, 0, 4, 4]]), t, 2, 2) == pytest.approx([0.25] * 4)


def test_soft_target_sigma_has_a_one_pixel_floor_and_regions_unite_by_maximum():
    t = InputTransform(1.0, 1.0, 0, 0, 6, 4)
    xs, ys = np.arange(6) + 0.5, np.arange(4) + 0.5
    tiny = soft_target_grid(np.array([[1.0, 1.0, 1.4, 1.2]]), t, 4, 6)  # sides 0.4 x 0.2 -> sigma 1 x 1
    expected = np.outer(gaussian_1d(ys, 1.1, 1.0), gaussian_1d(xs, 1.2, 1.0))
    assert tiny == pytest.approx((expected / expected.sum()).ravel())
    # two regions of the same rows, sides 4 wide x 4 high: sigmas 1, centres x = 1 and x = 5... united by max
    two = soft_target_grid(np.array([[-1, 0, 3, 4], [3, 0, 7, 4]]), t, 4, 6)
    gy = gaussian_1d(ys, 2.0, 1.0)
    union = np.outer(gy, np.maximum(gaussian_1d(xs, 1.0, 1.0), gaussian_1d(xs, 5.0, 1.0)))
    assert two == pytest.approx((union / union.sum()).ravel())


def test_baselines():
    assert uniform_baseline(3, 5) == pytest.approx(np.full(15, 1 / 15))
    # sigma = a quarter of each side: on a 4 x 4 input it is the soft target of the whole input
    t = InputTransform(1.0, 1.0, 0, 0, 4, 4)
    assert centre_gaussian_baseline(4, 4, 4, 4) == pytest.approx(soft_target_grid(np.array([[0, 0, 4, 4]]), t, 4, 4))
    centre = centre_gaussian_baseline(48, 80, 3, 5).reshape(3, 5)
    assert centre.sum() == pytest.approx(1.0)
    assert centre == pytest.approx(centre[::-1, ::-1])  # symmetric about the centre
    assert np.unravel_index(centre.argmax(), centre.shape) == (1, 2)


@pytest.mark.parametrize("grid", [(56, 56), (28, 28), (14, 14), (7, 7), (16, 16), (4, 8)])
def test_block_pooling_equals_each_cells_mean(grid):
    raster = np.random.default_rng(4).random((224, 224))
    grid_h, grid_w = grid
    bh, bw = 224 // grid_h, 224 // grid_w
    expected = np.array(
        [[raster[r * bh : (r + 1) * bh, c * bw : (c + 1) * bw].mean() for c in range(grid_w)] for r in range(grid_h)]
    )
    np.testing.assert_allclose(pool_to_grid(raster, grid_h, grid_w), expected, rtol=1e-13)


def test_targets_on_several_grids_equal_each_grid_by_the_raster_route():
    """Grad-CAM's four stages at once (one union, one soft-target raster) against ``coverage_grid``,
    ``soft_target_grid`` and ``union_area`` per grid; a cut region and a region outside the view included."""
    t = InputTransform(0.35, 0.35, 0, 0, 224, 224)
    regions = np.array([[30.0, 40.0, 300.0, 250.0], [200.0, 100.0, 700.0, 500.0], [900.0, 900.0, 950.0, 950.0]])
    grids = [(56, 56), (28, 28), (14, 14), (7, 7)]
    got = feature_targets_grids(regions, t, grids)
    mapped = map_boxes(regions, t)
    for grid in grids:
        g = got[grid]
        np.testing.assert_allclose(g.coverage, coverage_grid(regions, t, *grid), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(g.soft_target, soft_target_grid(regions, t, *grid), rtol=1e-12, atol=1e-18)
        assert g.area_fraction == pytest.approx(union_area(mapped.clipped) / 224**2, rel=1e-12)
        assert g.visible_fraction == pytest.approx(union_area(mapped.clipped) / union_area(mapped.boxes), rel=1e-12)
        assert g.scored
        single = feature_targets(regions, t, *grid)
        assert np.array_equal(single.coverage, g.coverage) and np.array_equal(single.soft_target, g.soft_target)


@pytest.mark.parametrize("grid", [(56, 56), (28, 28), (14, 14), (7, 7), (16, 16), (8, 4), (9, 9)])
def test_one_regions_soft_target_equals_pooling_its_raster(grid):
    """One region takes the separable route (products of 1-D block means); it must equal the raster of the
    Gaussian at every pixel centre, block-averaged cell by cell (9 x 9 does not divide: the weighted pooling)."""
    t = InputTransform(0.35, 0.35, 0, 0, 224, 224)
    box = np.array([[100.0, 60.0, 400.0, 330.0]])
    x0, y0, x1, y1 = box[0] * 0.35
    xs, ys = np.arange(224) + 0.5, np.arange(224) + 0.5
    raster = np.outer(gaussian_1d(ys, (y0 + y1) / 2, (y1 - y0) / 4), gaussian_1d(xs, (x0 + x1) / 2, (x1 - x0) / 4))
    grid_h, grid_w = grid
    if 224 % grid_h == 0 and 224 % grid_w == 0:
        bh, bw = 224 // grid_h, 224 // grid_w
        cells = np.array(
            [
                [raster[r * bh : (r + 1) * bh, c * bw : (c + 1) * bw].mean() for c in range(grid_w)]
                for r in range(grid_h)
            ]
        )
    else:
        cells = pool_to_grid(raster, grid_h, grid_w)
    expected = (cells / cells.sum()).ravel()
    np.testing.assert_allclose(soft_target_grid(box, t, grid_h, grid_w), expected, rtol=1e-12, atol=1e-300)
