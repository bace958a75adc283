"""The shared shapes of the methods: where tokens sit (``TokenLayout``) and what a method returns (``MapBlock``).

Notation (docs/architecture.md, "Notation"): ``A[l, h]`` is the post-softmax attention of layer l, head h, shape
(T, T), rows are queries and sum to 1. The token sequence is ``[prefix..., patches...]`` where the prefix holds the
CLS token (if the model has one) followed by register tokens; P is the set of patch tokens in raster order.
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


def split_rows(rows: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        p, pre, reg = split_rows(rows.float(), layout)
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
