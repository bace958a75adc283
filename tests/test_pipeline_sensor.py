"""The new-images sensor: off by default, one run per model when the folder changes, quiet otherwise."""

from __future__ import annotations

import shutil

import dagster as dg

from pipelines.definitions import defs
from pipelines.partitions import SHARDS
from pipelines.resources import ExtractionSettings
from pipelines.sensors import new_images_sensor
from ssl_attention.registry import MODELS


def _tick(settings: ExtractionSettings, cursor: str | None) -> dg.SensorResult:
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"extraction": settings})
        return new_images_sensor(context)


def test_sensor_is_off_by_default_and_targets_the_extraction_job():
    sensor = defs.resolve_sensor_def("new_images_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
    assert sensor.job_name == "extract_model"


def test_new_images_trigger_one_run_per_model(tmp_path, images_copy, sample_dir):
    folder = images_copy(2)
    settings = ExtractionSettings(images_dir=str(folder), warehouse=str(tmp_path / "wh"))
    first = _tick(settings, None)
    # one run per (model, shard): one shard unless $SSL_ATTENTION_SHARDS said otherwise when the definitions loaded
    keys = sorted(f"{model}|{shard}" for model in MODELS for shard in range(SHARDS))
    assert sorted(r.partition_key for r in first.run_requests) == keys
    assert len({r.run_key for r in first.run_requests}) == len(keys)

    unchanged = _tick(settings, first.cursor)
    assert not unchanged.run_requests and unchanged.skip_reason

    shutil.copy(sample_dir / "rocket.jpg", folder / "new.jpg")
    added = _tick(settings, first.cursor)
    assert sorted(r.partition_key for r in added.run_requests) == keys
    assert not {r.run_key for r in added.run_requests} & {r.run_key for r in first.run_requests}
    assert added.cursor != first.cursor


def test_non_image_files_do_not_trigger_runs(tmp_path, images_copy):
    folder = images_copy(1)
    settings = ExtractionSettings(images_dir=str(folder), warehouse=str(tmp_path / "wh"))
    first = _tick(settings, None)
    (folder / "notes.txt").write_text("not an image")
    assert not _tick(settings, first.cursor).run_requests


def test_sensor_keeps_the_warehouses_models_up_to_date(tmp_path, images_copy, sample_dir):
    """With clip and resnet50 extracted, new images trigger runs for those two models only."""
    from ssl_attention.warehouse.paths import partition_file

    folder = images_copy(1)
    warehouse = tmp_path / "wh"
    for slug in ("clip", "resnet50"):  # the models table row is what an extraction leaves per model
        path = partition_file(warehouse, "models", model=slug)
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
    settings = ExtractionSettings(images_dir=str(folder), warehouse=str(warehouse))
    first = _tick(settings, None)
    held = sorted(f"{model}|{shard}" for model in ("clip", "resnet50") for shard in range(SHARDS))
    assert sorted(r.partition_key for r in first.run_requests) == held
    shutil.copy(sample_dir / "rocket.jpg", folder / "new.jpg")
    assert sorted(r.partition_key for r in _tick(settings, first.cursor).run_requests) == held


def test_sensor_skips_with_the_reason_when_a_location_is_unsupported(tmp_path):
    settings = ExtractionSettings(images_dir="s3://bucket/images", warehouse=str(tmp_path / "wh"))
    result = _tick(settings, None)
    assert not result.run_requests
    reason = result.skip_reason.skip_message
    assert "s3://bucket/images" in reason and "file://" in reason
