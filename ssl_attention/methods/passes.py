"""What one forward pass hands to the methods: each method's ``compute`` reads one of these, never the model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ssl_attention.methods.blocks import TokenLayout
from ssl_attention.methods.gradcam import GradCamResult


@dataclass(frozen=True)
class ViTPass:
    """One eager forward pass of a ViT over a batch.

    ``attentions``: one (B, H, T, T) tensor per encoder block. ``pooling_attention``: the attention-pooling
    head's weights over the patch tokens, (B, H, 1, N), captured in the same pass where a method needs it
    (SigLIP's probe), else None. ``layer_names``: "block 0" … plus "pooling head" at index L where there is one.
    """

    attentions: Sequence[torch.Tensor]
    layout: TokenLayout
    layer_names: Sequence[str]
    pooling_attention: torch.Tensor | None = None

    @property
    def num_layers(self) -> int:
        return len(self.attentions)


@dataclass(frozen=True)
class CNNPass:
    """One forward and one backward pass of a CNN (Grad-CAM's inputs), per named stage."""

    gradcam: GradCamResult
    stage_names: Sequence[str]


ForwardPass = ViTPass | CNNPass
