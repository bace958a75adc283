"""The extraction as Dagster assets: images -> attention_maps (per model) -> head_stats -> warehouse_catalog."""

import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import torch
from tqdm import tqdm

from pipelines.metadata import check_result, extraction_metadata, issues_markdown, table_metadata
from pipelines.partitions import MODEL_PARTITIONS
from pipelines.resources import ExtractionSettings
from ssl_attention.extraction import WeightsDowngradeError, catalog_images, extract_model, read_catalog_records
from ssl_attention.models.loading import load_model
from ssl_attention.models.weights import CheckpointError, WeightsUnavailableError
from ssl_attention.settings import pool_override
from ssl_attention.validation import CHECK_NAMES, check_model, merge_outcomes
from ssl_attention.warehouse.paths import WarehouseLocationError

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


@dg.asset(
    deps=[images],
    partitions_def=MODEL_PARTITIONS,
    pool=extraction_pool(),
    kinds={"pytorch", "parquet"},
    group_name="extraction",
    description="Per-head and fused attention maps (Grad-CAM for ResNet-50) of one model: "
    "`attention_maps/model=<slug>/method=<name>/data.parquet`, from one forward pass per image batch.",
)
def attention_maps(context: dg.AssetExecutionContext, extraction: ExtractionSettings) -> dg.MaterializeResult:
    model = context.partition_key
    folder, warehouse = _images_folder(extraction)
    records = read_catalog_records(warehouse, folder)
    if not records:
        raise dg.Failure(
            description=f"{model}: no catalogued images from {folder}; add images there and materialize `images`"
        )
    try:
        adapter = load_model(model, extraction.load_request(model))
    except (WeightsUnavailableError, CheckpointError, ValueError) as exc:
        raise dg.Failure(description=_with_model(model, exc)) from exc
    context.log.info(f"{model}: {adapter.provenance.describe()} on {adapter.device}")
    if adapter.provenance.is_random:
        context.log.warning(f"{model}: RANDOM weights - maps show the machinery, not a model's behaviour")

    bar = tqdm(total=len(records), desc=model, unit="img", disable=not sys.stderr.isatty(), leave=False)
    try:
        report = extract_model(
            adapter,
            records,
            warehouse,
            batch_size=extraction.batch_size,
            recompute=extraction.recompute,
            max_pixels=extraction.max_pixels,
            progress=bar.update,
        )
    except WeightsDowngradeError as exc:
        raise dg.Failure(description=str(exc)) from exc
    finally:
        bar.close()
    for issue in report.issues:
        context.log.warning(f"{model}: skipped {issue.file_name}: {issue.reason}")
    return dg.MaterializeResult(metadata=extraction_metadata(report, str(warehouse)))


with warnings.catch_warnings():  # partitioned checks are a preview feature of Dagster 1.13; they work as used here
    warnings.simplefilter("ignore", dg.PreviewWarning)
    # partitioned like the asset: each model keeps its own result (one model's pass never hides another's failure);
    # blocking: a failed check keeps head_stats (and what follows) from being built on bad maps in the same run
    CHECK_SPECS = [
        dg.AssetCheckSpec(
            name, asset="attention_maps", description=text, partitions_def=MODEL_PARTITIONS, blocking=True
        )
        for name, text in CHECK_NAMES.items()
    ]


@dg.multi_asset_check(
    specs=CHECK_SPECS,
    description="Re-reads one model's attention_maps partition and checks it (the Checks tab re-runs these "
    "without re-extracting).",
)
def attention_maps_checks(
    context: dg.AssetCheckExecutionContext, extraction: ExtractionSettings
) -> Iterator[dg.AssetCheckResult]:
    model = context.partition_key
    for outcome in merge_outcomes(check_model(_locations(extraction)[1], model)):
        yield check_result(outcome, model)


# Downstream follows a new attention_maps materialization (the automation sensor `dagster dev` runs evaluates
# these): eager, once the partition's blocking checks passed.
HEAD_STATS_AUTOMATION = dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()
# The catalog depends on every model's partition: it follows any of them, without waiting for models that
# were never extracted (eager alone waits until no upstream partition is missing).
CATALOG_AUTOMATION = dg.AutomationCondition.eager().without(~dg.AutomationCondition.any_deps_missing())


@dg.asset(
    deps=[attention_maps],
    partitions_def=MODEL_PARTITIONS,
    kinds={"numpy", "parquet"},
    group_name="analysis",
    automation_condition=HEAD_STATS_AUTOMATION,
    description="Per-head statistics (entropy, distance, concentration, agreement with the fused map) of "
    "every map of one model; formulas in docs/sql.md.",
)
def head_stats(context: dg.AssetExecutionContext, extraction: ExtractionSettings) -> dg.MaterializeResult:
    from ssl_attention.stats import write_head_stats

    model = context.partition_key
    warehouse = _locations(extraction)[1]
    written = write_head_stats(warehouse, model)
    return dg.MaterializeResult(
        metadata={
            **table_metadata(warehouse, "head_stats", model=model),
            "bytes_written": dg.MetadataValue.int(sum(s.bytes for s in written.values())),
            "methods": dg.MetadataValue.json({m: s.rows for m, s in written.items()}),
        }
    )


@dg.asset(
    deps=[images, head_stats, dg.AssetKey("alignment")],
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
