"""Materialization metadata the Dagster UI shows: counts, throughput, provenance, skipped files, preview."""

from __future__ import annotations

import base64
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq

from ssl_attention.extraction import ModelRunReport
from ssl_attention.images import ImageIssue
from ssl_attention.registry import METHODS
from ssl_attention.render import head_grid_png
from ssl_attention.validation import CheckOutcome
from ssl_attention.warehouse.paths import iter_partitions, partition_dir


def table_metadata(
    warehouse: Path, table: str, shard: str | None = None, **keys: str
) -> dict[str, dg.RawMetadataValue]:
    """What the partition holds now (not what this run wrote): its total rows over every data file under
    ``table/k=v/...`` (of one image ``shard`` when given), the column schema of its files, its location and the
    DuckDB view that reads it."""
    files = [p.path for p in iter_partitions(warehouse, table, **keys) if shard in (None, p.keys.get("shard"))]
    rows = sum(pq.ParquetFile(path).metadata.num_rows for path in files)
    location = partition_dir(warehouse, table, **keys)
    metadata: dict[str, dg.RawMetadataValue] = {
        "dagster/row_count": dg.MetadataValue.int(rows),
        "dagster/table_name": dg.MetadataValue.text(table),
        "dagster/uri": dg.MetadataValue.url(location.as_uri()),
        "location": dg.MetadataValue.path(str(location) + (f" (shard={shard} of each method)" if shard else "")),
        "files": dg.MetadataValue.int(len(files)),
    }
    if files:
        schema = pq.read_schema(files[0])
        columns = [dg.TableColumn(name=f.name, type=str(f.type)) for f in schema]
        metadata["dagster/column_schema"] = dg.TableSchema(columns=columns)
    return metadata


def issues_markdown(issues: list[ImageIssue], limit: int = 50) -> str:
    if not issues:
        return "No files skipped."
    lines = ["| file | reason |", "|---|---|"]
    lines += [f"| `{i.file_name}` | {i.reason.replace('|', '/')} |" for i in issues[:limit]]
    if len(issues) > limit:
        lines.append(f"| … | {len(issues) - limit} more in the errors table |")
    return "\n".join(lines)


def preview_png(report: ModelRunReport) -> bytes | None:
    """A small grid of the sample image's maps at the last layer: fused first, then the heads."""
    if not report.preview:
        return None
    method = next((m for m in report.preview if METHODS[m].per_head), next(iter(report.preview)))
    maps = report.preview[method]  # (K, gh, gw)
    labels = ["fused"] + [f"head {h}" for h in range(maps.shape[0] - 1)]
    return head_grid_png(list(maps), labels, image=report.preview_input, columns=7)


def preview_markdown(report: ModelRunReport) -> str:
    png = preview_png(report)
    if png is None:
        return "No image extracted in this run (all up to date or skipped)."
    method = next((m for m in report.preview or {} if METHODS[m].per_head), next(iter(report.preview or {"": 0})))
    encoded = base64.b64encode(png).decode()
    banner = (
        "**RANDOM WEIGHTS: these maps show the machinery, not a model's behaviour.**\n\n" if report.is_random else ""
    )
    return (
        f"{banner}{report.model} · {method} · last layer · image `{report.preview_image_id}`\n\n"
        f"![preview](data:image/png;base64,{encoded})"
    )


def extraction_metadata(
    report: ModelRunReport, warehouse: str, shard: str | None = None
) -> dict[str, dg.RawMetadataValue]:
    rows = int(sum(v for k, v in report.rows_written.items() if k != "inputs"))
    return {
        **table_metadata(Path(warehouse), "attention_maps", shard=shard, model=report.model),
        "rows_written": dg.MetadataValue.int(rows),
        "rows_extracted_this_run": dg.MetadataValue.int(report.rows_extracted),
        "bytes_written": dg.MetadataValue.int(int(sum(report.bytes_written.values()))),
        "partitions": dg.MetadataValue.json(
            {k: {"rows": report.rows_written[k], "bytes": report.bytes_written[k]} for k in report.rows_written}
        ),
        "images_extracted": dg.MetadataValue.int(report.images_extracted),
        "images_up_to_date": dg.MetadataValue.int(report.images_up_to_date),
        "images_skipped": dg.MetadataValue.int(len(report.issues)),
        "skipped_files": dg.MetadataValue.md(issues_markdown(report.issues)),
        "images_per_second": dg.MetadataValue.float(round(report.images_per_second, 3)),
        "seconds": dg.MetadataValue.float(round(report.seconds, 3)),
        "weights": dg.MetadataValue.text(report.weights),
        "weights_id": dg.MetadataValue.text(report.weights_id),
        "random_weights": dg.MetadataValue.bool(report.is_random),
        "weights_changed": dg.MetadataValue.bool(report.weights_changed),
        "warehouse": dg.MetadataValue.path(warehouse),
        "preview": dg.MetadataValue.md(preview_markdown(report)),
    }


def check_result(outcome: CheckOutcome, model: str, shard: str | None = None) -> dg.AssetCheckResult:
    """One check's result for one (model, shard) partition (both repeated in the metadata for readers of the
    run's event log)."""
    return dg.AssetCheckResult(
        check_name=outcome.name,
        passed=outcome.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=outcome.description,
        metadata={
            "model": dg.MetadataValue.text(model),
            **({"shard": dg.MetadataValue.text(shard)} if shard is not None else {}),
            "failures": dg.MetadataValue.int(outcome.failures),
            "examples": dg.MetadataValue.md("\n".join(f"- {e}" for e in outcome.examples) or "none"),
        },
    )
