"""Attention rollout (Abnar & Zuidema 2020): attention flow through the layers, fused over heads."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ssl_attention.methods.blocks import MapBlock, TokenLayout, split_rows
from ssl_attention.methods.passes import ViTPass


def rollout_block(attentions: Sequence[torch.Tensor], layout: TokenLayout) -> MapBlock:
    """Attention rollout (Abnar & Zuidema 2020), one map per layer prefix.

    R_l = norm(Ā_l + I) · R_{l-1}, R_{-1} = I, Ā_l the head mean of A[l] and norm() renormalising rows to
    sum 1. Layer l stores the CLS row of R_l, or the mean row where the model has no CLS token.
    """
    # The stored row is a vector times a product of matrices, v · Â_l · Â_{l-1} ⋯ Â_0 with v the CLS
    # indicator (or the uniform mean vector), so it is evaluated from the vector's side as vector-matrix
    # products: O(L² T²) per image instead of the O(L T³) of forming every R_l.
    mixed_layers = []
    for attn in attentions:
        mixed = attn.float().mean(dim=1)  # Ā_l, (B, T, T)
        mixed = mixed + torch.eye(mixed.shape[-1], dtype=mixed.dtype, device=mixed.device)
        mixed_layers.append(mixed / mixed.sum(dim=-1, keepdim=True))  # Â_l = norm(Ā_l + I)
    batch, tokens = mixed_layers[0].shape[0], mixed_layers[0].shape[-1]
    start = torch.zeros(batch, 1, tokens, dtype=torch.float32, device=mixed_layers[0].device)
    if layout.has_cls:
        start[:, :, 0] = 1.0
    else:
        start += 1.0 / tokens
    rows, layers = [], []
    for layer in range(len(mixed_layers)):
        row = start
        for mixed in reversed(mixed_layers[: layer + 1]):
            row = torch.bmm(row, mixed)  # (B, 1, T)
        rows.append(row[:, 0, :])
        layers.append(layer)
    stacked = torch.stack(rows, dim=1)  # (B, L, T)
    patches, prefix, registers = split_rows(stacked, layout)
    return MapBlock(
        values=patches.unsqueeze(2),  # (B, L, 1, N)
        prefix_mass=prefix.unsqueeze(2),
        register_mass=registers.unsqueeze(2),
        layers=layers,
        per_head=False,
        grid_h=layout.grid_h,
        grid_w=layout.grid_w,
    )


def rollout_maps(forward: ViTPass) -> list[MapBlock]:
    block = rollout_block(forward.attentions, forward.layout)
    block.layer_names = [forward.layer_names[i] for i in block.layers]
    return [block]
