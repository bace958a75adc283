"""The Dagster assets materialized with tiny checkpoints: Parquet contents, metadata, asset checks."""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import duckdb
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipelines.assets import (
    attention_maps,
    attention_maps_checks,
    extraction_pool,
    head_stats,
    images,
    warehouse_catalog,
)
from pipelines.definitions import defs
from pipelines.partitions import SHARDS
from ssl_attention.registry import METHODS, MODELS
from ssl_attention.settings import POOL_ENV
from ssl_attention.validation import CHECK_NAMES
from tests.pipeline_helpers import read_partition, tiny_settings
from tests.test_validation import CORRUPTIONS

ALL_ASSETS = [images, attention_maps, attention_maps_checks, head_stats, warehouse_catalog]
REPO = Path(__file__).resolve().parents[1]
TINY_LAYERS, TINY_HEADS = 2, 4


def test_definitions_are_loadable_and_complete():
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert keys == {
        "images",
        "attention_maps",
        "head_stats",
        "warehouse_catalog",
        "annotations",
        "alignment",
        "head_ranking",
    }
    # (model, shard): one shard unless $SSL_ATTENTION_SHARDS says otherwise when the definitions load
    shards = [str(s) for s in range(SHARDS)]
    expected = {f"{model}|{shard}" for model in MODELS for shard in shards}
    assert set(attention_maps.partitions_def.get_partition_keys()) == expected
    assert set(head_stats.partitions_def.get_partition_keys()) == expected
    ranking = graph.get(dg.AssetKey("head_ranking"))
    assert ranking.partitions_def.get_partition_keys() == list(MODELS)  # over every shard of its model
    specs = list(attention_maps_checks.check_specs)
    assert {spec.name for spec in specs} == set(CHECK_NAMES)
    assert {spec.asset_key for spec in specs} == {attention_maps.key}
    assert {spec.partitions_def for spec in specs} == {attention_maps.partitions_def}
    assert all(spec.blocking for spec in specs)
    if POOL_ENV not in os.environ:  # the pool chosen at import: gpu only where CUDA is
        assert attention_maps.op.pool == ("gpu" if torch.cuda.is_available() else None)


def test_the_extraction_pool_follows_the_device(monkeypatch):
    monkeypatch.delenv(POOL_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert extraction_pool() == "gpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert extraction_pool() is None
    monkeypatch.setenv(POOL_ENV, "none")
    assert extraction_pool() is None
    monkeypatch.setenv(POOL_ENV, "accelerators")
    assert extraction_pool() == "accelerators"


def test_dagster_cli_validates_the_workspace():
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def materialized(tmp_path_factory, tiny_checkpoints, sample_dir):
    """images, then three model partitions (a CLS ViT, SigLIP, the CNN), then the catalog."""
    warehouse = tmp_path_factory.mktemp("pipeline") / "warehouse"
    settings = tiny_settings(sample_dir, warehouse, tiny_checkpoints)
    resources = {"extraction": settings}
    results = {"images": dg.materialize(ALL_ASSETS, selection=[images], resources=resources)}
    for model in ("dinov2", "siglip", "resnet50"):
        results[model] = dg.materialize(
            ALL_ASSETS, selection=[attention_maps, head_stats], partition_key=f"{model}|0", resources=resources
        )
    results["catalog"] = dg.materialize(ALL_ASSETS, selection=[warehouse_catalog], resources=resources)
    return warehouse, results


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    (materialization,) = result.asset_materializations_for_node(asset)
    return {key: value.value for key, value in materialization.metadata.items()}


def expected_rows(model: str, method: str, images: int) -> int:
    if model == "resnet50":
        return images * 4  # four stages, fused only
    if method == "probe":
        return images * (TINY_HEADS + 1)  # one pooling head "layer"
    return images * TINY_LAYERS * ((TINY_HEADS + 1) if METHODS[method].per_head else 1)


def test_every_run_succeeded(materialized):
    _, results = materialized
    assert all(result.success for result in results.values())


def test_images_asset_catalogues_the_folder(materialized, sample_dir):
    warehouse, results = materialized
    metadata = _metadata(results["images"], "images")
    files = sorted(p.name for p in sample_dir.iterdir() if p.suffix == ".jpg")
    table = pq.read_table(warehouse / "images" / "data.parquet")
    assert sorted(table["file_name"].to_pylist()) == files
    assert metadata["images_found"] == len(files) == metadata["dagster/row_count"]
    assert metadata["images_skipped"] == 0


@pytest.mark.parametrize("model", ["dinov2", "siglip", "resnet50"])
def test_attention_maps_partitions_and_metadata(materialized, model, sample_dir, tiny_checkpoints):
    warehouse, results = materialized
    n_images = len(list(sample_dir.glob("*.jpg")))
    metadata = _metadata(results[model], "attention_maps")
    total = 0
    for method in MODELS[model].methods:
        rows = read_partition(warehouse, model, method)
        assert len(rows) == expected_rows(model, method, n_images), method
        assert {r["weights_source"] for r in rows} == {str(tiny_checkpoints[model])}
        assert {r["weights_mode"] for r in rows} == {"local"}
        total += len(rows)
    assert metadata["rows_written"] == total == metadata["dagster/row_count"]
    assert metadata["images_extracted"] == n_images
    assert metadata["images_skipped"] == 0
    assert metadata["random_weights"] is False
    assert str(tiny_checkpoints[model]) in metadata["weights"]
    written = [
        *warehouse.glob(f"attention_maps/model={model}/*/shard=*/data.parquet"),
        *warehouse.glob(f"inputs/model={model}/shard=0/data.parquet"),
    ]
    assert metadata["bytes_written"] == sum(p.stat().st_size for p in written)
    # the preview is a PNG embedded in markdown: fused first, then one tile per head
    match = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", metadata["preview"])
    assert match, metadata["preview"][:200]
    picture = Image.open(io.BytesIO(base64.b64decode(match.group(1))))
    assert picture.format == "PNG"
    tiles = 1 + (TINY_HEADS if MODELS[model].per_head_methods else 0)
    assert picture.width == 96 * min(tiles, 7)


@pytest.mark.parametrize("model", ["dinov2", "siglip", "resnet50"])
def test_asset_checks_ran_and_passed(materialized, model):
    _, results = materialized
    evaluations = results[model].get_asset_check_evaluations()
    assert {e.check_name for e in evaluations} == set(CHECK_NAMES)
    assert all(e.passed for e in evaluations), [(e.check_name, e.metadata) for e in evaluations if not e.passed]
    assert {e.metadata["model"].value for e in evaluations} == {model}


def test_head_stats_and_catalog(materialized):
    warehouse, results = materialized
    for model in ("dinov2", "siglip", "resnet50"):
        stats_rows = _metadata(results[model], "head_stats")["dagster/row_count"]
        maps_rows = sum(len(read_partition(warehouse, model, m)) for m in MODELS[model].methods)
        assert stats_rows == maps_rows
    catalog = Path(_metadata(results["catalog"], "warehouse_catalog")["catalog"])
    with duckdb.connect(str(catalog), read_only=True, config={"file_search_path": str(catalog.parent)}) as con:
        count = con.execute("SELECT count(*) FROM attention_maps WHERE model = 'dinov2'").fetchone()[0]
        assert count == sum(len(read_partition(warehouse, "dinov2", m)) for m in MODELS["dinov2"].methods)


def _corrupt_after_extraction(monkeypatch, model: str, method: str, corrupt) -> None:
    """Make the asset's extraction rewrite one of its partitions with ``corrupt`` before the checks run."""
    import pipelines.assets as assets_module

    real = assets_module.extract_model

    def corrupting(adapter, records, warehouse, **kwargs):
        report = real(adapter, records, warehouse, **kwargs)
        if adapter.spec.slug == model:
            path = warehouse / "attention_maps" / f"model={model}" / f"method={method}" / "shard=0" / "data.parquet"
            pq.write_table(corrupt(pq.read_table(path)), path)
        return report

    monkeypatch.setattr(assets_module, "extract_model", corrupting)


@pytest.mark.parametrize(
    ("check", "corrupt"),
    [(name, fn) for name, fns in CORRUPTIONS.items() for fn in fns],
    ids=lambda x: getattr(x, "__name__", x),
)
def test_failing_data_fails_its_check_in_the_ui(tmp_path, tiny_checkpoints, sample_dir, monkeypatch, check, corrupt):
    """Each check, run by Dagster after a materialization, fails on data broken in its way (and says where)."""
    _corrupt_after_extraction(monkeypatch, "clip", "cls", corrupt)
    settings = tiny_settings(sample_dir, tmp_path / "wh", tiny_checkpoints)
    result = dg.materialize(
        ALL_ASSETS,
        selection=[images, attention_maps, head_stats],
        partition_key="clip|0",
        resources={"extraction": settings},
        raise_on_error=False,
    )
    assert not result.success  # the checks are blocking: the run fails ...
    assert result.asset_materializations_for_node("attention_maps")  # ... after the maps were written
    assert not result.asset_materializations_for_node("head_stats")  # ... and no statistics of bad maps
    outcomes = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(outcomes) == set(CHECK_NAMES)
    assert not outcomes[check].passed
    assert outcomes[check].metadata["failures"].value > 0
    assert "cls" in outcomes[check].metadata["examples"].value
    assert outcomes[check].metadata["model"].value == "clip"


def test_one_models_failed_check_is_not_hidden_by_another_models_pass(
    tmp_path, tiny_checkpoints, sample_dir, monkeypatch
):
    """Checks are partitioned by model: clip's failure stays recorded for clip after resnet50 passes."""
    from tests.test_validation import drop_one_head

    settings = tiny_settings(sample_dir, tmp_path / "wh", tiny_checkpoints)
    key = dg.AssetCheckKey(dg.AssetKey("attention_maps"), "complete")
    with dg.instance_for_test() as instance:
        _corrupt_after_extraction(monkeypatch, "clip", "cls", drop_one_head)
        for model in ("clip", "resnet50"):
            selection = [images, attention_maps] if model == "clip" else [attention_maps]
            result = dg.materialize(
                ALL_ASSETS,
                selection=selection,
                partition_key=f"{model}|0",
                resources={"extraction": settings},
                instance=instance,
                raise_on_error=False,
            )
            assert result.success == (model != "clip")  # clip's blocking check fails its run
        history = instance.event_log_storage.get_asset_check_execution_history(key, limit=10)
        latest: dict[str, str] = {}
        for record in history:  # newest first
            latest.setdefault(record.partition, record.status.value)
        assert latest == {"clip|0": "FAILED", "resnet50|0": "SUCCEEDED"}


def test_the_shipped_dagster_instance_config_loads(tmp_path):
    """dagster_home/dagster.yaml (used by `make demo` and `make ui`) is a valid instance config with the
    gpu pool limited to one step."""
    import shutil

    shutil.copy(REPO / "dagster_home" / "dagster.yaml", tmp_path / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 6
