"""Headless runs of the Dagster definitions: the same assets, in-process (what `ssl-attention run` executes).

Dagster code, so it lives with the definitions: it materializes the assets, reads their events and checks,
and manages the instance (reaping runs of killed processes). ``ssl_attention/cli/run.py`` builds the
resource from the validated settings and prints the outcome.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import dagster as dg

from pipelines.alignment_assets import annotations, build_alignment, head_ranking
from pipelines.assets import build_shard_assets, images, warehouse_catalog
from pipelines.partitions import SHARDS, partition_key
from pipelines.resources import ExtractionSettings
from ssl_attention.processes import pid_alive
from ssl_attention.warehouse.paths import partition_file
from ssl_attention.warehouse.shards import LayoutError, check_layout, shard_names


@functools.cache
def assets_for(shards: int) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    """Every asset (and check) of the extraction, the per-image ones partitioned for ``shards`` image shards."""
    per_shard = build_shard_assets(shards)
    return [
        images,
        per_shard.attention_maps,
        per_shard.attention_maps_checks,
        per_shard.head_stats,
        warehouse_catalog,
        annotations,
        build_alignment(shards),
        head_ranking,
    ]


ALL_ASSETS = assets_for(SHARDS)
# The CLI prints its own summary; Dagster's console logger would add stack traces for failed steps.
QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
MAPS_ONLY = dg.AssetSelection.assets("attention_maps").without_checks()
CHECKS_THEN_STATS = dg.AssetSelection.checks_for_assets("attention_maps") | dg.AssetSelection.assets("head_stats")
# summed over a model's shards when the CLI reports the model (the rest: the last shard's value)
ADDITIVE = (
    "rows_written",
    "rows_extracted_this_run",
    "bytes_written",
    "images_extracted",
    "images_up_to_date",
    "images_skipped",
    "seconds",
    "dagster/row_count",
    "maps_scored_this_run",
)
PID_TAG, HOST_TAG = "ssl_attention/pid", "ssl_attention/host"
UNFINISHED = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


@dataclass
class ModelOutcome:
    model: str
    success: bool
    error: str | None = None
    metadata: dict[str, object] = field(default_factory=dict)
    checks_failed: list[str] = field(default_factory=list)
    alignment: dict[str, object] = field(default_factory=dict)  # metadata of the alignment asset, when it ran


@dataclass
class RunOutcome:
    images: dict[str, object]  # metadata of the images asset
    models: list[ModelOutcome]
    images_error: str | None = None
    duckdb_catalog_error: str | None = None
    annotations: dict[str, object] = field(default_factory=dict)  # metadata of the annotations asset, when set
    annotations_error: str | None = None
    annotations_warnings: list[str] = field(default_factory=list)  # checks that warn (bad entries were skipped)

    @property
    def success(self) -> bool:
        return (
            self.images_error is None
            and self.duckdb_catalog_error is None
            and self.annotations_error is None
            and all(m.success and not m.checks_failed for m in self.models)
        )


def instance_for_cli() -> dg.DagsterInstance:
    """The persistent instance when $DAGSTER_HOME is set (runs then show in `dagster dev`), else ephemeral."""
    return dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()


def reap_dead_cli_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark runs of `ssl-attention run` whose process died (SIGKILL, power loss) as failed and free the
    concurrency-pool slots they held; otherwise a dead run keeps the `gpu` slot and the next run waits forever.
    Only runs started on this host by a process that no longer exists are touched."""
    host = socket.gethostname()
    reaped = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=UNFINISHED, tags={HOST_TAG: host})):
        pid = int(run.tags.get(PID_TAG, "0") or 0)
        if pid and pid != os.getpid() and not pid_alive(pid):
            instance.report_run_failed(run, f"the process running it (pid {pid}) is gone")
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
            reaped.append(run.run_id)
    return reaped


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, object]:
    events = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(asset)]
    if not events:
        return {}
    return {k: v.value for k, v in events[-1].materialization.metadata.items()}


def _merged(parts: list[dict[str, object]]) -> dict[str, object]:
    """The metadata of a model's shards as one: ``ADDITIVE`` values summed, the others the last shard's."""
    merged: dict[str, object] = {}
    for part in parts:
        for key, value in part.items():
            if key in ADDITIVE and isinstance(value, int | float) and isinstance(merged.get(key, 0), int | float):
                merged[key] = merged.get(key, 0) + value  # type: ignore[operator]
            else:
                merged[key] = value
    return merged


def _failure(result: dg.ExecuteInProcessResult) -> str | None:
    """The user-facing reason a run failed: a dg.Failure's description, else the error's last line."""
    if result.success:
        return None
    for event in result.get_step_failure_events():
        data = event.step_failure_data
        if data.user_failure_data is not None and data.user_failure_data.description:
            return data.user_failure_data.description
        if data.error is not None and data.error.message.strip():
            return data.error.message.strip().splitlines()[-1]
    return "run failed"


def run_extraction(
    settings: ExtractionSettings,
    models: list[str],
    instance: dg.DagsterInstance | None = None,
    quiet: bool = True,
    on_model_done: Callable[[ModelOutcome], None] | None = None,
) -> RunOutcome:
    """Catalog, then the annotations (when set), then each model's image shards with their alignment (a
    failing model does not stop the others) and the model's head ranking, then the DuckDB catalog."""
    instance = instance or instance_for_cli()
    if instance.is_persistent:
        reap_dead_cli_runs(instance)
    shards = settings.shard_count()
    try:  # before anything is written: a pre-shard warehouse, or another shard count, is refused
        check_layout(settings.warehouse_path(), shards)
    except LayoutError as exc:
        return RunOutcome(images={}, models=[], images_error=str(exc))
    assets = assets_for(shards)

    def materialize(selection: dg.AssetSelection, partition_key: str | None = None) -> dg.ExecuteInProcessResult:
        return dg.materialize(
            assets,
            selection=selection,
            partition_key=partition_key,
            resources={"extraction": settings},
            instance=instance,
            run_config=QUIET if quiet else None,
            raise_on_error=False,
            tags={"trigger": "ssl-attention run", PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()},
        )

    catalog = materialize(dg.AssetSelection.assets(images))
    if not catalog.success:
        return RunOutcome(images={}, models=[], images_error=_failure(catalog))
    found = _metadata(catalog, "images")
    if not found.get("images_found"):
        folder = settings.images_path()
        skipped = found.get("images_skipped", 0)
        return RunOutcome(images=found, models=[], images_error=f"no usable images in {folder} ({skipped} skipped)")
    annotated: dict[str, object] = {}
    annotations_error, annotations_warnings = None, []
    after_maps, ranked = CHECKS_THEN_STATS, False
    if settings.annotations.strip():  # the annotation file once, then alignment with each model
        labels = materialize(dg.AssetSelection.assets(annotations))
        annotations_error = _failure(labels)
        annotated = _metadata(labels, "annotations")
        annotations_warnings = [e.check_name for e in labels.get_asset_check_evaluations() if not e.passed]
    # alignment follows each model's maps whenever there are annotations (given now or read by an earlier run)
    if annotations_error is None and partition_file(settings.warehouse_path(), "annotations").is_file():
        after_maps, ranked = CHECKS_THEN_STATS | dg.AssetSelection.assets("alignment"), True
    outcomes = []
    for model in models:
        parts = []
        for shard in shard_names(shards):
            key = partition_key(model, shard)
            # two runs: a failed extraction then plans no checks (Dagster marks the checks planned in a failed run
            # as failed, though the data they read is intact); the blocking checks still run before the statistics
            extracted = materialize(MAPS_ONLY, partition_key=key)
            checked = materialize(after_maps, partition_key=key) if extracted.success else None
            where = "" if shards == 1 else f" (shard {shard})"
            parts.append(
                ModelOutcome(
                    model=model,
                    success=extracted.success and checked is not None and checked.success,
                    error=_failure(extracted) if checked is None else _failure(checked),
                    metadata=_metadata(extracted, "attention_maps"),
                    checks_failed=[e.check_name + where for e in checked.get_asset_check_evaluations() if not e.passed]
                    if checked is not None
                    else [],
                    alignment=_metadata(checked, "alignment") if checked is not None else {},
                )
            )
        outcome = ModelOutcome(
            model=model,
            success=all(p.success for p in parts),
            error=next((p.error for p in parts if p.error), None),
            metadata=_merged([p.metadata for p in parts]),
            checks_failed=[name for p in parts for name in p.checks_failed],
            alignment=_merged([p.alignment for p in parts]),
        )
        if ranked and outcome.success:  # the ranking aggregates every shard's alignment
            ranking = materialize(dg.AssetSelection.assets("head_ranking"), partition_key=model)
            outcome.success, outcome.error = ranking.success, _failure(ranking)
        outcomes.append(outcome)
        if on_model_done is not None:
            on_model_done(outcome)
    final = materialize(dg.AssetSelection.assets(warehouse_catalog))
    return RunOutcome(
        images=_metadata(catalog, "images"),
        models=outcomes,
        duckdb_catalog_error=_failure(final),
        annotations=annotated,
        annotations_error=annotations_error,
        annotations_warnings=annotations_warnings,
    )
