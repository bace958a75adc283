"""Dagster as a first UI user meets it: config refused before launch, a demo job with no YAML, checks re-run
on their own, downstream assets that follow new maps, metadata that describes the partition as it is."""

import dagster as dg
import pyarrow.parquet as pq
import pytest

import pipelines.assets as assets_module
from pipelines.alignment_assets import alignment
from pipelines.assets import attention_maps, head_stats, images, warehouse_catalog
from pipelines.definitions import defs
from pipelines.jobs import check_maps_job
from pipelines.runner import ALL_ASSETS, run_extraction
from ssl_attention.validation import CHECK_NAMES
from tests.pipeline_helpers import tiny_settings


def _config(**fields: object) -> dict:
    return {"resources": {"extraction": {"config": fields}}}


def _refusal(job: dg.JobDefinition, **fields: object) -> str:
    with pytest.raises(dg.DagsterInvalidConfigError) as caught:
        dg.validate_run_config(job, _config(**fields))
    return "\n".join(error.message for error in caught.value.errors)


@pytest.mark.parametrize("job_name", ["extract_model", "demo"])
def test_the_launchpad_refuses_bad_settings_and_says_which(job_name):
    job = defs.resolve_job_def(job_name)
    assert "weights" in _refusal(job, weights="nonsense")
    assert "batch_size" in _refusal(job, batch_size=0)
    assert "device" in _refusal(job, device="tpu")
    assert "seed" in _refusal(job, seed=-1)
    valid = dg.validate_run_config(job, _config(batch_size=3, weights="random"))
    assert valid["resources"]["extraction"]["config"]["batch_size"] == 3


def test_the_demo_job_runs_offline_with_no_yaml():
    """The launchpad pre-fills each partition's run config: random weights (no hub), the default folders."""
    job = defs.resolve_job_def("demo")
    config = job.partitioned_config.get_run_config_for_partition_key("clip")
    resolved = dg.validate_run_config(job, config)["resources"]["extraction"]["config"]
    assert resolved["weights"] == "random"
    assert resolved["images_dir"] == "" and resolved["warehouse"] == ""  # data/samples, data/warehouse
    assert not resolved.get("checkpoints")
    # the extraction job keeps the production default
    production = dg.validate_run_config(defs.resolve_job_def("extract_model"), None)
    assert production["resources"]["extraction"]["config"]["weights"] == "auto"


@pytest.mark.parametrize("selection", [[images], [attention_maps]])
def test_a_missing_images_folder_is_a_readable_failure(tmp_path, tiny_checkpoints, selection):
    folder = tmp_path / "no_such_folder"
    settings = tiny_settings(folder, tmp_path / "wh", tiny_checkpoints)
    result = dg.materialize(
        ALL_ASSETS,
        selection=selection,
        partition_key="clip|0" if selection == [attention_maps] else None,
        resources={"extraction": settings},
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    text = failure.step_failure_data.user_failure_data.description
    assert str(folder) in text and "does not exist" in text and "images_dir" in text
    assert "no catalogued images" not in text


def _extract(settings, model: str, instance: dg.DagsterInstance | None = None) -> dg.ExecuteInProcessResult:
    dg.materialize(ALL_ASSETS, selection=[images], resources={"extraction": settings}, instance=instance)
    return dg.materialize(
        ALL_ASSETS,
        selection=[attention_maps],
        partition_key=f"{model}|0",
        resources={"extraction": settings},
        instance=instance,
    )


def test_a_check_re_runs_on_its_own_without_re_extracting(tmp_path, tiny_checkpoints, images_copy):
    from tests.test_validation import drop_one_head

    warehouse = tmp_path / "wh"
    settings = tiny_settings(images_copy(2), warehouse, tiny_checkpoints)
    first = _extract(settings, "clip")
    assert {e.check_name for e in first.get_asset_check_evaluations() if e.passed} == set(CHECK_NAMES)

    path = warehouse / "attention_maps" / "model=clip" / "method=cls" / "shard=0" / "data.parquet"
    pq.write_table(drop_one_head(pq.read_table(path)), path)
    job = dg.Definitions(assets=ALL_ASSETS, jobs=[check_maps_job], resources={"extraction": settings})
    # the partition as a run tag, as the Checks tab launches it (in-process execution finds no partitioned asset
    # in a checks-only selection to validate a partition_key against)
    checks_only = job.resolve_job_def("check_attention_maps").execute_in_process(
        tags={"dagster/partition": "clip|0"}, raise_on_error=False
    )
    assert not checks_only.asset_materializations_for_node("attention_maps")  # nothing re-extracted
    outcomes = {e.check_name: e.passed for e in checks_only.get_asset_check_evaluations()}
    assert set(outcomes) == set(CHECK_NAMES)
    assert outcomes["complete"] is False  # it read the file as it is now
    assert outcomes["unique_keys"] is True


def test_a_failed_extraction_does_not_mark_intact_datas_checks_failed(
    tmp_path, tiny_checkpoints, images_copy, monkeypatch
):
    """`ssl-attention run`'s runs: when an extraction fails, the checks of the maps already there keep their
    result (no check is planned in the failed run, so none resolves to 'execution failed')."""
    settings = tiny_settings(images_copy(2), tmp_path / "wh", tiny_checkpoints)
    keys = [dg.AssetCheckKey(attention_maps.key, name) for name in CHECK_NAMES]
    with dg.instance_for_test() as instance:
        assert run_extraction(settings, ["clip"], instance=instance).success

        def broken(*args: object, **kwargs: object) -> None:
            raise OSError("disk full")

        monkeypatch.setattr(assets_module, "extract_model", broken)
        outcome = run_extraction(settings, ["clip"], instance=instance)
        assert not outcome.success and "attention_maps" in (outcome.models[0].error or "")
        for key in keys:
            (latest,) = instance.event_log_storage.get_asset_check_execution_history(key, limit=1)
            assert (latest.partition, latest.status.value) == ("clip|0", "SUCCEEDED"), key.name


def _requested(result: dg.EvaluateAutomationConditionsResult) -> dict[str, set[str | None]]:
    found: dict[str, set[str | None]] = {}
    for asset_key in (head_stats.key, warehouse_catalog.key):
        partitions = result.get_requested_partitions(asset_key)
        if result.get_num_requested(asset_key):
            found[asset_key.to_user_string()] = set(partitions) if partitions else {None}
    return found


def test_downstream_assets_follow_new_maps(tmp_path, tiny_checkpoints, images_copy):
    """After attention_maps[clip] materializes, the automation requests head_stats[clip] and the catalog."""
    settings = tiny_settings(images_copy(2), tmp_path / "wh", tiny_checkpoints)
    automated = dg.Definitions(assets=ALL_ASSETS, resources={"extraction": settings})
    with dg.instance_for_test() as instance:
        before = dg.evaluate_automation_conditions(defs=automated, instance=instance)
        assert "head_stats" not in _requested(before)  # no maps yet: nothing to compute statistics of
        assert _extract(settings, "clip", instance).success
        after = dg.evaluate_automation_conditions(defs=automated, instance=instance, cursor=before.cursor)
        assert _requested(after) == {"head_stats": {"clip|0"}, "warehouse_catalog": {None}}
        # once they are built, nothing more is requested
        dg.materialize(
            ALL_ASSETS,
            selection=[head_stats],
            partition_key="clip|0",
            resources={"extraction": settings},
            instance=instance,
        )
        dg.materialize(ALL_ASSETS, selection=[warehouse_catalog], resources={"extraction": settings}, instance=instance)
        settled = dg.evaluate_automation_conditions(defs=automated, instance=instance, cursor=after.cursor)
        assert _requested(settled) == {}


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    (materialization,) = result.asset_materializations_for_node(asset)
    return materialization.metadata


def test_row_count_is_the_partitions_total_on_an_up_to_date_run(tmp_path, tiny_checkpoints, images_copy):
    warehouse = tmp_path / "wh"
    settings = tiny_settings(images_copy(2), warehouse, tiny_checkpoints)
    first = _extract(settings, "clip")
    again = dg.materialize(
        ALL_ASSETS, selection=[attention_maps], partition_key="clip|0", resources={"extraction": settings}
    )
    files = sorted((warehouse / "attention_maps" / "model=clip").glob("method=*/shard=*/data.parquet"))
    total = sum(pq.read_metadata(path).num_rows for path in files)
    assert total > 0
    for result in (first, again):
        metadata = _metadata(result, "attention_maps")
        assert metadata["dagster/row_count"].value == total
        assert metadata["dagster/table_name"].value == "attention_maps"
        assert metadata["dagster/uri"].value == (warehouse / "attention_maps" / "model=clip").resolve().as_uri()
        columns = [c.name for c in metadata["dagster/column_schema"].schema.columns]
        assert columns == pq.read_schema(files[0]).names
    assert _metadata(again, "attention_maps")["images_extracted"].value == 0  # the second run was up to date

    stats = dg.materialize(
        ALL_ASSETS, selection=[head_stats], partition_key="clip|0", resources={"extraction": settings}
    )
    stats_files = (warehouse / "head_stats" / "model=clip").glob("method=*/shard=*/data.parquet")
    assert _metadata(stats, "head_stats")["dagster/row_count"].value == sum(
        pq.read_metadata(path).num_rows for path in stats_files
    )


def _descriptions(field: dg.Field) -> list[str]:
    found = [field.description or ""]
    for child in getattr(field.config_type, "fields", {}).values():
        found += _descriptions(child)
    return found


def test_descriptions_render_in_the_ui():
    """Markdown in the UI: a partition path is a code span (so <slug> is not taken for HTML), no RST literals."""
    assert (
        "`attention_maps/model=<slug>/method=<name>/shard=<s>/data.parquet`"
        in attention_maps.descriptions_by_key[attention_maps.key]
    )
    schema = defs.resolve_job_def("extract_model").resource_defs["extraction"].config_schema.as_field()
    texts = _descriptions(schema)
    assert len(texts) > 5 and all("``" not in text for text in texts)
    for asset in (images, attention_maps, head_stats, warehouse_catalog):
        for text in asset.descriptions_by_key.values():
            assert "``" not in text
            outside_code = "".join(text.split("`")[::2])
            assert "<" not in outside_code, text


def test_the_automation_sensor_runs_by_default_and_targets_downstream():
    sensor = defs.resolve_sensor_def("downstream_follows_new_maps")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    graph = defs.resolve_asset_graph()
    downstream = {head_stats.key, alignment.key, dg.AssetKey("head_ranking"), warehouse_catalog.key}
    assert sensor.asset_selection.resolve(graph) == downstream
    assert alignment.automation_conditions_by_key[alignment.key] is not None
    assert head_stats.automation_conditions_by_key[head_stats.key] is not None
