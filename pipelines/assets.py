"""The extraction as Dagster assets: images -> attention_maps (per model and image shard) -> head_stats ->
warehouse_catalog."""

import functools
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import dagster as dg
import torch
from tqdm import tqdm

from pipelines.metadata import check_result, extraction_metadata, issues_markdown, table_metadata
from pipelines.partitions import SHARDS, model_and_shard, model_shard_partitions
from pipelines.resources import ExtractionSettings
from ssl_attention.extraction import WeightsDowngradeError, catalog_images, extract_model, read_catalog_records
from ssl_attention.models.loading import load_model
from ssl_attention.models.weights import CheckpointError, WeightsUnavailableError
from ssl_attention.settings import pool_override
from ssl_attention.validation import CHECK_NAMES, check_model, merge_outcomes
from ssl_attention.warehouse.paths import WarehouseLocationError
from ssl_attention.warehouse.shards import LayoutError, ensure_shards, shard_of

GPU_POOL = "gpu"  # one step at a time may hold the accelerator (dagster_home/dagster.yaml sets the limit)


def extraction_pool() -> str | None:
    """The concurrency pool of extraction steps: `gpu` where CUDA is available, so one step at a time holds
    the accelerator; none on a CPU-only machine, so partitions extract in parallel. $SSL_ATTENTION_POOL
    overrides it (a pool name, or `none`)."""
    override = pool_override()
    if override is not None:
        return override or None
    return GPU_POOL if torch.cuda.is_available() else None


def _locations(extraction: ExtractionSettings) -> tuple[Path, Path]:
    """(images folder, warehouse root), or a step failure naming the bad location and what is valid."""
    try:
        return extraction.images_path(), extraction.warehouse_path()
    except WarehouseLocationError as exc:
        raise dg.Failure(description=str(exc)) from None


def _images_folder(extraction: ExtractionSettings) -> tuple[Path, Path]:
    """(images folder, warehouse root), or a step failure saying that the folder does not exist and how to fix it."""
    folder, warehouse = _locations(extraction)
    if not folder.is_dir():
        raise dg.Failure(
            description=f"images folder {folder} does not exist: create it, or set `images_dir` in the launchpad "
            f"(resources: extraction: config: images_dir) or $SSL_ATTENTION_IMAGES to an existing folder"
        )
    return folder, warehouse


def _with_model(model: str, exc: Exception) -> str:
    """The error message, prefixed with the model unless it already names it first."""
    text = str(exc)
    return text if text.startswith(model) else f"{model}: {text}"


@dg.asset(
    kinds={"python", "parquet"},
    group_name="extraction",
    description="Catalog of the images folder (content hash, file name, size, thumbnail) and the errors "
    "table of files that cannot be used.",
)
def images(context: dg.AssetExecutionContext, extraction: ExtractionSettings) -> dg.MaterializeResult:
    folder, warehouse = _images_folder(extraction)
    report = catalog_images(folder, warehouse, max_pixels=extraction.max_pixels)
    for issue in report.catalog.issues:
        context.log.warning(f"skipped {issue.file_name}: {issue.reason}")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": dg.MetadataValue.int(report.rows_total),
            "images_found": dg.MetadataValue.int(len(report.catalog.records)),
            "images_skipped": dg.MetadataValue.int(len(report.catalog.issues)),
            "skipped_files": dg.MetadataValue.md(issues_markdown(report.catalog.issues)),
            "duplicates": dg.MetadataValue.int(sum(len(v) for v in report.catalog.duplicates.values())),
            "images_folder": dg.MetadataValue.path(str(folder)),
            "table": dg.MetadataValue.path(str(report.images_path)),
        }
    )


def shard_count_of(extraction: ExtractionSettings, shards: int) -> int:
    """The shard count of a run of assets built for ``shards``: a resource asking for another count is refused
    (the partitions are fixed when the definitions load)."""
    if extraction.shards not in (0, shards):
        raise dg.Failure(
            description=f"the resource asks for {extraction.shards} image shards but these definitions have {shards} "
            f"(set $SSL_ATTENTION_SHARDS={extraction.shards} where the definitions load, or leave `shards` at 0)"
        )
    return shards


# Downstream follows a new attention_maps materialization (the automation sensor `dagster dev` runs evaluates
# these): eager, once the partition's blocking checks passed.
HEAD_STATS_AUTOMATION = dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()
# The catalog depends on every model's partitions: it follows any of them, without waiting for those that
# were never extracted (eager alone waits until no upstream partition is missing).
CATALOG_AUTOMATION = dg.AutomationCondition.eager().without(~dg.AutomationCondition.any_deps_missing())


class ShardAssets(NamedTuple):
    """The per-(model, shard) extraction assets of one shard count."""

    attention_maps: dg.AssetsDefinition
    attention_maps_checks: dg.AssetChecksDefinition
    head_stats: dg.AssetsDefinition


@functools.cache
def build_shard_assets(shards: int) -> ShardAssets:
    """attention_maps, its checks and head_stats, partitioned by (model, shard) for ``shards`` image shards."""
    partitions = model_shard_partitions(shards)

    @dg.asset(
        name="attention_maps",
        deps=[images],
        partitions_def=partitions,
        pool=extraction_pool(),
        kinds={"pytorch", "parquet"},
        group_name="extraction",
        description="Per-head and fused attention maps (Grad-CAM for ResNet-50) of one model's image shard: "
        "`attention_maps/model=<slug>/method=<name>/shard=<s>/data.parquet`, from one forward pass per image batch.",
    )
    def attention_maps(context: dg.AssetExecutionContext, extraction: ExtractionSettings) -> dg.MaterializeResult:
        model, shard = model_and_shard(context.partition_key, shards)
        count = shard_count_of(extraction, shards)
        folder, warehouse = _images_folder(extraction)
        records = read_catalog_records(warehouse, folder)
        if not records:
            raise dg.Failure(
                description=f"{model}: no catalogued images from {folder}; add images there and materialize `images`"
            )
        try:
            ensure_shards(warehouse, count)
        except LayoutError as exc:
            raise dg.Failure(description=str(exc)) from None
        mine = [r for r in records if shard_of(r.image_id, count) == shard]
        try:
            adapter = load_model(model, extraction.load_request(model))
        except (WeightsUnavailableError, CheckpointError, ValueError) as exc:
            raise dg.Failure(description=_with_model(model, exc)) from exc
        context.log.info(f"{model} shard {shard}/{count}: {adapter.provenance.describe()} on {adapter.device}")
        if adapter.provenance.is_random:
            context.log.warning(f"{model}: RANDOM weights - maps show the machinery, not a model's behaviour")

        bar = tqdm(total=len(mine), desc=model, unit="img", disable=not sys.stderr.isatty(), leave=False)
        try:
            report = extract_model(
                adapter,
                mine,
                warehouse,
                batch_size=extraction.batch_size,
                recompute=extraction.recompute,
                max_pixels=extraction.max_pixels,
                progress=bar.update,
                shards=count,
                shard=shard,
            )
        except WeightsDowngradeError as exc:
            raise dg.Failure(description=str(exc)) from exc
        finally:
            bar.close()
        for issue in report.issues:
            context.log.warning(f"{model}: skipped {issue.file_name}: {issue.reason}")
        return dg.MaterializeResult(metadata=extraction_metadata(report, str(warehouse), shard))

    with warnings.catch_warnings():  # partitioned checks are a preview feature of Dagster 1.13; they work as used
        warnings.simplefilter("ignore", dg.PreviewWarning)
        # partitioned like the asset: each (model, shard) keeps its own result (one partition's pass never hides
        # another's failure); blocking: a failed check keeps head_stats (and what follows) from being built on bad
        # maps in the same run
        specs = [
            dg.AssetCheckSpec(name, asset="attention_maps", description=text, partitions_def=partitions, blocking=True)
            for name, text in CHECK_NAMES.items()
        ]

    @dg.multi_asset_check(
        name="attention_maps_checks",
        specs=specs,
        description="Re-reads one (model, shard) attention_maps partition and checks it (the Checks tab re-runs "
        "these without re-extracting).",
    )
    def attention_maps_checks(
        context: dg.AssetCheckExecutionContext, extraction: ExtractionSettings
    ) -> Iterator[dg.AssetCheckResult]:
        model, shard = model_and_shard(context.partition_key, shards)
        for outcome in merge_outcomes(check_model(_locations(extraction)[1], model, shard)):
            yield check_result(outcome, model, shard)

    @dg.asset(
        name="head_stats",
        deps=[attention_maps],
        partitions_def=partitions,
        kinds={"numpy", "parquet"},
        group_name="analysis",
        automation_condition=HEAD_STATS_AUTOMATION,
        description="Per-head statistics (entropy, distance, concentration, agreement with the fused map) of "
        "every map of one model's image shard; formulas in docs/sql.md.",
    )
    def head_stats(context: dg.AssetExecutionContext, extraction: ExtractionSettings) -> dg.MaterializeResult:
        from ssl_attention.stats import write_head_stats

        model, shard = model_and_shard(context.partition_key, shards)
        warehouse = _locations(extraction)[1]
        written = write_head_stats(warehouse, model, shard)
        return dg.MaterializeResult(
            metadata={
                **table_metadata(warehouse, "head_stats", shard=shard, model=model),
                "bytes_written": dg.MetadataValue.int(sum(s.bytes for s in written.values())),
                "methods": dg.MetadataValue.json({m: s.rows for m, s in written.items()}),
            }
        )

    return ShardAssets(attention_maps, attention_maps_checks, head_stats)


# the assets of the shard count the definitions load with (``$SSL_ATTENTION_SHARDS``, else 1)
attention_maps, attention_maps_checks, head_stats = build_shard_assets(SHARDS)


@dg.asset(
    deps=[images, "head_stats", "alignment", "head_ranking"],
    kinds={"duckdb"},
    group_name="analysis",
    automation_condition=CATALOG_AUTOMATION,
    description="attention.duckdb in the warehouse: DuckDB views over every Parquet table, for any client. Its"
    " paths are relative to the warehouse (it travels with it): open it with DuckDB's file_search_path set to"
    " the warehouse folder, as the materialization's open_with command does (docs/sql.md).",
)
def warehouse_catalog(context: dg.AssetExecutionContext, extraction: ExtractionSettings) -> dg.MaterializeResult:
    from ssl_attention.query.catalog import client_command, write_catalog

    warehouse = _locations(extraction)[1]
    path = write_catalog(warehouse)
    context.log.info(f"catalog written to {path}; open it with: {client_command(warehouse)}")
    return dg.MaterializeResult(
        metadata={
            "catalog": dg.MetadataValue.path(str(path)),
            "open_with": dg.MetadataValue.text(client_command(warehouse)),
        }
    )
