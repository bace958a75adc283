"""Grad-CAM against a hand-computed toy and an independent hook-and-backward implementation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from ssl_attention.images import load_image
from ssl_attention.methods.gradcam import grad_cam
from ssl_attention.warehouse.paths import partition_file

STAGES = ("layer1", "layer2", "layer3", "layer4")


class PoolThenLinear(nn.Module):
    """logits = W · mean_ij F: then dy_c/dF^k_ij = W[c, k] / (h w), so Grad-CAM has a closed form."""

    def __init__(self, weight: list[list[float]]) -> None:
        super().__init__()
        self.features = nn.Identity()
        self.fc = nn.Linear(len(weight[0]), len(weight), bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor(weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def test_grad_cam_hand_computed():
    model = PoolThenLinear([[1.0, 0.0], [0.5, 2.0], [-1.0, 1.0]]).eval()
    x = torch.tensor(
        [
            # image 0: channel means (2.5, 0) -> logits (2.5, 1.25, -2.5) -> class 0, alpha = (1, 0)/4
            #   cam = relu(F0 / 4) = [[.25, .5], [.75, 1]], sum 2.5
            [[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, -1.0]]],
            # image 1: channel means (0, .25) -> logits (0, .5, .25) -> class 1, alpha = (.5, 2)/4
            #   cam = relu(.125 F0 + .5 F1) = relu([[.875, 0], [0, -.375]]) = [[.875, 0], [0, 0]], sum .875
            [[[-1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, -1.0]]],
        ]
    )
    result = grad_cam(model, x, ["features"])
    assert result.target_class.tolist() == [0, 1]
    torch.testing.assert_close(result.target_score, torch.tensor([2.5, 0.5]))
    torch.testing.assert_close(result.maps[0][0], torch.tensor([[0.1, 0.2], [0.3, 0.4]]))
    torch.testing.assert_close(result.maps[0][1], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(result.raw_scale[:, 0], torch.tensor([2.5, 0.875]))
    assert x.grad is None  # the caller's tensor is left alone


def manual_grad_cam(model: nn.Module, image: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """Grad-CAM of one image (1, 3, H, W), written independently: retain_grad on each stage output."""
    outputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_module, _inputs, output):
            output.retain_grad()
            outputs[name] = output

        return hook

    handles = [model.get_submodule(name).register_forward_hook(keep(name)) for name in STAGES]
    try:
        x = image.clone().requires_grad_(True)  # the frozen model's graph starts at the input
        logits = model(x)
        target = int(logits[0].argmax())
        logits[0, target].backward()
    finally:
        for handle in handles:
            handle.remove()
    cams = []
    for name in STAGES:
        feature, grad = outputs[name][0].detach().double(), outputs[name].grad[0].double()  # (C, h, w)
        weights = grad.mean(dim=(1, 2))  # (C,)
        cams.append(torch.relu((weights[:, None, None] * feature).sum(0)))  # (h, w), raw
    return target, cams


def test_grad_cam_equals_manual_hook_and_gradient(tiny_adapters, tiny_warehouse, sample_dir: Path):
    adapter = tiny_adapters["resnet50"]
    names = sorted(p.name for p in sample_dir.glob("*.jpg"))
    pixel_values = adapter.pixel_values([load_image(sample_dir / n)[0] for n in names])
    blocks = adapter.run(pixel_values)["gradcam"]  # one batch, one backward
    assert [b.layer_names for b in blocks] == [[s] for s in STAGES]

    rows = pq.read_table(
        partition_file(tiny_warehouse, "attention_maps", model="resnet50", method="gradcam", shard="0")
    )
    rows = rows.to_pylist()
    ids = {r["file_name"]: r["image_id"] for r in pq.read_table(partition_file(tiny_warehouse, "images")).to_pylist()}
    nonzero_cells = 0
    for b, name in enumerate(names):
        target, cams = manual_grad_cam(adapter.module, pixel_values[b : b + 1])
        for stage, cam in enumerate(cams):
            total = float(cam.sum())
            assert total > 0
            expected = (cam / total).flatten().numpy()
            nonzero_cells += int((expected > 0).sum())
            block = blocks[stage]
            assert (block.grid_h, block.grid_w) == tuple(cam.shape)
            np.testing.assert_allclose(block.values[b, 0, 0].numpy(), expected, atol=1e-5, rtol=0)
            assert float(block.raw_scale[b, 0, 0]) == pytest.approx(total, rel=1e-4)
            assert int(block.target_class[b]) == target

            (row,) = [r for r in rows if r["image_id"] == ids[name] and r["layer"] == stage]
            assert row["head"] is None and row["layer_name"] == STAGES[stage]
            assert (row["grid_h"], row["grid_w"]) == tuple(cam.shape)
            np.testing.assert_allclose(row["map_values"], expected, atol=1e-5, rtol=0)
            assert row["raw_scale"] == pytest.approx(total, rel=1e-4)
            assert row["target_class"] == target
            assert row["prefix_mass"] == 0.0 and row["num_heads"] == 0 and row["num_layers"] == 4
    assert nonzero_cells > 0


def test_grad_cam_stage_grids_shrink_with_depth(tiny_warehouse):
    rows = pq.read_table(
        partition_file(tiny_warehouse, "attention_maps", model="resnet50", method="gradcam", shard="0")
    )
    grids = {r["layer"]: (r["grid_h"], r["grid_w"]) for r in rows.to_pylist()}
    assert sorted(grids) == [0, 1, 2, 3]
    # 64x64 input: stem /4, then stages /1, /2, /4, /8 of that
    assert [grids[i] for i in range(4)] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    for r in rows.to_pylist():
        values = np.asarray(r["map_values"])
        assert len(values) == r["grid_h"] * r["grid_w"]
        assert np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()
        assert values.sum() == pytest.approx(1.0, abs=1e-5) or values.sum() == 0.0
