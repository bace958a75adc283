"""Alignment with annotations as Dagster assets: annotations (the file, unpartitioned) -> alignment (per model
and image shard) -> head_ranking (per model, over every shard).

The computation lives in ``ssl_attention.alignment``; these assets run it, attach the data checks
(``ssl_attention.alignment.checks``) and describe the result in the UI.
"""

import base64
import functools
import io
import warnings
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from pipelines.assets import CATALOG_AUTOMATION, HEAD_STATS_AUTOMATION, images
from pipelines.metadata import check_result, table_metadata
from pipelines.partitions import ALL_SHARDS_OF_MODEL, MODEL_PARTITIONS, SHARDS, model_and_shard, model_shard_partitions
from pipelines.resources import ExtractionSettings
from ssl_attention.alignment.annotations import AnnotationFormatError
from ssl_attention.alignment.checks import ALIGNMENT_CHECKS, ANNOTATION_CHECKS, check_alignment, check_annotations
from ssl_attention.alignment.compute import FEATURE_ALL, AlignmentReport, write_alignment, write_rankings
from ssl_attention.alignment.store import NoCatalogError, write_annotations
from ssl_attention.registry import METHODS
from ssl_attention.render import head_grid_png
from ssl_attention.validation import CheckOutcome, merge_outcomes
from ssl_attention.warehouse.paths import Partition, WarehouseLocationError, iter_partitions, partition_file

BEST_HEAD_METRIC = "iou_50"
MAX_FEATURES_SHOWN = 12


def _warehouse(extraction: ExtractionSettings) -> Path:
    try:
        return extraction.warehouse_path()
    except WarehouseLocationError as exc:
        raise dg.Failure(description=str(exc)) from None


@dg.asset(
    deps=[images],
    kinds={"python", "parquet"},
    group_name="alignment",
    check_specs=[
        dg.AssetCheckSpec("regions_matched", asset="annotations", description=ANNOTATION_CHECKS["regions_matched"]),
        dg.AssetCheckSpec("coordinates_valid", asset="annotations", description=ANNOTATION_CHECKS["coordinates_valid"]),
    ],
    description="Regions of the annotation file (setting `annotations`: COCO instances JSON or WikiChurches "
    "building_parts.json) matched to catalogued images, in original-image pixels; unusable entries go to "
    "errors (source annotations).",
)
def annotations(context: dg.AssetExecutionContext, extraction: ExtractionSettings) -> dg.MaterializeResult:
    warehouse = _warehouse(extraction)
    try:
        path = extraction.annotations_path()
    except WarehouseLocationError as exc:
        raise dg.Failure(description=str(exc)) from None
    if path is None:  # the extraction job includes this asset: without a file, nothing changes
        context.log.info("no annotation file set (setting `annotations`, --annotations FILE): nothing to read")
        return dg.MaterializeResult(
            metadata={"skipped": dg.MetadataValue.text("no annotation file set; the warehouse is unchanged")},
            check_results=_vacuous(ANNOTATION_CHECKS, "no annotation file set: no region to check"),
        )
    try:
        report = write_annotations(warehouse, path)
    except (AnnotationFormatError, NoCatalogError, FileNotFoundError) as exc:
        raise dg.Failure(description=str(exc)) from exc
    parsed = report.annotations
    for error in parsed.errors[:20]:
        context.log.warning(f"annotations: {error.file_name}: {error.reason}")
    errors = "\n".join(f"| `{e.file_name}` | {e.reason.replace('|', '/')} |" for e in parsed.errors[:50])
    # regions_matched warns (bad entries are expected and skipped); a region outside its image is a bug: error
    severities = {"regions_matched": dg.AssetCheckSeverity.WARN, "coordinates_valid": dg.AssetCheckSeverity.ERROR}
    checks = [
        dg.AssetCheckResult(
            check_name=o.name,
            passed=o.passed,
            severity=severities[o.name],
            description=o.description,
            metadata={
                "failures": dg.MetadataValue.int(o.failures),
                "examples": dg.MetadataValue.md("\n".join(f"- {e}" for e in o.examples) or "none"),
            },
        )
        for o in check_annotations(warehouse, parsed)
    ]
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": dg.MetadataValue.int(report.regions),
            "images_annotated": dg.MetadataValue.int(report.images),
            "errors": dg.MetadataValue.int(len(parsed.errors)),
            "error_list": dg.MetadataValue.md(
                f"| entry | reason |\n|---|---|\n{errors}" if errors else "No unusable entries."
            ),
            "format": dg.MetadataValue.text(parsed.format),
            "file": dg.MetadataValue.path(str(path)),
            "sha256": dg.MetadataValue.text(parsed.source_hash),
            "features": dg.MetadataValue.json(sorted({r.feature for r in parsed.regions})),
            "table": dg.MetadataValue.path(str(report.path)),
        },
        check_results=checks,
    )


@functools.cache
def build_alignment(shards: int) -> dg.AssetsDefinition:
    """The alignment asset (and its checks), partitioned by (model, shard) for ``shards`` image shards."""
    partitions = model_shard_partitions(shards)
    with warnings.catch_warnings():  # partitioned checks are a preview feature of Dagster 1.13 (as in assets.py)
        warnings.simplefilter("ignore", dg.PreviewWarning)
        specs = [
            dg.AssetCheckSpec(name, asset="alignment", description=text, partitions_def=partitions)
            for name, text in ALIGNMENT_CHECKS.items()
        ]

    @dg.asset(
        name="alignment",
        deps=["attention_maps", annotations],
        partitions_def=partitions,
        automation_condition=HEAD_STATS_AUTOMATION,  # follows new maps once their blocking checks pass
        kinds={"numpy", "parquet"},
        group_name="alignment",
        check_specs=specs,
        description="Every stored map of one model's image shard (each head, fused, rollout, Grad-CAM stages, the "
        "probe) scored against every annotated feature (IoU@50/75/90/95, coverage, pointing game, KL, MSE) with "
        "uniform and centre-Gaussian baselines. Incremental: only changed maps or annotations are rescored.",
    )
    def alignment(context: dg.AssetExecutionContext, extraction: ExtractionSettings) -> dg.MaterializeResult:
        model, shard = model_and_shard(context.partition_key, shards)
        warehouse = _warehouse(extraction)
        if not partition_file(warehouse, "annotations").is_file():  # no annotation file was ever read
            context.log.info(f"{model}: no annotations table (set `annotations`): nothing to score")
            return dg.MaterializeResult(
                metadata={"skipped": dg.MetadataValue.text("no annotations table; nothing scored")},
                check_results=_vacuous(ALIGNMENT_CHECKS, "no annotations table: no alignment row to check"),
            )
        report = write_alignment(warehouse, model, rank=False, shard=shard)
        if report.images_without_transform:
            context.log.warning(
                f"{model}: {len(report.images_without_transform)} annotated images were extracted before input "
                "transforms were stored; re-extract them (--recompute) to score them"
            )
        merged = {o.name: o for o in merge_outcomes(check_alignment(warehouse, model, shard))}
        outcomes = [merged.get(name, CheckOutcome(name, True, text)) for name, text in ALIGNMENT_CHECKS.items()]
        return dg.MaterializeResult(
            metadata=alignment_metadata(report), check_results=[check_result(o, model, shard) for o in outcomes]
        )

    return alignment


alignment = build_alignment(SHARDS)


@dg.asset(
    deps=[dg.AssetDep("alignment", partition_mapping=ALL_SHARDS_OF_MODEL)],
    partitions_def=MODEL_PARTITIONS,
    automation_condition=CATALOG_AUTOMATION,  # follows any shard's new alignment
    kinds={"numpy", "parquet"},
    group_name="alignment",
    description="Per (model, method): every head, the fused map and the baselines ranked per layer, metric and "
    "feature by their mean score over all annotated images of every shard, with seeded bootstrap CIs.",
)
def head_ranking(context: dg.AssetExecutionContext, extraction: ExtractionSettings) -> dg.MaterializeResult:
    model = context.partition_key
    warehouse = _warehouse(extraction)
    written = write_rankings(warehouse, model)
    return dg.MaterializeResult(
        metadata={
            **table_metadata(warehouse, "head_ranking", model=model),
            "methods": dg.MetadataValue.json({m: s.rows for m, s in written.items()}),
            **best_head_metadata(warehouse, model),
        }
    )


def _vacuous(checks: dict[str, str], why: str) -> list[dg.AssetCheckResult]:
    """Passing results of checks with nothing to check (an asset must report each of its checks)."""
    return [
        dg.AssetCheckResult(check_name=name, passed=True, description=f"{text} ({why})")
        for name, text in checks.items()
    ]


def alignment_metadata(report: AlignmentReport) -> dict[str, dg.MetadataValue]:
    return {
        "dagster/row_count": dg.MetadataValue.int(report.rows_written),
        "maps_scored_this_run": dg.MetadataValue.int(report.maps_scored),
        "maps_per_second": dg.MetadataValue.float(round(report.maps_per_second, 1)),
        "seconds": dg.MetadataValue.float(round(report.seconds, 3)),
        "methods": dg.MetadataValue.json(
            {
                m.method: {
                    "images_scored": m.images_scored,
                    "images_up_to_date": m.images_up_to_date,
                    "rows": m.rows_written,
                }
                for m in report.methods.values()
            }
        ),
        "images_without_transform": dg.MetadataValue.int(len(report.images_without_transform)),
    }


def best_head_metadata(warehouse: Path, model: str) -> dict[str, dg.MetadataValue]:
    """The best head per feature at the last layer of the model's first per-head method (IoU@50), next to
    the fused map and the baselines, and a picture: that head's and the fused map for the "all" feature's
    best image."""
    rankings = {p.keys["method"]: p.path for p in _ranking_partitions(warehouse, model)}
    method = next((m for m in rankings if METHODS[m].per_head), None) if rankings else None
    if method is None:
        return {"best_heads": dg.MetadataValue.md("No per-head method scored (no heads to rank).")}
    table = pq.read_table(rankings[method])
    table = table.filter(pc.equal(table["metric"], BEST_HEAD_METRIC))
    if table.num_rows == 0:
        return {"best_heads": dg.MetadataValue.md("No annotated image scored yet.")}
    layer = pc.max(table["layer"]).as_py()
    table = table.filter(pc.equal(table["layer"], layer)).to_pylist()
    lines = [
        f"{method} · layer {layer} · {BEST_HEAD_METRIC} (mean over images)",
        "",
        "| feature | best head | score | fused | uniform | centre_gaussian | images |",
        "|---|---|---|---|---|---|---|",
    ]
    best_all: int | None = None
    features = sorted({r["feature"] for r in table}, key=lambda f: (f != FEATURE_ALL, f))
    for feature in features[:MAX_FEATURES_SHOWN]:
        rows = {r["entry"]: r for r in table if r["feature"] == feature}
        best = next((r for r in rows.values() if r["head_rank"] == 1), None)
        if best is None:
            continue
        if feature == FEATURE_ALL:
            best_all = best["head"]

        def score(entry: str, rows: dict = rows) -> str:
            value = rows.get(entry, {}).get("mean")
            return f"{value:.3f}" if value is not None else "–"

        lines.append(
            f"| {feature} | {best['entry']} | {best['mean']:.3f} | {score('fused')} | {score('uniform')} | "
            f"{score('centre_gaussian')} | {best['n_images']} |"
        )
    result: dict[str, dg.MetadataValue] = {"best_heads": dg.MetadataValue.md("\n".join(lines))}
    picture = _best_head_picture(warehouse, model, method, layer, best_all)
    if picture is not None:
        result["best_head_preview"] = dg.MetadataValue.md(picture)
    return result


def _ranking_partitions(warehouse: Path, model: str) -> list[Partition]:
    return list(iter_partitions(warehouse, "head_ranking", model=model))


def _best_head_picture(warehouse: Path, model: str, method: str, layer: int, head: int | None) -> str | None:
    """Markdown with a PNG: the best head's map and the fused map on that head's best image for "all"."""
    if head is None:
        return None
    from ssl_attention.query import open_warehouse

    wh = open_warehouse(warehouse)
    try:
        best = wh.exemplars(model, method, layer, head, FEATURE_ALL, BEST_HEAD_METRIC, limit=1)
        if best.num_rows == 0:
            return None
        image_id = best["image_id"][0].as_py()
        maps = [wh.map(image_id, model, method, layer, head).values, wh.map(image_id, model, method, layer).values]
        rgb = np.asarray(Image.open(io.BytesIO(wh.input_image(image_id, model))).convert("RGB"))
    except ValueError:  # QueryError: nothing to show
        return None
    png = head_grid_png(maps, [f"head {head}", "fused"], image=rgb, columns=2, cell=128)
    encoded = base64.b64encode(png).decode()
    caption = f"{model} · {method} · layer {layer} · head {head} on image `{image_id}`"
    return f"{caption}\n\n![best head](data:image/png;base64,{encoded})"
