"""The annotations and alignment Dagster assets with tiny checkpoints: they materialize, their checks run
and pass on good data and fail on bad data; the sensor reacts to a changed annotation file; the CLI flag."""

from __future__ import annotations

import json
import shutil

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipelines.alignment_assets import alignment, annotations, head_ranking
from pipelines.assets import attention_maps, head_stats, images, warehouse_catalog
from pipelines.definitions import defs
from pipelines.sensors import new_images_sensor
from ssl_attention.alignment.checks import ALIGNMENT_CHECKS, ANNOTATION_CHECKS, check_annotations
from ssl_attention.cli import main
from ssl_attention.settings import Settings
from ssl_attention.warehouse.paths import partition_file
from tests.pipeline_helpers import checkpoint_args, tiny_settings
from tests.sql_helpers import SAMPLE_ANNOTATIONS

ASSETS = [images, attention_maps, head_stats, warehouse_catalog, annotations, alignment, head_ranking]
MODEL = "clip"


def test_both_assets_and_their_checks_are_defined():
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert {"annotations", "alignment"} <= keys
    assert {s.name for s in annotations.check_specs} == set(ANNOTATION_CHECKS)
    assert {s.name for s in alignment.check_specs} == set(ALIGNMENT_CHECKS)
    assert {key.to_user_string() for key in alignment.asset_deps[dg.AssetKey("alignment")]} == {
        "attention_maps",
        "annotations",
    }
    assert alignment.partitions_def == attention_maps.partitions_def  # (model, shard)
    (dep,) = head_ranking.specs_by_key[head_ranking.key].deps  # per model, over every shard of its alignment
    assert dep.asset_key == alignment.key and isinstance(
        dep.partition_mapping, dg.MultiToSingleDimensionPartitionMapping
    )


@pytest.fixture(scope="module")
def materialized(tmp_path_factory, tiny_checkpoints, sample_dir):
    warehouse = tmp_path_factory.mktemp("assets") / "wh"
    settings = tiny_settings(sample_dir, warehouse, tiny_checkpoints, annotations=str(SAMPLE_ANNOTATIONS))
    resources = {"extraction": settings}
    first = dg.materialize(ASSETS, selection=[images, annotations], resources=resources)
    second = dg.materialize(
        ASSETS, selection=[attention_maps, alignment], partition_key=f"{MODEL}|0", resources=resources
    )
    ranked = dg.materialize(ASSETS, selection=[head_ranking], partition_key=MODEL, resources=resources)
    assert ranked.success
    second.ranked = ranked  # the ranking's metadata, read by the first test
    return warehouse, settings, first, second


def _settings(settings, **changes):
    """The fixture's settings with some fields changed (a new resource: Dagster reads its config)."""
    fields = {**settings.model_dump(), **changes}
    return type(settings)(**fields)


def _checks(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def test_the_assets_materialize_and_their_checks_pass(materialized):
    warehouse, _, first, second = materialized
    assert first.success and second.success
    assert _checks(first) == dict.fromkeys(ANNOTATION_CHECKS, True)
    assert all(_checks(second)[name] for name in ALIGNMENT_CHECKS)
    regions = pq.read_table(partition_file(warehouse, "annotations")).num_rows
    sample = json.loads(SAMPLE_ANNOTATIONS.read_text())
    assert regions == len(sample["annotations"])
    (event,) = [e for e in second.get_asset_materialization_events() if e.asset_key == dg.AssetKey("alignment")]
    metadata = event.materialization.metadata
    stored_maps = sum(
        pq.read_table(partition_file(warehouse, "attention_maps", model=MODEL, method=m, shard="0")).num_rows
        for m in ("cls", "mean", "rollout")
    )
    assert metadata["maps_scored_this_run"].value == stored_maps  # every map of every image is annotated
    (event,) = [e for e in second.ranked.get_asset_materialization_events() if e.asset_key == head_ranking.key]
    ranking = event.materialization.metadata
    best = ranking["best_heads"].value
    assert "| all | head " in best and "fused" in best and "centre_gaussian" in best
    assert "data:image/png;base64," in ranking["best_head_preview"].value
    assert ranking["dagster/row_count"].value == pq.read_table(
        partition_file(warehouse, "head_ranking", model=MODEL, method="cls")
    ).num_rows + sum(
        pq.read_table(partition_file(warehouse, "head_ranking", model=MODEL, method=m)).num_rows
        for m in ("mean", "rollout")
    )


def test_a_failing_alignment_check_fails(materialized, tmp_path):
    warehouse, settings, _, _ = materialized
    copy = tmp_path / "wh"
    shutil.copytree(warehouse, copy)
    path = partition_file(copy, "alignment", model=MODEL, method="cls", shard="0")
    table = pq.read_table(path)
    broken = pc.if_else(pc.equal(pa.array(range(table.num_rows)), 0), 2.0, table["iou_50"])
    pq.write_table(table.set_column(table.schema.get_field_index("iou_50"), "iou_50", broken), path)
    resources = {"extraction": _settings(settings, warehouse=str(copy))}
    result = dg.materialize(ASSETS, selection=[alignment], partition_key=f"{MODEL}|0", resources=resources)
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not checks["metric_ranges"].passed  # the partition was up to date, so the bad value stayed
    assert "iou_50 = 2.0" in checks["metric_ranges"].metadata["examples"].value
    assert checks["one_row_per_map_feature"].passed


def test_a_region_outside_its_image_fails_the_coordinates_check(materialized, tmp_path):
    """The asset rewrites the table from the file (which cannot hold such a region), so the check runs on a
    table damaged by hand."""
    warehouse, _, _, _ = materialized
    copy = tmp_path / "wh"
    shutil.copytree(warehouse, copy)
    path = partition_file(copy, "annotations")
    table = pq.read_table(path)
    x1 = pc.if_else(pc.equal(pa.array(range(table.num_rows)), 0), 1e6, table["x1"])
    pq.write_table(table.set_column(table.schema.get_field_index("x1"), "x1", x1), path)
    outcomes = {o.name: o for o in check_annotations(copy)}
    assert not outcomes["coordinates_valid"].passed and outcomes["regions_matched"].passed
    assert "outside" in outcomes["coordinates_valid"].examples[0]


def test_unmatched_images_warn_and_the_run_goes_on(materialized, tmp_path):
    warehouse, settings, _, _ = materialized
    doc = json.loads(SAMPLE_ANNOTATIONS.read_text())
    doc["images"].append({"id": 99, "file_name": "nowhere.jpg", "width": 10, "height": 10})
    doc["annotations"].append({"id": 99, "image_id": 99, "category_id": 1, "bbox": [1, 1, 2, 2]})
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(doc))
    copy = tmp_path / "wh"
    shutil.copytree(warehouse, copy)
    resources = {"extraction": _settings(settings, warehouse=str(copy), annotations=str(path))}
    result = dg.materialize(ASSETS, selection=[annotations], resources=resources)
    assert result.success
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not checks["regions_matched"].passed and checks["regions_matched"].severity == dg.AssetCheckSeverity.WARN
    assert "nowhere.jpg" in checks["regions_matched"].metadata["examples"].value
    assert checks["coordinates_valid"].passed


def test_a_file_in_neither_format_fails_the_asset_with_both_formats_named(materialized, tmp_path):
    warehouse, settings, _, _ = materialized
    path = tmp_path / "labels.json"
    path.write_text("[1, 2, 3]")
    resources = {"extraction": _settings(settings, annotations=str(path))}
    result = dg.materialize(ASSETS, selection=[annotations], resources=resources, raise_on_error=False)
    assert not result.success
    (failure,) = result.get_step_failure_events()
    description = failure.step_failure_data.user_failure_data.description
    assert "COCO" in description and "WikiChurches" in description
    assert partition_file(warehouse, "annotations").is_file()  # the earlier table is kept


def _tick(settings, cursor):
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"extraction": settings})
        return new_images_sensor(context)


def test_the_sensor_reacts_to_a_changed_annotation_file(tmp_path, images_copy):
    folder = images_copy(1)
    labels = tmp_path / "annotations.json"
    shutil.copy(SAMPLE_ANNOTATIONS, labels)
    settings = tiny_settings(folder, tmp_path / "wh", {}, annotations=str(labels))
    first = _tick(settings, None)
    assert first.run_requests
    assert not _tick(settings, first.cursor).run_requests  # nothing changed
    doc = json.loads(labels.read_text())
    doc["annotations"][0]["bbox"] = [1, 1, 20, 20]
    labels.write_text(json.dumps(doc))
    changed = _tick(settings, first.cursor)
    assert sorted(r.partition_key for r in changed.run_requests) == sorted(r.partition_key for r in first.run_requests)
    assert not {r.run_key for r in changed.run_requests} & {r.run_key for r in first.run_requests}


def test_the_annotations_setting_is_a_cli_flag_and_checked():
    assert "annotations" in Settings.model_fields
    with pytest.raises(ValueError, match=r"annotation file .* does not exist"):
        Settings(annotations="/nowhere/labels.json")


def test_run_with_annotations_computes_alignment(tmp_path, tiny_checkpoints, images_copy, capsys):
    warehouse = tmp_path / "wh"
    argv = ["run", "--images", str(images_copy(2)), "--models", "clip,resnet50", "--weights", "pretrained"]
    argv += ["--warehouse", str(warehouse), "--device", "cpu", "--annotations", str(SAMPLE_ANNOTATIONS)]
    for item in checkpoint_args({k: v for k, v in tiny_checkpoints.items() if k in ("clip", "resnet50")}):
        argv += ["--checkpoint", item]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "annotations: " in out and "unusable entries" in out
    assert out.count("alignment: ") == 2
    for method in ("cls", "mean", "rollout"):
        assert partition_file(warehouse, "alignment", model="clip", method=method, shard="0").is_file()
    assert partition_file(warehouse, "head_ranking", model="resnet50", method="gradcam").is_file()
    from ssl_attention.query.catalog import open_catalog

    con = open_catalog(warehouse)
    assert con.execute("SELECT count(*) FROM head_ranking").fetchone()[0] > 0  # the catalog saw alignment
    con.close()
    assert main(argv) == 0
    assert "alignment: 0 maps scored" in capsys.readouterr().out


def test_bad_annotations_flag_is_a_clear_error(capsys):
    assert main(["run", "--annotations", "/nowhere/labels.json"]) == 2
    err = capsys.readouterr().err
    assert "--annotations" in err and "does not exist" in err
