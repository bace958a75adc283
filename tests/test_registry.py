"""The registry is the one place a method is declared: a toy method registered for one test flows to Parquet, the
checks, SQL and the dashboard's selectors with no other module touched; and the rules derived from roles."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ssl_attention import registry
from ssl_attention.extraction import catalog_images, extract_model
from ssl_attention.methods.attention import per_head_block
from ssl_attention.methods.blocks import MapBlock
from ssl_attention.methods.passes import ViTPass
from ssl_attention.models.loading import LoadRequest, load_model
from ssl_attention.query import open_warehouse
from ssl_attention.validation import check_method_partition
from ssl_attention.warehouse.paths import partition_file

TOY = "last_patch"


def last_patch_maps(forward: ViTPass) -> list[MapBlock]:
    """The last patch token's query row, A[l, h][T-1, P]: a softmax row, so patch + prefix mass is 1."""
    layers = list(range(forward.num_layers))
    block = per_head_block([a[:, :, -1, :] for a in forward.attentions], forward.layout, layers)
    block.layer_names = [forward.layer_names[i] for i in layers]
    return [block]


TOY_SPEC = registry.MethodSpec(
    name=TOY,
    label="Last-patch attention",
    role="cls",
    family="vit",
    compute=last_patch_maps,
    per_head=True,
    mass_sums_to_one=True,
    cumulative=False,
    value_label="attention",
    glossary="Attention of the last patch query over the patch tokens: A[l, h][T-1, P].",
)


def test_a_registered_method_flows_to_parquet_checks_sql_and_the_dashboard(
    tiny_checkpoints: dict[str, Path], images_copy, tmp_path: Path
) -> None:
    images = images_copy(2)
    warehouse = tmp_path / "wh"
    with registry.registered(TOY_SPEC, models=["dinov2"]):
        adapter = load_model("dinov2", LoadRequest(checkpoint=tiny_checkpoints["dinov2"], device="cpu"))
        records = catalog_images(images, warehouse).catalog.records
        report = extract_model(adapter, records, warehouse)
        assert report.images_extracted == 2

        # Parquet: the stored rows equal the model's own attention rows, recomputed by a plain forward pass
        path = partition_file(warehouse, "attention_maps", model="dinov2", method=TOY, shard="0")
        table = pq.read_table(path).to_pylist()
        heads, layers = adapter.num_heads, adapter.num_layers
        assert len(table) == 2 * layers * (heads + 1)
        record = next(r for r in records if r.image_id == table[0]["image_id"])
        with Image.open(images / record.file_name) as image:
            pixels = adapter.pixel_values([image.convert("RGB")])
        with torch.inference_mode():
            attentions = adapter.module(pixel_values=pixels, output_attentions=True).attentions
        prefix = 1 + adapter.num_registers
        for row in (r for r in table if r["image_id"] == record.image_id):
            expected = attentions[row["layer"]][0, :, -1, prefix:].numpy()  # (H, N)
            expected = expected.mean(axis=0) if row["head"] is None else expected[row["head"]]
            np.testing.assert_allclose(row["map_values"], expected, atol=1e-6)

        # the checks read the spec's rules (per head, mass sums to one) and pass
        outcomes = check_method_partition(warehouse, "dinov2", TOY)
        assert all(o.passed for o in outcomes), [(o.name, o.examples) for o in outcomes if not o.passed]

        # SQL: the maps and the methods view
        wh = open_warehouse(warehouse)
        counted = wh.sql("SELECT count(*) AS n FROM attention_maps WHERE method = $m", {"m": TOY})
        assert counted.to_pylist() == [{"n": len(table)}]
        listed = wh.sql("SELECT label, per_head FROM methods WHERE method = $m", {"m": TOY}).to_pylist()
        assert listed == [{"label": "Last-patch attention", "per_head": True}]

        # the dashboard's selectors: the method is offered with its label, and its heads
        from dashboards.app import AttentionExplorer, create_app

        app = create_app(warehouse)
        assert isinstance(app, AttentionExplorer)
        session = app.session
        session.apply_query({"model": "dinov2", "method": TOY})
        assert session.method == TOY
        assert session.param.method.names["Last-patch attention"] == TOY
        assert list(session.param.head.names) == ["All heads (fused)", *(f"Head {h}" for h in range(heads))]
    assert TOY not in registry.METHODS and TOY not in registry.MODELS["dinov2"].methods  # restored


def test_an_unknown_method_raises_naming_the_valid_ones() -> None:
    with pytest.raises(registry.UnknownNameError, match="valid methods: cls, mean"):
        registry.get_method("attention")
    clash = dataclasses.replace(TOY_SPEC, name="cls")
    with pytest.raises(ValueError, match="registered already"), registry.registered(clash, models=[]):
        pass


def test_defaults_and_counterparts_follow_the_roles() -> None:
    # the most comparable map first: CLS-like, then saliency
    assert registry.default_method(["mean", "probe", "rollout"]) == "probe"
    assert registry.default_method(["gradcam"]) == "gradcam"
    assert registry.default_method(["rollout", "mean"]) == "mean"
    # same method, then same role, then the role's fallbacks
    assert registry.counterpart("cls", ["mean", "probe", "rollout"]) == "probe"
    assert registry.counterpart("rollout", ["gradcam"]) == "gradcam"
    assert registry.counterpart("gradcam", ["cls", "mean", "rollout"]) == "cls"
    assert registry.counterpart("gradcam", ["mean", "rollout"]) == "rollout"
