"""Attention maps from one forward pass: per-head and fused CLS/mean/probe maps, and rollout.

Notation (DESIGN.md): ``A[l, h]`` is the post-softmax attention of layer l, head h, shape (T, T), rows are
queries and sum to 1. The token sequence is ``[prefix..., patches...]`` where the prefix holds the CLS token
(if the model has one) followed by register tokens; P is the set of patch tokens in raster order.

Every function here is pure: tensors in, tensors out, no model calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLayout:
    """Where CLS, registers and patches sit in a ViT's token sequence."""

    has_cls: bool
    num_registers: int
    grid_h: int
    grid_w: int

    @property
    def num_prefix(self) -> int:
        return int(self.has_cls) + self.num_registers

    @property
    def num_patches(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def seq_len(self) -> int:
        return self.num_prefix + self.num_patches

    @property
    def register_slice(self) -> slice:
        start = int(self.has_cls)
        return slice(start, start + self.num_registers)


@dataclass
class MapBlock:
    """The maps of one method for one batch of images.

    ``values`` has shape (B, L, K, N): B images, L layers, K maps per layer, N = grid_h * grid_w patches.
    For per-head methods K = H + 1 and index 0 is the fused map (mean over heads), 1..H the heads;
    for fused-only methods K = 1. ``prefix_mass``/``register_mass`` have shape (B, L, K): the attention
    mass that went to CLS+register tokens and to register tokens alone (so patch sum + prefix = 1).
    ``layers`` gives the layer index of each of the L entries.
    """

    values: torch.Tensor
    prefix_mass: torch.Tensor
    register_mass: torch.Tensor
    layers: list[int]
    per_head: bool
    grid_h: int
    grid_w: int
    layer_names: list[str] | None = None
    raw_scale: torch.Tensor | None = None  # (B, L, K), Grad-CAM only
    target_class: torch.Tensor | None = None  # (B,), Grad-CAM only


class AttentionShapeError(RuntimeError):
    """The model returned no attention weights, or weights of an unexpected shape."""


def check_attentions(
    attentions: Sequence[torch.Tensor] | None, layout: TokenLayout, num_layers: int, num_heads: int, batch: int
) -> None:
    """Fail loudly when attentions are missing or malformed (the silent-empty-map bug)."""
    if attentions is None or len(attentions) == 0 or any(a is None for a in attentions):
        raise AttentionShapeError(
            "the model returned no attention weights; load it with attn_implementation='eager' and call it "
            "with output_attentions=True (SDPA/flash attention do not return weights)"
        )
    if len(attentions) != num_layers:
        raise AttentionShapeError(f"expected attentions for {num_layers} layers, got {len(attentions)}")
    expected = (batch, num_heads, layout.seq_len, layout.seq_len)
    for i, a in enumerate(attentions):
        if tuple(a.shape) != expected:
            raise AttentionShapeError(
                f"layer {i}: attention shape {tuple(a.shape)} != expected {expected} "
                f"(prefix tokens {layout.num_prefix}, grid {layout.grid_h}x{layout.grid_w})"
            )


def _split_rows(rows: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rows (..., T) -> patch values (..., N), prefix mass (...), register mass (...)."""
    patches = rows[..., layout.num_prefix :]
    prefix = rows[..., : layout.num_prefix].sum(-1)
    registers = rows[..., layout.register_slice].sum(-1)
    return patches, prefix, registers


def _with_fused(per_head: torch.Tensor) -> torch.Tensor:
    """(B, H, ...) -> (B, 1 + H, ...): the head mean prepended as index 0."""
    return torch.cat([per_head.mean(dim=1, keepdim=True), per_head], dim=1)


def per_head_block(query_rows: Sequence[torch.Tensor], layout: TokenLayout, layers: list[int]) -> MapBlock:
    """Stack per-layer query rows (each (B, H, T)) into a per-head MapBlock with the fused map first."""
    patches, prefix, registers = [], [], []
    for rows in query_rows:
        p, pre, reg = _split_rows(rows.float(), layout)
        patches.append(_with_fused(p))  # (B, 1+H, N)
        prefix.append(_with_fused(pre))  # (B, 1+H)
        registers.append(_with_fused(reg))
    return MapBlock(
        values=torch.stack(patches, dim=1),  # (B, L, 1+H, N)
        prefix_mass=torch.stack(prefix, dim=1),
        register_mass=torch.stack(registers, dim=1),
        layers=layers,
        per_head=True,
        grid_h=layout.grid_h,
        grid_w=layout.grid_w,
    )


def cls_rows(attn: torch.Tensor) -> torch.Tensor:
    """(B, H, T, T) -> (B, H, T): the CLS query's attention, A[l, h][cls, :]."""
    return attn[:, :, 0, :]


def mean_rows(attn: torch.Tensor) -> torch.Tensor:
    """(B, H, T, T) -> (B, H, T): attention received by each token, averaged over all T query rows."""
    return attn.mean(dim=2)


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
    patches, prefix, registers = _split_rows(stacked, layout)
    return MapBlock(
        values=patches.unsqueeze(2),  # (B, L, 1, N)
        prefix_mass=prefix.unsqueeze(2),
        register_mass=registers.unsqueeze(2),
        layers=layers,
        per_head=False,
        grid_h=layout.grid_h,
        grid_w=layout.grid_w,
    )


def vit_map_blocks(
    attentions: Sequence[torch.Tensor],
    layout: TokenLayout,
    methods: Sequence[str],
    probe_attention: torch.Tensor | None = None,
    probe_layer: int | None = None,
) -> dict[str, MapBlock]:
    """Every requested method's maps from one forward pass's attentions.

    ``attentions``: one (B, H, T, T) tensor per layer. ``probe_attention``: SigLIP's pooling-head weights,
    (B, H, 1, N) over patch tokens only, required for ``probe``.
    """
    blocks: dict[str, MapBlock] = {}
    layers = list(range(len(attentions)))
    if "cls" in methods:
        if not layout.has_cls:
            raise ValueError("the cls method needs a CLS token; this model has none (use probe or mean)")
        blocks["cls"] = per_head_block([cls_rows(a) for a in attentions], layout, layers)
    if "mean" in methods:
        blocks["mean"] = per_head_block([mean_rows(a) for a in attentions], layout, layers)
    if "rollout" in methods:
        blocks["rollout"] = rollout_block(attentions, layout)
    if "probe" in methods:
        if probe_attention is None or probe_layer is None:
            raise AttentionShapeError("probe maps need the pooling head's attention; none was captured")
        probe_layout = TokenLayout(has_cls=False, num_registers=0, grid_h=layout.grid_h, grid_w=layout.grid_w)
        blocks["probe"] = per_head_block([probe_attention[:, :, 0, :]], probe_layout, [probe_layer])
    return blocks
