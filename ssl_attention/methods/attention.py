"""Per-head methods read from the attention weights of one forward pass: CLS, mean and SigLIP's probe.

Each returns one per-head ``MapBlock`` (fused map at index 0, heads 1..H) covering its stored layers.
"""

from __future__ import annotations

import torch

from ssl_attention.methods.blocks import AttentionShapeError, MapBlock, TokenLayout, per_head_block
from ssl_attention.methods.passes import ViTPass


def cls_rows(attn: torch.Tensor) -> torch.Tensor:
    """(B, H, T, T) -> (B, H, T): the CLS query's attention, A[l, h][cls, :]."""
    return attn[:, :, 0, :]


def mean_rows(attn: torch.Tensor) -> torch.Tensor:
    """(B, H, T, T) -> (B, H, T): attention received by each token, averaged over all T query rows."""
    return attn.mean(dim=2)


def _named(block: MapBlock, forward: ViTPass) -> list[MapBlock]:
    block.layer_names = [forward.layer_names[i] for i in block.layers]
    return [block]


def cls_maps(forward: ViTPass) -> list[MapBlock]:
    if not forward.layout.has_cls:
        raise ValueError("the cls method needs a CLS token; this model has none (use probe or mean)")
    layers = list(range(forward.num_layers))
    return _named(per_head_block([cls_rows(a) for a in forward.attentions], forward.layout, layers), forward)


def mean_maps(forward: ViTPass) -> list[MapBlock]:
    layers = list(range(forward.num_layers))
    return _named(per_head_block([mean_rows(a) for a in forward.attentions], forward.layout, layers), forward)


def probe_maps(forward: ViTPass) -> list[MapBlock]:
    """The pooling head's probe query over the patches, stored at layer index L (one past the last block)."""
    if forward.pooling_attention is None:
        raise AttentionShapeError("probe maps need the pooling head's attention; none was captured")
    layout = forward.layout
    # The pooling head attends over patch tokens only: no prefix, so patch mass alone sums to 1.
    patches_only = TokenLayout(has_cls=False, num_registers=0, grid_h=layout.grid_h, grid_w=layout.grid_w)
    block = per_head_block([forward.pooling_attention[:, :, 0, :]], patches_only, [forward.num_layers])
    return _named(block, forward)
