"""Attention maps against independent expectations: hand-computed toys and recomputation from q/k."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from ssl_attention.images import load_image
from ssl_attention.methods.blocks import AttentionShapeError, MapBlock, TokenLayout, check_attentions
from ssl_attention.methods.passes import ViTPass
from ssl_attention.methods.rollout import rollout_block
from ssl_attention.models.loading import LoadRequest, load_model
from ssl_attention.registry import METHODS, MODELS
from ssl_attention.warehouse.paths import partition_file


def vit_map_blocks(
    attentions: list[torch.Tensor], layout: TokenLayout, methods: list[str], pooling: torch.Tensor | None = None
) -> dict[str, MapBlock]:
    """Each method's block through the registry's compute, as the adapter calls it."""
    names = [f"block {i}" for i in range(len(attentions) + 1)]
    forward = ViTPass(attentions=attentions, layout=layout, layer_names=names, pooling_attention=pooling)
    return {m: METHODS[m].compute(forward)[0] for m in methods}


PER_HEAD = [(slug, m) for slug, spec in MODELS.items() for m in spec.methods if m in ("cls", "mean", "probe")]
MASS_ONE = [
    (slug, m) for slug, spec in MODELS.items() for m in spec.methods if m in ("cls", "mean", "probe", "rollout")
]


def read_maps(warehouse: Path, slug: str, method: str) -> list[dict]:
    return pq.read_table(partition_file(warehouse, "attention_maps", model=slug, method=method, shard="0")).to_pylist()


def image_ids(warehouse: Path) -> dict[str, str]:
    """file name -> image id, from the images table."""
    table = pq.read_table(partition_file(warehouse, "images"), columns=["file_name", "image_id"]).to_pylist()
    return {row["file_name"]: row["image_id"] for row in table}


def sample_images(sample_dir: Path) -> tuple[list[str], list]:
    names = sorted(p.name for p in sample_dir.glob("*.jpg"))
    return names, [load_image(sample_dir / name)[0] for name in names]


def stored(rows: list[dict], image_id: str, layer: int, head: int | None) -> dict:
    hits = [r for r in rows if r["image_id"] == image_id and r["layer"] == layer and r["head"] == head]
    assert len(hits) == 1, f"expected one row for ({image_id}, {layer}, {head}), got {len(hits)}"
    return hits[0]


# --- rollout, by hand ------------------------------------------------------------------------------------

# Two layers, two heads, T = 3 tokens.
# Layer 0: head 0 = I, head 1 = cyclic shift  ->  mean = [[.5,.5,0],[0,.5,.5],[.5,0,.5]]
#          + I, rows / 2                       ->  M0   = [[.75,.25,0],[0,.75,.25],[.25,0,.75]]
# Layer 1: both heads send everything to token 2 -> mean = [[0,0,1]]*3
#          + I, rows / 2                       ->  M1   = [[.5,0,.5],[0,.5,.5],[0,0,1]]
# R0 = M0; R1 = M1 @ M0 = [[.5,.125,.375],[.125,.375,.5],[.25,0,.75]]
# (the other order, M0 @ M1, would give row 0 = [.375,.125,.5]).
LAYER0 = torch.tensor(
    [
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]],
    ]
)
LAYER1 = torch.tensor([[[0.0, 0.0, 1.0]] * 3] * 2)


def toy_attentions() -> list[torch.Tensor]:
    return [LAYER0.unsqueeze(0), LAYER1.unsqueeze(0)]  # each (B=1, H=2, T=3, T=3)


def test_rollout_hand_computed_with_cls():
    layout = TokenLayout(has_cls=True, num_registers=0, grid_h=1, grid_w=2)
    block = rollout_block(toy_attentions(), layout)
    assert block.values.shape == (1, 2, 1, 2)
    assert block.layers == [0, 1]
    assert not block.per_head
    # layer 0: CLS row of M0 = [.75, .25, 0]; layer 1: CLS row of M1 @ M0 = [.5, .125, .375]
    torch.testing.assert_close(block.values[0, :, 0], torch.tensor([[0.25, 0.0], [0.125, 0.375]]), atol=1e-7, rtol=0)
    torch.testing.assert_close(block.prefix_mass[0, :, 0], torch.tensor([0.75, 0.5]), atol=1e-7, rtol=0)
    torch.testing.assert_close(block.register_mass[0, :, 0], torch.zeros(2), atol=0, rtol=0)


def test_rollout_hand_computed_without_cls_uses_mean_row():
    layout = TokenLayout(has_cls=False, num_registers=0, grid_h=1, grid_w=3)
    block = rollout_block(toy_attentions(), layout)
    # layer 0: column means of M0 = [1/3, 1/3, 1/3]; layer 1: column means of R1 = [.875, .5, 1.625] / 3
    expected = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.875 / 3, 0.5 / 3, 1.625 / 3]])
    torch.testing.assert_close(block.values[0, :, 0], expected, atol=1e-7, rtol=0)
    torch.testing.assert_close(block.prefix_mass[0, :, 0], torch.zeros(2), atol=0, rtol=0)


def test_rollout_with_registers_counts_their_mass():
    # T = 3: CLS, one register, one patch. Same toy matrices: R1's CLS row = [.5, .125, .375].
    layout = TokenLayout(has_cls=True, num_registers=1, grid_h=1, grid_w=1)
    block = rollout_block(toy_attentions(), layout)
    torch.testing.assert_close(block.values[0, :, 0], torch.tensor([[0.0], [0.375]]), atol=1e-7, rtol=0)
    torch.testing.assert_close(block.register_mass[0, :, 0], torch.tensor([0.25, 0.125]), atol=1e-7, rtol=0)
    torch.testing.assert_close(block.prefix_mass[0, :, 0], torch.tensor([1.0, 0.625]), atol=1e-7, rtol=0)


# --- per-head maps on toy tensors -----------------------------------------------------------------------


def random_attention(generator: torch.Generator, batch: int, heads: int, tokens: int) -> torch.Tensor:
    return torch.softmax(torch.randn(batch, heads, tokens, tokens, generator=generator) * 3, dim=-1)


def test_registers_excluded_from_map_but_counted_in_mass():
    """Registers with huge attention mass must not leak into the patch grid."""
    layout = TokenLayout(has_cls=True, num_registers=4, grid_h=2, grid_w=3)
    tokens = layout.seq_len  # 1 + 4 + 6 = 11
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, tokens, tokens, generator=generator)
    logits[..., 1:5] += 20.0  # every query looks almost only at the registers
    attn = torch.softmax(logits, dim=-1)
    blocks = vit_map_blocks([attn], layout, ["cls", "mean"])
    for method, rows in (("cls", attn[:, :, 0, :]), ("mean", attn.mean(dim=2))):
        block = blocks[method]
        assert block.values.shape == (2, 1, 4, 6), method  # fused + 3 heads, 6 patches only
        torch.testing.assert_close(block.values[:, 0, 1:], rows[..., 5:], atol=0, rtol=0)
        torch.testing.assert_close(block.register_mass[:, 0, 1:], rows[..., 1:5].sum(-1), atol=1e-6, rtol=0)
        torch.testing.assert_close(block.prefix_mass[:, 0, 1:], rows[..., :5].sum(-1), atol=1e-6, rtol=0)
        assert (block.register_mass[:, 0, 1:] > 0.99).all()  # the huge mass is recorded...
        assert (block.values.sum(-1) < 0.01).all()  # ...and not on the patch grid


def test_fused_is_head_mean_and_equals_cls_row_of_head_mean_matrix():
    layout = TokenLayout(has_cls=True, num_registers=0, grid_h=2, grid_w=2)
    generator = torch.Generator().manual_seed(1)
    attentions = [random_attention(generator, 2, 5, layout.seq_len) for _ in range(3)]
    block = vit_map_blocks(attentions, layout, ["cls"])["cls"]
    assert block.values.shape == (2, 3, 6, 4)
    for layer, attn in enumerate(attentions):
        head_mean_matrix = attn.mean(dim=1)  # (B, T, T)
        torch.testing.assert_close(block.values[:, layer, 0], head_mean_matrix[:, 0, 1:], atol=1e-7, rtol=0)
        torch.testing.assert_close(block.values[:, layer, 1:], attn[:, :, 0, 1:], atol=0, rtol=0)


def test_siglip_layout_has_no_cls_method_and_probe_needs_capture():
    layout = TokenLayout(has_cls=False, num_registers=0, grid_h=2, grid_w=2)
    attn = random_attention(torch.Generator().manual_seed(2), 1, 2, 4)
    with pytest.raises(ValueError, match="CLS"):
        vit_map_blocks([attn], layout, ["cls"])
    with pytest.raises(AttentionShapeError):
        vit_map_blocks([attn], layout, ["probe"])
    probe = torch.softmax(torch.randn(1, 2, 1, 4), dim=-1)
    block = vit_map_blocks([attn], layout, ["probe"], pooling=probe)["probe"]
    assert block.layers == [1]
    torch.testing.assert_close(block.values[0, 0, 1:], probe[0, :, 0], atol=0, rtol=0)
    torch.testing.assert_close(block.values[0, 0, 0], probe[0, :, 0].mean(0), atol=1e-7, rtol=0)


def test_check_attentions_fails_loudly():
    layout = TokenLayout(has_cls=True, num_registers=2, grid_h=2, grid_w=2)
    good = [torch.zeros(1, 3, 7, 7)] * 2
    check_attentions(good, layout, num_layers=2, num_heads=3, batch=1)
    for bad in (None, (), [None, None]):
        with pytest.raises(AttentionShapeError, match="eager"):
            check_attentions(bad, layout, num_layers=2, num_heads=3, batch=1)
    with pytest.raises(AttentionShapeError, match="layers"):
        check_attentions(good[:1], layout, num_layers=2, num_heads=3, batch=1)
    with pytest.raises(AttentionShapeError, match="shape"):  # registers not accounted for
        check_attentions([torch.zeros(1, 3, 5, 5)] * 2, layout, num_layers=2, num_heads=3, batch=1)


def test_sdpa_model_without_attention_weights_is_an_error(tiny_checkpoints):
    adapter = load_model("clip", LoadRequest(checkpoint=tiny_checkpoints["clip"], device="cpu"))
    adapter.module.set_attn_implementation("sdpa")
    with pytest.raises(AttentionShapeError, match="eager"):
        adapter.run(torch.zeros(1, 3, 32, 32))


# --- the warehouse written by the tiny models -----------------------------------------------------------


@pytest.mark.parametrize(("slug", "method"), PER_HEAD)
def test_fused_row_is_mean_of_head_rows(tiny_warehouse, slug, method):
    rows = read_maps(tiny_warehouse, slug, method)
    groups: dict[tuple[str, int], dict] = {}
    for row in rows:
        groups.setdefault((row["image_id"], row["layer"]), {})[row["head"]] = np.asarray(row["map_values"])
    assert groups
    for key, maps in groups.items():
        num_heads = rows[0]["num_heads"]
        assert set(maps) == {None, *range(num_heads)}, key
        head_mean = np.mean([maps[h].astype(np.float64) for h in range(num_heads)], axis=0)
        np.testing.assert_allclose(maps[None], head_mean, atol=1e-6, rtol=0, err_msg=str(key))
        # and the heads differ from each other (otherwise the check above proves nothing)
        assert np.abs(maps[0] - maps[1]).max() > 1e-3


@pytest.mark.parametrize(("slug", "method"), MASS_ONE)
def test_patch_mass_plus_prefix_mass_is_one(tiny_warehouse, slug, method):
    rows = read_maps(tiny_warehouse, slug, method)
    assert rows
    for row in rows:
        values = np.asarray(row["map_values"], dtype=np.float64)
        assert np.isfinite(values).all()
        assert (values >= 0).all() and (values <= 1).all()
        assert 0 <= row["register_mass"] <= row["prefix_mass"] + 1e-7 <= 1 + 1e-6
        assert values.sum() + row["prefix_mass"] == pytest.approx(1.0, abs=1e-5), (row["layer"], row["head"])
        if not MODELS[slug].has_cls:
            assert row["prefix_mass"] == 0.0


@pytest.mark.parametrize("slug", ["dinov2", "dinov3", "mae", "clip", "siglip"])
def test_map_length_is_the_patch_grid(tiny_warehouse, slug):
    for method in MODELS[slug].methods:
        for row in read_maps(tiny_warehouse, slug, method):
            # 32x32 input, patch 8: a 4x4 grid whatever the number of CLS/register tokens
            assert (row["grid_h"], row["grid_w"]) == (4, 4)
            assert len(row["map_values"]) == 16


# --- recomputation from the model's own q/k projections -------------------------------------------------

# slug -> (path of the layer list, the layer's pre-attention norm, its attention module)
LAYER_PARTS = {
    "clip": ("encoder.layers", "layer_norm1", "self_attn"),
    "dinov2": ("encoder.layer", "norm1", "attention"),
    "mae": ("layers", "layernorm_before", "attention"),
}


@pytest.mark.parametrize("slug", sorted(LAYER_PARTS))
def test_cls_map_equals_recomputation_from_q_and_k(tiny_warehouse, tiny_adapters, sample_dir, slug):
    """softmax(q_cls · kᵀ / √d) per head, from the hooked layer input, vs the stored rows."""
    adapter = tiny_adapters[slug]
    layers_path, norm_name, attn_name = LAYER_PARTS[slug]
    layers = adapter.module.get_submodule(layers_path)
    assert len(layers) == adapter.num_layers == 2
    inputs: dict[int, torch.Tensor] = {}

    def keep_input(index):
        def hook(_module, args, kwargs):
            inputs[index] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        return hook

    names, images = sample_images(sample_dir)
    pixel_values = adapter.pixel_values(images)
    handles = [layer.register_forward_pre_hook(keep_input(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        blocks = adapter.run(pixel_values)
    finally:
        for handle in handles:
            handle.remove()

    rows = read_maps(tiny_warehouse, slug, "cls")
    ids = image_ids(tiny_warehouse)
    heads, prefix = adapter.num_heads, 1 + adapter.num_registers
    for index, layer in enumerate(layers):
        norm = layer.get_submodule(norm_name)
        attn = layer.get_submodule(attn_name)
        x = inputs[index].double()  # (B, T, D)
        h = F.layer_norm(x, norm.normalized_shape, norm.weight.double(), norm.bias.double(), norm.eps)
        q = F.linear(h, attn.q_proj.weight.double(), attn.q_proj.bias.double())
        k = F.linear(h, attn.k_proj.weight.double(), attn.k_proj.bias.double())
        batch, tokens, dim = q.shape
        head_dim = dim // heads
        q = q.view(batch, tokens, heads, head_dim).transpose(1, 2)  # (B, H, T, d)
        k = k.view(batch, tokens, heads, head_dim).transpose(1, 2)
        cls_rows = torch.softmax(q[:, :, 0:1] @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)[:, :, 0]  # (B,H,T)
        assert tokens == prefix + 16

        returned = blocks["cls"][0]
        for b, name in enumerate(names):
            for head in range(heads):
                expected = cls_rows[b, head]
                np.testing.assert_allclose(returned.values[b, index, 1 + head], expected[prefix:], atol=1e-5)
                row = stored(rows, ids[name], index, head)
                np.testing.assert_allclose(row["map_values"], expected[prefix:].numpy(), atol=1e-5, rtol=0)
                assert row["prefix_mass"] == pytest.approx(float(expected[:prefix].sum()), abs=1e-5)
                assert row["register_mass"] == pytest.approx(float(expected[1:prefix].sum()), abs=1e-5)
            fused = stored(rows, ids[name], index, None)
            np.testing.assert_allclose(fused["map_values"], cls_rows[b, :, prefix:].mean(0).numpy(), atol=1e-5)


def test_siglip_probe_equals_recomputation_from_pooling_head(tiny_warehouse, tiny_adapters, sample_dir):
    """The probe query's attention: softmax((probe Wq + bq)(x Wk + bk)ᵀ / √d) over the patch tokens."""
    adapter = tiny_adapters["siglip"]
    head_module = adapter.module.head
    captured = {}
    handle = head_module.register_forward_pre_hook(lambda _m, args: captured.__setitem__("x", args[0].detach().clone()))
    names, images = sample_images(sample_dir)
    try:
        adapter.run(adapter.pixel_values(images))
    finally:
        handle.remove()
    mha = head_module.attention
    dim, heads = mha.embed_dim, mha.num_heads
    assert heads == adapter.num_heads == 4
    w_q, w_k, _ = mha.in_proj_weight.double().split(dim)
    b_q, b_k, _ = mha.in_proj_bias.double().split(dim)
    x = captured["x"].double()  # (B, N, D)
    q = F.linear(head_module.probe.double(), w_q, b_q)  # (1, 1, D)
    k = F.linear(x, w_k, b_k)
    batch, tokens, _ = k.shape
    d = dim // heads
    q = q.view(1, 1, heads, d).transpose(1, 2)  # (1, H, 1, d)
    k = k.view(batch, tokens, heads, d).transpose(1, 2)  # (B, H, N, d)
    probe = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)[:, :, 0]  # (B, H, N)

    rows = read_maps(tiny_warehouse, "siglip", "probe")
    ids = image_ids(tiny_warehouse)
    assert {r["layer"] for r in rows} == {adapter.num_layers}  # the pooling head sits after the last block
    assert {r["layer_name"] for r in rows} == {"pooling head"}
    for b, name in enumerate(names):
        for head in range(heads):
            row = stored(rows, ids[name], adapter.num_layers, head)
            np.testing.assert_allclose(row["map_values"], probe[b, head].numpy(), atol=1e-5, rtol=0)
            assert row["prefix_mass"] == 0.0


@pytest.mark.parametrize("slug", ["dinov2", "dinov3", "clip", "siglip"])
def test_stored_maps_match_the_models_own_attention(tiny_warehouse, tiny_adapters, sample_dir, slug):
    """cls/mean/rollout rows vs the eager attention the model returns (registers sliced off by hand)."""
    adapter = tiny_adapters[slug]
    names, images = sample_images(sample_dir)
    pixel_values = adapter.pixel_values(images)
    with torch.no_grad():
        attentions = adapter.module(pixel_values=pixel_values, output_attentions=True).attentions
    has_cls = MODELS[slug].has_cls
    registers = adapter.num_registers
    assert registers == {"dinov2": 4, "dinov3": 2}.get(slug, 0)
    first_patch = int(has_cls) + registers
    ids = image_ids(tiny_warehouse)
    methods = {m: read_maps(tiny_warehouse, slug, m) for m in MODELS[slug].methods}
    rollout = None
    for layer, attn in enumerate(attentions):
        attn = attn.double()  # (B, H, T, T)
        tokens = attn.shape[-1]
        assert tokens == first_patch + 16
        mixed = attn.mean(1) + torch.eye(tokens, dtype=attn.dtype)
        mixed = mixed / mixed.sum(-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout
        for b, name in enumerate(names):
            image_id = ids[name]
            for head in range(adapter.num_heads):
                if "cls" in methods:
                    row = stored(methods["cls"], image_id, layer, head)
                    np.testing.assert_allclose(row["map_values"], attn[b, head, 0, first_patch:], atol=1e-6)
                    assert row["register_mass"] == pytest.approx(float(attn[b, head, 0, 1:first_patch].sum()), abs=1e-6)
                row = stored(methods["mean"], image_id, layer, head)
                np.testing.assert_allclose(row["map_values"], attn[b, head, :, first_patch:].mean(0), atol=1e-6)
            row = stored(methods["rollout"], image_id, layer, None)
            expected = rollout[b, 0] if has_cls else rollout[b].mean(0)
            np.testing.assert_allclose(row["map_values"], expected[first_patch:], atol=1e-6)
            assert row["prefix_mass"] == pytest.approx(float(expected[:first_patch].sum()), abs=1e-6)
            if layer == 0:  # rollout of layer 0 alone is norm(Ā₀ + I)'s CLS (or mean) row
                single = mixed[b, 0] if has_cls else mixed[b].mean(0)
                np.testing.assert_allclose(row["map_values"], single[first_patch:], atol=1e-6)


# --- MAE: no hidden shuffle -----------------------------------------------------------------------------


def _mae_embeddings(adapter, pixel_values: torch.Tensor) -> torch.Tensor:
    """The MAE embedding output (after masking) during the adapter's own forward pass."""
    captured = {}
    handle = adapter.module.embeddings.register_forward_hook(
        lambda _m, _args, out: captured.__setitem__("emb", out[0].detach().clone())
    )
    try:
        adapter.run(pixel_values)
    finally:
        handle.remove()
    return captured["emb"]  # (B, 1 + N, D)


def _raster_patch_embeddings(adapter, pixel_values: torch.Tensor) -> torch.Tensor:
    """Conv patch projection written out: raster-order patches · Wᵀ + b + position embeddings."""
    embeddings = adapter.module.embeddings
    conv = embeddings.patch_embeddings.projection
    p = conv.kernel_size[0]
    batch, channels, height, width = pixel_values.shape
    patches = pixel_values.unfold(2, p, p).unfold(3, p, p)  # (B, C, gh, gw, p, p)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(batch, (height // p) * (width // p), channels * p * p)
    projected = patches.double() @ conv.weight.double().reshape(conv.out_channels, -1).T + conv.bias.double()
    return projected + embeddings.position_embeddings[0, 1:].double()  # (B, N, D)


def test_mae_tokens_are_in_raster_order(tiny_adapters, sample_dir):
    adapter = tiny_adapters["mae"]
    _, images = sample_images(sample_dir)
    pixel_values = adapter.pixel_values(images[:3])
    emb = _mae_embeddings(adapter, pixel_values)
    expected = _raster_patch_embeddings(adapter, pixel_values)
    assert emb.shape == (3, 1 + 16, 32)  # no patch dropped although the config says mask_ratio 0.75
    np.testing.assert_allclose(emb[:, 1:].double(), expected, atol=1e-5, rtol=0)
    cls = adapter.module.embeddings.cls_token[0, 0] + adapter.module.embeddings.position_embeddings[0, 0]
    np.testing.assert_allclose(emb[:, 0], cls.expand(3, -1), atol=1e-6, rtol=0)

    # The same comparison fails for the model's default random masking: the check above can tell.
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        shuffled = adapter.module.embeddings(pixel_values, noise=torch.rand(3, 16))[0]
    assert not torch.allclose(shuffled[:, 1:].double(), expected, atol=1e-3)


@pytest.mark.parametrize(("row", "col"), [(0, 0), (1, 2), (3, 1)])
def test_mae_local_change_moves_only_its_patch_token(tiny_adapters, sample_dir, row, col):
    adapter = tiny_adapters["mae"]
    _, images = sample_images(sample_dir)
    pixel_values = adapter.pixel_values(images[:1])
    changed = pixel_values.clone()
    changed[:, :, row * 8 : (row + 1) * 8, col * 8 : (col + 1) * 8] += 1.0
    before, after = _mae_embeddings(adapter, pixel_values), _mae_embeddings(adapter, changed)
    moved = (after - before).abs().amax(dim=-1)[0]  # (1 + N,)
    token = 1 + row * 4 + col
    assert moved[token] > 1e-3
    assert torch.count_nonzero(moved > 1e-6) == 1, moved


# --- registers: where they sit in the token sequence, read from the model itself ---------------------------


def _embedding_output(adapter, pixel_values: torch.Tensor) -> torch.Tensor:
    captured = {}

    def keep(_module, _args, out):
        captured["emb"] = (out[0] if isinstance(out, tuple) else out).detach().clone()

    handle = adapter.module.embeddings.register_forward_hook(keep)
    try:
        adapter.run(pixel_values)
    finally:
        handle.remove()
    return captured["emb"]  # (B, T, D)


@pytest.mark.parametrize("slug", ["dinov2", "dinov3"])
def test_register_tokens_sit_between_cls_and_the_patches(tiny_adapters, sample_dir, slug):
    """Independent of the adapter's layout rule: tokens 1..R of the sequence entering layer 0 are the model's
    learned register tokens, and changing one image patch changes only token 1 + R + its raster index."""
    adapter = tiny_adapters[slug]
    registers = adapter.module.embeddings.register_tokens  # (1, R, D)
    count = registers.shape[1]
    assert count == adapter.num_registers > 0
    _, images = sample_images(sample_dir)
    pixel_values = adapter.pixel_values(images[:2])
    emb = _embedding_output(adapter, pixel_values)
    grid_h, grid_w = (s // adapter.patch_size for s in pixel_values.shape[-2:])
    assert emb.shape[1] == 1 + count + grid_h * grid_w
    torch.testing.assert_close(emb[:, 1 : 1 + count], registers.expand(2, -1, -1), atol=1e-6, rtol=0)
    patch = adapter.patch_size
    for row, col in [(0, 0), (grid_h - 1, 1), (1, grid_w - 1)]:
        changed = pixel_values.clone()
        changed[:, :, row * patch : (row + 1) * patch, col * patch : (col + 1) * patch] += 1.0
        moved = (_embedding_output(adapter, changed) - emb).abs().amax(dim=-1)[0]  # (T,)
        assert torch.nonzero(moved > 1e-6).flatten().tolist() == [1 + count + row * grid_w + col]
