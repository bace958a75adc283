"""Any resolution and aspect ratio: the parser, the sizes, non-square grids end to end, token-budget batches.

Expectations are hand-computed (grid sizes, batch splits), read from independent sources (the stored input
image against a plain PIL resize of the file) or recomputed from the model's own q/k projections.
"""

from __future__ import annotations

import dataclasses
import io
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ssl_attention.extraction import catalog_images, extract_model, plan_batches
from ssl_attention.images import ImageRecord, load_image
from ssl_attention.models.loading import LoadRequest, load_model
from ssl_attention.models.resolution import (
    DEFAULT_MAX_TOKENS,
    ResolutionError,
    parse_resolution,
    scaled_size,
)
from ssl_attention.registry import METHODS, MODELS
from ssl_attention.validation import check_model
from ssl_attention.warehouse.paths import TABLES, partition_file
from tests.conftest import ALL_SLUGS

VALID = list(MODELS)


def read(warehouse: Path, table: str, **keys: str) -> list[dict]:
    return pq.read_table(
        partition_file(warehouse, table, **{**({"shard": "0"} if "shard" in TABLES[table] else {}), **keys})
    ).to_pylist()


def ids_by_name(warehouse: Path) -> dict[str, str]:
    return {r["file_name"]: r["image_id"] for r in read(warehouse, "images")}


def folder_of(tmp_path: Path, sample_dir: Path, names: list[str]) -> Path:
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for name in names:
        shutil.copy(sample_dir / name, folder / name)
    return folder


def extract(adapter, folder: Path, warehouse: Path, **kwargs):
    records = catalog_images(folder, warehouse).catalog.records
    return extract_model(adapter, records, warehouse, **kwargs)


def assert_checks_pass(warehouse: Path, slug: str) -> None:
    for method, outcomes in check_model(warehouse, slug).items():
        failed = {o.name: o.examples for o in outcomes if not o.passed}
        assert not failed, (slug, method, failed)


# --- parsing ---------------------------------------------------------------------------------------------


def test_parse_default_and_a_number_apply_to_every_model():
    assert parse_resolution("default", VALID) == dict.fromkeys(VALID, "default")
    assert parse_resolution(" 448 ", VALID) == dict.fromkeys(VALID, 448)


def test_parse_per_model_values_with_a_fallback():
    parsed = parse_resolution("dinov2=518, clip=default", VALID)
    assert parsed["dinov2"] == 518 and parsed["clip"] == "default" and parsed["mae"] == "default"
    parsed = parse_resolution("448,DINOv2=518", VALID)
    assert parsed["dinov2"] == 518
    assert {parsed[m] for m in VALID if m != "dinov2"} == {448}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dinov5=448", "unknown model 'dinov5'; valid models: dinov2, dinov3"),
        ("huge", "expected 'default' or a positive number of pixels"),
        ("0", "expected 'default' or a positive number"),
        ("-16", "expected 'default' or a positive number"),
        ("clip=4.5", "for clip: expected 'default'"),
        ("dinov2=448,dinov2=518", "dinov2 is given twice"),
        ("448,336", "more than one value without a model name"),
        ("", "empty"),
        ("448,,clip=224", "empty item"),
    ],
)
def test_parse_errors_name_what_is_valid(text, message):
    with pytest.raises(ResolutionError, match=message):
        parse_resolution(text, VALID)


def test_a_resolution_below_one_patch_is_an_error_naming_the_patch_size(tiny_checkpoints):
    with pytest.raises(ResolutionError, match=r"clip: resolution 7 px is below one patch \(8 px\)"):
        load_model("clip", LoadRequest(checkpoint=tiny_checkpoints["clip"], device="cpu", resolution=7))
    assert load_model("clip", LoadRequest(checkpoint=tiny_checkpoints["clip"], device="cpu", resolution=8))
    with pytest.raises(ResolutionError, match=r"resnet50: resolution 16 px is below one stride .*\(32 px\)"):
        load_model("resnet50", LoadRequest(checkpoint=tiny_checkpoints["resnet50"], device="cpu", resolution=16))
    with pytest.raises(ResolutionError, match="max tokens 0"):
        load_model("clip", LoadRequest(checkpoint=tiny_checkpoints["clip"], device="cpu", max_tokens=0))


# --- sizes, by hand --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "short", "patch", "max_tokens", "expected"),
    [
        (400, 600, 448, 16, 4096, (448, 672)),  # 3:2 -> 28 x 42 patches
        (600, 400, 448, 16, 4096, (672, 448)),  # portrait: the other way round
        (512, 512, 518, 14, 4096, (518, 518)),  # 37 x 37
        (427, 640, 224, 16, 4096, (224, 336)),  # 335.7 px -> 20.98 patches -> 21
        (300, 451, 100, 16, 4096, (96, 144)),  # 100/16 = 6.25 -> 6; 150.3/16 = 9.4 -> 9
        # 28 x 42 = 1176 > 64: shrunk by sqrt(64/1176) = 0.2333 -> 6.53 x 9.80 -> 6 x 9
        (400, 600, 448, 16, 64, (96, 144)),
        # 128 x 192 = 24576 > 4096: sqrt(1/6) = 0.4082 -> 52.26 x 78.38 -> 52 x 78 = 4056
        (400, 600, 2048, 16, 4096, (832, 1248)),
        # 1 x 50 patches > 4: floor gives 1 x 14, trimmed along the long side to 1 x 4
        (10, 500, 16, 16, 4, (16, 64)),
    ],
)
def test_scaled_size_by_hand(height, width, short, patch, max_tokens, expected):
    assert scaled_size(height, width, short, patch, max_tokens) == expected


def test_scaled_size_keeps_the_bound_and_the_aspect_ratio():
    generator = np.random.default_rng(0)
    for _ in range(300):
        height, width = (int(v) for v in generator.integers(20, 5000, size=2))
        short = int(generator.integers(16, 3000))
        max_tokens = int(generator.integers(1, 5000))
        out_h, out_w = scaled_size(height, width, short, 16, max_tokens)
        assert out_h % 16 == 0 and out_w % 16 == 0 and out_h >= 16 and out_w >= 16
        assert (out_h // 16) * (out_w // 16) <= max_tokens
        if min(out_h, out_w) >= 16 * 8:  # the aspect ratio is kept within the rounding of each side
            assert abs(out_w / out_h - width / height) <= (width / height) * (2 / (min(out_h, out_w) / 16))


def test_default_max_tokens_is_4096():
    assert DEFAULT_MAX_TOKENS == 4096


# --- non-square grids, end to end ------------------------------------------------------------------------


def test_dinov2_at_518_gives_a_37_by_37_grid(tmp_path, sample_dir, make_tiny_checkpoint):
    checkpoint = make_tiny_checkpoint("dinov2", tmp_path / "dinov2", patch_size=14, image_size=56)
    adapter = load_model("dinov2", LoadRequest(checkpoint=checkpoint, device="cpu", resolution=518))
    warehouse = tmp_path / "wh"
    report = extract(adapter, folder_of(tmp_path, sample_dir, ["astronaut.jpg"]), warehouse)  # 512 x 512
    assert report.images_extracted == 1
    for method in MODELS["dinov2"].methods:
        rows = read(warehouse, "attention_maps", model="dinov2", method=method)
        assert {(r["grid_h"], r["grid_w"]) for r in rows} == {(37, 37)}
        assert {len(r["map_values"]) for r in rows} == {37 * 37}
    (inputs,) = read(warehouse, "inputs", model="dinov2")
    assert (inputs["input_h"], inputs["input_w"]) == (518, 518)
    assert_checks_pass(warehouse, "dinov2")


@pytest.fixture(scope="module")
def wide_warehouse(tmp_path_factory, sample_dir, make_tiny_checkpoint):
    """coffee.jpg (600 x 400, 3:2) and astronaut.jpg (512 x 512) through every model at resolution 448,
    the ViTs with 16-px patches: {slug: adapter}, the warehouse."""
    root = tmp_path_factory.mktemp("wide")
    folder = folder_of(root, sample_dir, ["coffee.jpg", "astronaut.jpg"])
    warehouse = root / "wh"
    adapters = {}
    for index, slug in enumerate(ALL_SLUGS):
        sizes = {} if MODELS[slug].family == "cnn" else {"patch_size": 16, "image_size": 64}
        checkpoint = make_tiny_checkpoint(slug, root / slug, seed=index, **sizes)
        adapters[slug] = load_model(slug, LoadRequest(checkpoint=checkpoint, device="cpu", resolution=448))
        report = extract(adapters[slug], folder, warehouse)
        assert report.images_extracted == 2, report
    return adapters, warehouse


@pytest.mark.parametrize("slug", ALL_SLUGS)
def test_a_3_by_2_image_at_448_keeps_its_aspect_ratio(wide_warehouse, sample_dir, slug):
    _, warehouse = wide_warehouse
    ids = ids_by_name(warehouse)
    inputs = {r["image_id"]: r for r in read(warehouse, "inputs", model=slug)}
    expected_input = {"coffee.jpg": (448, 672), "astronaut.jpg": (448, 448)}
    for name, (height, width) in expected_input.items():
        row = inputs[ids[name]]
        assert (row["input_h"], row["input_w"]) == (height, width)
        # no crop: what the model saw is the whole file resized, not a part of it
        seen = np.asarray(Image.open(io.BytesIO(row["jpeg"])).convert("RGB"), dtype=np.float64)
        whole = load_image(sample_dir / name)[0].resize((width, height), Image.Resampling.BICUBIC)
        assert np.abs(seen - np.asarray(whole, dtype=np.float64)).mean() < 6.0
    for method in MODELS[slug].methods:
        rows = read(warehouse, "attention_maps", model=slug, method=method)
        by_image = {}
        for r in rows:
            by_image.setdefault(r["image_id"], set()).add((r["grid_h"], r["grid_w"]))
        if MODELS[slug].family == "vit":
            assert by_image[ids["coffee.jpg"]] == {(28, 42)}  # 448/16 x 672/16
            assert by_image[ids["astronaut.jpg"]] == {(28, 28)}
        else:  # one grid per ResNet stage, strides 4, 8, 16, 32, no crop
            assert by_image[ids["coffee.jpg"]] == {(112, 168), (56, 84), (28, 42), (14, 21)}
        for r in rows:
            assert len(r["map_values"]) == r["grid_h"] * r["grid_w"]
    assert_checks_pass(warehouse, slug)


PER_HEAD = [(slug, m) for slug in ALL_SLUGS for m in MODELS[slug].methods if METHODS[m].per_head]
MASS_ONE = [(slug, m) for slug in ALL_SLUGS for m in MODELS[slug].methods if METHODS[m].mass_sums_to_one]


@pytest.mark.parametrize(("slug", "method"), PER_HEAD)
def test_fused_is_the_mean_of_heads_at_a_non_square_grid(wide_warehouse, slug, method):
    _, warehouse = wide_warehouse
    coffee = ids_by_name(warehouse)["coffee.jpg"]
    rows = [r for r in read(warehouse, "attention_maps", model=slug, method=method) if r["image_id"] == coffee]
    by_layer: dict[int, dict] = {}
    for r in rows:
        by_layer.setdefault(r["layer"], {})[r["head"]] = np.asarray(r["map_values"], dtype=np.float64)
    for layer, maps in by_layer.items():
        heads = [maps[h] for h in sorted(h for h in maps if h is not None)]
        assert len(heads) == 4 and maps[None].shape == (28 * 42,)
        np.testing.assert_allclose(maps[None], np.mean(heads, axis=0), atol=1e-6, rtol=0, err_msg=str(layer))
        assert np.abs(heads[0] - heads[1]).max() > 1e-4  # heads differ: the comparison can fail


@pytest.mark.parametrize(("slug", "method"), MASS_ONE)
def test_masses_sum_to_one_at_a_non_square_grid(wide_warehouse, slug, method):
    _, warehouse = wide_warehouse
    rows = read(warehouse, "attention_maps", model=slug, method=method)
    assert {(r["grid_h"], r["grid_w"]) for r in rows} == {(28, 42), (28, 28)}
    for r in rows:
        total = float(np.sum(np.asarray(r["map_values"], dtype=np.float64))) + r["prefix_mass"]
        assert total == pytest.approx(1.0, abs=1e-5), (r["image_id"], r["layer"], r["head"])


# slug -> (path of the layer list, the layer's pre-attention norm, its attention module)
LAYER_PARTS = {
    "clip": ("encoder.layers", "layer_norm1", "self_attn"),
    "dinov2": ("encoder.layer", "norm1", "attention"),
    "mae": ("layers", "layernorm_before", "attention"),
}


@pytest.mark.parametrize("slug", sorted(LAYER_PARTS))
def test_cls_map_at_a_non_square_grid_equals_recomputation_from_q_and_k(wide_warehouse, sample_dir, slug):
    """softmax(q_cls · kᵀ / √d) per head from each layer's hooked input, against the stored 28 x 42 rows."""
    adapters, warehouse = wide_warehouse
    adapter = adapters[slug]
    layers = adapter.module.get_submodule(LAYER_PARTS[slug][0])
    inputs: dict[int, torch.Tensor] = {}

    def keep_input(index):
        def hook(_module, args, kwargs):
            inputs[index] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        return hook

    image = load_image(sample_dir / "coffee.jpg")[0]
    handles = [layer.register_forward_pre_hook(keep_input(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        adapter.run(adapter.pixel_values([image]))
    finally:
        for handle in handles:
            handle.remove()
    rows = read(warehouse, "attention_maps", model=slug, method="cls")
    coffee = ids_by_name(warehouse)["coffee.jpg"]
    stored = {(r["layer"], r["head"]): r for r in rows if r["image_id"] == coffee}
    heads, prefix = adapter.num_heads, 1 + adapter.num_registers
    for index, layer in enumerate(layers):
        norm = layer.get_submodule(LAYER_PARTS[slug][1])
        attn = layer.get_submodule(LAYER_PARTS[slug][2])
        q_proj = getattr(attn, "q_proj", None) or attn.attention.query
        k_proj = getattr(attn, "k_proj", None) or attn.attention.key
        x = inputs[index].double()  # (1, T, D)
        h = F.layer_norm(x, norm.normalized_shape, norm.weight.double(), norm.bias.double(), norm.eps)
        q = F.linear(h, q_proj.weight.double(), q_proj.bias.double())
        k = F.linear(h, k_proj.weight.double(), k_proj.bias.double())
        _, tokens, dim = q.shape
        assert tokens == prefix + 28 * 42
        d = dim // heads
        q = q.view(1, tokens, heads, d).transpose(1, 2)
        k = k.view(1, tokens, heads, d).transpose(1, 2)
        cls = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)[0, :, 0]  # (H, T)
        for head in range(heads):
            row = stored[(index, head)]
            assert (row["grid_h"], row["grid_w"]) == (28, 42)
            np.testing.assert_allclose(row["map_values"], cls[head, prefix:].numpy(), atol=1e-5, rtol=0)
            assert row["prefix_mass"] == pytest.approx(float(cls[head, :prefix].sum()), abs=1e-5)
        # row-major: cell (r, c) of the stored grid is patch r * 42 + c
        grid = np.asarray(stored[(index, None)]["map_values"]).reshape(28, 42)
        np.testing.assert_allclose(grid[3, 40], cls[:, prefix + 3 * 42 + 40].mean().item(), atol=1e-5)


# --- runs at another resolution, token bound ---------------------------------------------------------------


def test_a_run_at_another_resolution_recomputes_and_then_is_up_to_date(tmp_path, sample_dir, tiny_checkpoints):
    folder = folder_of(tmp_path, sample_dir, ["coffee.jpg", "astronaut.jpg", "rocket.jpg"])
    warehouse = tmp_path / "wh"
    default = load_model("clip", LoadRequest(checkpoint=tiny_checkpoints["clip"], device="cpu"))
    assert extract(default, folder, warehouse).images_extracted == 3
    rows = read(warehouse, "attention_maps", model="clip", method="cls")
    assert {(r["grid_h"], r["grid_w"]) for r in rows} == {(4, 4)}  # the processor's 32 x 32 centre crop

    at_48 = load_model("clip", LoadRequest(checkpoint=tiny_checkpoints["clip"], device="cpu", resolution=48))
    report = extract(at_48, folder, warehouse)
    assert (report.images_extracted, report.images_up_to_date) == (3, 0)
    ids = ids_by_name(warehouse)
    grids = {
        r["image_id"]: (r["grid_h"], r["grid_w"]) for r in read(warehouse, "attention_maps", model="clip", method="cls")
    }
    # 48 px shorter side, patch 8: coffee 600x400 -> 6 x 9; astronaut -> 6 x 6; rocket 640x427 -> 71.9 px -> 6 x 9
    assert grids == {ids["coffee.jpg"]: (6, 9), ids["astronaut.jpg"]: (6, 6), ids["rocket.jpg"]: (6, 9)}
    assert_checks_pass(warehouse, "clip")
    again = extract(at_48, folder, warehouse)
    assert (again.images_extracted, again.images_up_to_date) == (0, 3)


def test_max_tokens_scales_a_large_request_down(tmp_path, sample_dir, tiny_checkpoints):
    request = LoadRequest(checkpoint=tiny_checkpoints["clip"], device="cpu", resolution=448, max_tokens=64)
    adapter = load_model("clip", request)
    warehouse = tmp_path / "wh"
    extract(adapter, folder_of(tmp_path, sample_dir, ["coffee.jpg"]), warehouse)
    rows = read(warehouse, "attention_maps", model="clip", method="mean")
    # 448/8 x 672/8 = 56 x 84 = 4704 > 64: sqrt(64/4704) = 0.1166 -> 6.53 x 9.80 -> 6 x 9 = 54 patches
    assert {(r["grid_h"], r["grid_w"]) for r in rows} == {(6, 9)}


def _record(name: str, width: int, height: int) -> ImageRecord:
    return ImageRecord(name, Path(name), name, width, height, "JPEG", "RGB", 1)


def test_batches_group_one_input_size_within_the_token_budget(tiny_adapters):
    at_32 = dataclasses.replace(tiny_adapters["clip"], resolution=32)  # patch 8
    wide = [_record(f"w{i}", 300, 200) for i in range(10)]  # 32 x 48 px: 4 x 6 patches + CLS = 25 tokens
    square = [_record(f"s{i}", 200, 200) for i in range(3)]  # 32 x 32 px: 16 + 1 = 17 tokens
    records = [wide[0], square[0], *wide[1:], *square[1:]]
    # budget 2000: 2000 // 625 = 3 wide images per batch; 2000 // 289 = 6 square ones (all 3 fit)
    batches = plan_batches(at_32, records, batch_size=8, token_budget=2000)
    assert [len(b) for b in batches] == [3, 3, 3, 1, 3]
    assert [b[0].image_id[0] for b in batches] == ["w", "w", "w", "w", "s"]
    assert sorted(r.image_id for b in batches for r in b) == sorted(r.image_id for r in records)
    for batch in batches:
        sizes = {at_32.input_size(r.width, r.height) for r in batch}
        assert len(sizes) == 1
        ((height, width),) = sizes
        assert len(batch) * at_32.sequence_length(height, width) ** 2 <= 2000
    # the image count cap still applies, and an image above the budget runs alone
    assert [len(b) for b in plan_batches(at_32, records, batch_size=2, token_budget=10**9)] == [2] * 5 + [2, 1]
    assert {len(b) for b in plan_batches(at_32, records, batch_size=8, token_budget=100)} == {1}
    with pytest.raises(ValueError, match="token budget"):
        plan_batches(at_32, records, token_budget=0)


def test_extraction_batches_keep_tokens_squared_under_the_budget(tmp_path, sample_dir, tiny_checkpoints):
    adapter = load_model("clip", LoadRequest(checkpoint=tiny_checkpoints["clip"], device="cpu", resolution=32))
    seen: list[tuple[int, int]] = []  # (images, tokens) of every forward pass, read from the attentions
    forward = adapter.forward

    def spy(pixel_values):
        result = forward(pixel_values)
        seen.append((int(result.attentions[0].shape[0]), int(result.attentions[0].shape[-1])))
        return result

    adapter.forward = spy
    folder = folder_of(tmp_path, sample_dir, sorted(p.name for p in sample_dir.glob("*.jpg")))
    budget = 2 * 25**2  # two 32 x 48 images (25 tokens each) per batch
    report = extract(adapter, folder, tmp_path / "wh", token_budget=budget)
    assert report.images_extracted == 5
    assert sum(b for b, _ in seen) == 5
    assert all(b * t**2 <= budget for b, t in seen), seen
    # chelsea, coffee and rocket are 3:2-ish (32 x 48): three images, at most two per batch
    assert sorted(b for b, t in seen if t == 25) == [1, 2]
