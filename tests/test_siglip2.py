"""SigLIP 2, fixed resolution and NaFlex: shipped configs, and NaFlex padding that never reaches a map.

NaFlex expectations come from the model run directly on its own processor's padded output (the padded
positions cut by hand), from q/k recomputation of the pooling head, and from hand-computed patch grids.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from ssl_attention.images import load_image
from ssl_attention.models.adapters import PatchSequence
from ssl_attention.models.loading import LoadRequest, load_model
from ssl_attention.models.preprocessing import InputSizeError, naflex_images, patchify
from ssl_attention.registry import MODELS
from ssl_attention.warehouse.paths import TABLES, partition_file

NAFLEX = "siglip2_naflex"


def read(warehouse: Path, table: str, **keys: str) -> list[dict]:
    return pq.read_table(
        partition_file(warehouse, table, **{**({"shard": "0"} if "shard" in TABLES[table] else {}), **keys})
    ).to_pylist()


def image_id(warehouse: Path, name: str) -> str:
    return next(r["image_id"] for r in read(warehouse, "images") if r["file_name"] == name)


def processed(adapter, sample_dir: Path, name: str) -> dict[str, torch.Tensor]:
    """The NaFlex processor's own output for one sample: padded to its max_num_patches."""
    return adapter.preprocess(images=[load_image(sample_dir / name)[0]], return_tensors="pt")


def stored_rows(warehouse: Path, method: str, image: str) -> dict[tuple[int, int | None], dict]:
    rows = read(warehouse, "attention_maps", model=NAFLEX, method=method)
    return {(r["layer"], r["head"]): r for r in rows if r["image_id"] == image}


# --- the registry and the shipped configs -----------------------------------------------------------------


def test_both_variants_are_declared_with_probe_mean_and_rollout():
    fixed, naflex = MODELS["siglip2"], MODELS[NAFLEX]
    assert fixed.default_weights == "google/siglip2-base-patch16-224"
    assert naflex.default_weights == "google/siglip2-base-patch16-naflex"
    for spec in (fixed, naflex):
        assert spec.methods == ("mean", "probe", "rollout") and not spec.has_cls and spec.family == "vit"
    assert (fixed.pixel_layout, fixed.position_interpolation) == ("grid", "flag")
    assert (naflex.pixel_layout, naflex.position_interpolation) == ("naflex", "native")
    assert {spec.pixel_layout for slug, spec in MODELS.items() if slug != NAFLEX} == {"grid"}


@pytest.mark.parametrize(("slug", "model_class"), [("siglip2", "SiglipVisionModel"), (NAFLEX, "Siglip2VisionModel")])
def test_random_mode_builds_the_base_architecture_from_the_shipped_configs(slug, model_class, sample_dir):
    adapter = load_model(slug, LoadRequest(weights="random", device="cpu"))
    config = adapter.module.config
    assert type(adapter.module).__name__ == model_class
    assert (adapter.num_layers, adapter.num_heads, config.hidden_size, adapter.patch_size) == (12, 12, 768, 16)
    assert (config.intermediate_size, adapter.num_registers, config.vision_use_head) == (3072, 0, True)
    assert adapter.layer_names[-1] == "pooling head"
    image = load_image(sample_dir / "coffee.jpg")[0]  # 600 x 400
    if slug == NAFLEX:  # at most 256 patches at 3:2: 13 x 19 = 247 (13 x 20 = 260 would not fit)
        assert adapter.preprocess.max_num_patches == 256
        assert adapter.input_size(600, 400) == (13 * 16, 19 * 16)
    else:
        assert adapter.input_size(600, 400) == (224, 224)
    blocks = adapter.run(adapter.pixel_values([image]))
    grid = adapter.input_size(600, 400)
    assert (blocks["probe"][0].grid_h, blocks["probe"][0].grid_w) == (grid[0] // 16, grid[1] // 16)
    assert blocks["probe"][0].layers == [12]


# --- NaFlex padding ---------------------------------------------------------------------------------------


def test_patch_order_matches_the_processor(tiny_adapters, sample_dir):
    adapter = tiny_adapters[NAFLEX]
    out = processed(adapter, sample_dir, "coffee.jpg")
    grid_h, grid_w = (int(v) for v in out["spatial_shapes"][0])
    assert (grid_h, grid_w) == (3, 5)  # 16 patches at most, 3:2 -> 3 x 5 = 15, one padding position
    assert out["pixel_attention_mask"][0].tolist() == [1] * 15 + [0]
    images = naflex_images(out, adapter.patch_size)
    assert images.shape == (1, 3, 24, 40)
    torch.testing.assert_close(patchify(images, adapter.patch_size), out["pixel_values"][:, :15], atol=0, rtol=0)


@pytest.mark.parametrize("padding", [1, 25])
def test_a_padded_image_gives_the_maps_of_the_same_image_unpadded(tiny_adapters, sample_dir, padding):
    """The processor pads coffee.jpg's 15 patches to 16; padding with 25 positions of noise changes nothing."""
    adapter = tiny_adapters[NAFLEX]
    out = processed(adapter, sample_dir, "coffee.jpg")
    real = out["pixel_values"][:, :15]
    noise = torch.randn(1, padding, real.shape[-1], generator=torch.Generator().manual_seed(padding)) * 3
    mask = torch.tensor([[1] * 15 + [0] * padding], dtype=torch.int32)
    padded = PatchSequence(torch.cat([real, noise], dim=1), mask, out["spatial_shapes"])
    unpadded = adapter.run(naflex_images(out, adapter.patch_size))
    with_padding = adapter.run(padded)
    for method, blocks in unpadded.items():
        (a,), (b,) = blocks, with_padding[method]
        assert (b.grid_h, b.grid_w) == (3, 5) and b.values.shape[-1] == 15, method
        torch.testing.assert_close(b.values, a.values, atol=1e-5, rtol=0)
        torch.testing.assert_close(b.prefix_mass, a.prefix_mass, atol=1e-6, rtol=0)
        totals = b.values.double().sum(-1) + b.prefix_mass.double()
        torch.testing.assert_close(totals, torch.ones_like(totals), atol=1e-5, rtol=0)  # none on padding


def test_a_mask_that_is_not_the_image_grid_is_an_error(tiny_adapters, sample_dir):
    adapter = tiny_adapters[NAFLEX]
    out = processed(adapter, sample_dir, "coffee.jpg")
    shifted = out["pixel_attention_mask"].clone()
    shifted[0, 0], shifted[0, 15] = 0, 1
    with pytest.raises(InputSizeError, match="first grid_h"):
        adapter.run(PatchSequence(out["pixel_values"], shifted, out["spatial_shapes"]))
    two = processed(adapter, sample_dir, "astronaut.jpg")  # 4 x 4: another grid in the same batch
    batch = PatchSequence(
        torch.cat([out["pixel_values"], two["pixel_values"]]),
        torch.cat([out["pixel_attention_mask"], two["pixel_attention_mask"]]),
        torch.cat([out["spatial_shapes"], two["spatial_shapes"]]),
    )
    with pytest.raises(InputSizeError, match="different patch grids"):
        adapter.run(batch)


def test_stored_naflex_grids_are_each_images_own(tiny_warehouse):
    inputs = {r["image_id"]: r for r in read(tiny_warehouse, "inputs", model=NAFLEX)}
    # 16 patches of 8 px at most: 512 x 512 -> 4 x 4; 600 x 400 -> 3 x 5 (4 x 6 would be 24)
    for name, grid in (("astronaut.jpg", (4, 4)), ("coffee.jpg", (3, 5))):
        image = image_id(tiny_warehouse, name)
        assert (inputs[image]["input_h"], inputs[image]["input_w"]) == (grid[0] * 8, grid[1] * 8)
        for method in MODELS[NAFLEX].methods:
            for row in stored_rows(tiny_warehouse, method, image).values():
                assert (row["grid_h"], row["grid_w"]) == grid
                assert len(row["map_values"]) == grid[0] * grid[1]


def test_naflex_mean_and_rollout_equal_the_models_own_padded_attention(tiny_warehouse, tiny_adapters, sample_dir):
    """The module run on the processor's padded output; real rows and columns cut by hand."""
    adapter = tiny_adapters[NAFLEX]
    out = processed(adapter, sample_dir, "coffee.jpg")
    with torch.no_grad():
        attentions = adapter.module(**out, output_attentions=True).attentions
    image = image_id(tiny_warehouse, "coffee.jpg")
    mean_rows, rollout_rows = stored_rows(tiny_warehouse, "mean", image), stored_rows(tiny_warehouse, "rollout", image)
    real = 15
    rollout = None
    for layer, attn in enumerate(attentions):
        attn = attn.double()[0]  # (H, 16, 16)
        assert float(attn[:, :real, real:].abs().max()) == 0.0  # the model gives padding no attention
        kept = attn[:, :real, :real]
        for head in range(adapter.num_heads):
            np.testing.assert_allclose(mean_rows[(layer, head)]["map_values"], kept[head].mean(0), atol=1e-6)
        np.testing.assert_allclose(mean_rows[(layer, None)]["map_values"], kept.mean(1).mean(0), atol=1e-6)
        mixed = kept.mean(0) + torch.eye(real, dtype=torch.float64)
        mixed = mixed / mixed.sum(-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout
        np.testing.assert_allclose(rollout_rows[(layer, None)]["map_values"], rollout.mean(0), atol=1e-6)
        assert rollout_rows[(layer, None)]["prefix_mass"] == 0.0


def test_naflex_probe_equals_recomputation_from_the_pooling_head(tiny_warehouse, tiny_adapters, sample_dir):
    """softmax((probe Wq + bq)(x Wk + bk)ᵀ / √d) over the real patches, x the head's padded input."""
    adapter = tiny_adapters[NAFLEX]
    head_module = adapter.module.head
    captured = {}
    handle = head_module.register_forward_pre_hook(lambda _m, args: captured.__setitem__("x", args[0].detach()))
    try:
        with torch.no_grad():
            adapter.module(**processed(adapter, sample_dir, "coffee.jpg"))
    finally:
        handle.remove()
    mha = head_module.attention
    dim, heads = mha.embed_dim, mha.num_heads
    w_q, w_k, _ = mha.in_proj_weight.double().split(dim)
    b_q, b_k, _ = mha.in_proj_bias.double().split(dim)
    x = captured["x"].double()[:, :15]  # (1, 15, D): the padding position is not a key at all
    d = dim // heads
    q = F.linear(head_module.probe.double(), w_q, b_q).view(1, 1, heads, d).transpose(1, 2)
    k = F.linear(x, w_k, b_k).view(1, 15, heads, d).transpose(1, 2)
    probe = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)[0, :, 0]  # (H, 15)
    rows = stored_rows(tiny_warehouse, "probe", image_id(tiny_warehouse, "coffee.jpg"))
    assert {layer for layer, _ in rows} == {adapter.num_layers}
    for head in range(heads):
        np.testing.assert_allclose(rows[(adapter.num_layers, head)]["map_values"], probe[head].numpy(), atol=1e-5)
        assert rows[(adapter.num_layers, head)]["prefix_mass"] == 0.0


def test_naflex_at_a_resolution_has_no_padding(tiny_checkpoints, sample_dir):
    request = LoadRequest(checkpoint=tiny_checkpoints[NAFLEX], device="cpu", resolution=48)
    adapter = load_model(NAFLEX, request)
    pixel_values = adapter.pixel_values([load_image(sample_dir / "coffee.jpg")[0]])
    assert pixel_values.shape == (1, 3, 48, 72)  # 6 x 9 = 54 patches, above the processor's 16: no resize to it
    inputs = adapter.model_inputs(pixel_values)
    assert inputs["pixel_values"].shape == (1, 54, 8 * 8 * 3) and bool(inputs["pixel_attention_mask"].all())
    assert inputs["spatial_shapes"].tolist() == [[6, 9]]
    block = adapter.run(pixel_values)["mean"][0]
    assert (block.grid_h, block.grid_w) == (6, 9)
