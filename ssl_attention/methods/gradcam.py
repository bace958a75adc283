"""Grad-CAM (Selvaraju et al., 2017) for CNN stages, from one forward and one backward pass.

For stage activations F (B, C, h, w) and the top-1 logit y of each image:
    alpha_k = mean_{i,j} dy/dF^k_{ij}      (B, C)
    cam     = ReLU(sum_k alpha_k F^k)      (B, h, w)
The stored map is cam / sum(cam) (a distribution over the stage's grid, comparable with attention maps);
``raw_scale`` = sum(cam) keeps the raw magnitude, so raw = map * raw_scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ssl_attention.methods.blocks import MapBlock

if TYPE_CHECKING:  # passes.py imports GradCamResult from here
    from ssl_attention.methods.passes import CNNPass


@dataclass
class GradCamResult:
    maps: list[torch.Tensor]  # per stage, (B, h, w), normalised to sum 1 (all-zero maps stay zero)
    raw_scale: torch.Tensor  # (B, S): sum of the raw cam per stage
    target_class: torch.Tensor  # (B,) top-1 class index
    target_score: torch.Tensor  # (B,) top-1 logit
    logits: torch.Tensor  # (B, num_classes), detached


def grad_cam(model: nn.Module, pixel_values: torch.Tensor, stages: Sequence[str]) -> GradCamResult:
    """Grad-CAM of the top-1 class at each named stage, one forward and one backward."""
    activations: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, _inp, out, name=name: activations.__setitem__(name, out)
        )
        for name in stages
    ]
    try:
        with torch.enable_grad():
            # Gradients flow to the input only, so the stage activations are part of the graph while the
            # parameters stay frozen.
            inputs = pixel_values.detach().requires_grad_(True)
            logits = model(inputs)  # (B, num_classes)
            target_class = logits.argmax(dim=1)
            target_score = logits.gather(1, target_class[:, None]).squeeze(1)
            feats = [activations[name] for name in stages]
            # Images are independent in eval mode, so d(sum of scores)/dF_b = d(score_b)/dF_b.
            grads = torch.autograd.grad(target_score.sum(), feats)
    finally:
        for handle in handles:
            handle.remove()
    maps, scales = [], []
    for feat, grad in zip(feats, grads, strict=True):
        alpha = grad.float().mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        cam = torch.relu((alpha * feat.detach().float()).sum(dim=1))  # (B, h, w)
        total = cam.sum(dim=(1, 2))  # (B,)
        safe = torch.where(total > 0, total, torch.ones_like(total))
        maps.append(cam / safe[:, None, None])
        scales.append(total)
    return GradCamResult(
        maps=maps,
        raw_scale=torch.stack(scales, dim=1),
        target_class=target_class.detach(),
        target_score=target_score.detach(),
        logits=logits.detach(),
    )


def gradcam_maps(forward: CNNPass) -> list[MapBlock]:
    """One fused-only MapBlock per stage (each stage has its own grid)."""
    result = forward.gradcam
    blocks = []
    for index, cam in enumerate(result.maps):
        batch, grid_h, grid_w = cam.shape
        zeros = torch.zeros(batch, 1, 1, device=cam.device)
        blocks.append(
            MapBlock(
                values=cam.reshape(batch, 1, 1, grid_h * grid_w),
                prefix_mass=zeros,
                register_mass=zeros,
                layers=[index],
                per_head=False,
                grid_h=grid_h,
                grid_w=grid_w,
                layer_names=[forward.stage_names[index]],
                raw_scale=result.raw_scale[:, index].reshape(batch, 1, 1),
                target_class=result.target_class,
            )
        )
    return blocks
