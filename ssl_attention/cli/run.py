"""`ssl-attention run`: catalog a folder of images, then extract each model's maps through the Dagster assets.

One flag per field of ``ssl_attention.settings.Settings``, its help the field's description; the settings
model validates and defaults them (the rules live there only), and the run goes through the same assets,
in-process, that `dg dev` (the Dagster UI) materializes (pipelines/runner.py).
"""

import argparse
import sys
import time
from pathlib import Path
from typing import get_origin

from pydantic import ValidationError

from ssl_attention.cli.usage import fail
from ssl_attention.settings import Settings, describe_errors
from ssl_attention.warehouse.paths import WarehouseLocationError

FLAGS = {"images_dir": "--images", "checkpoints": "--checkpoint"}  # settings field -> flag, where they differ
METAVARS = {
    "images_dir": "DIR",
    "warehouse": "DIR",
    "checkpoints": "MODEL=DIR",
    "models": "LIST",
    "annotations": "FILE",
    "shards": "N",
}


def flag(field: str) -> str:
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "run",
        help="extract attention maps of a folder of images into the warehouse",
        description="Catalog the images, then extract every model's maps through the Dagster assets.",
    )
    for name, info in Settings.model_fields.items():
        default = info.get_default(call_default_factory=True)
        shown = f" (default {default})" if isinstance(default, int | str) and default != "" else ""
        text = ((info.description or "") + shown).replace("%", "%%")
        if info.annotation is bool:  # a switch: given means True
            parser.add_argument(flag(name), dest=name, action="store_true", default=None, help=info.description)
        else:
            action = "append" if get_origin(info.annotation) is list else "store"
            metavar = METAVARS.get(name, name.upper())
            parser.add_argument(flag(name), dest=name, action=action, metavar=metavar, help=text)
    parser.add_argument("-v", "--verbose", action="store_true", help="show Dagster's own log lines")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The validated settings of the flags given; the others keep the model's defaults."""
    return Settings(**{name: getattr(args, name) for name in Settings.model_fields if getattr(args, name) is not None})


def _print_skipped(warehouse: Path, limit: int = 5) -> None:
    """Skipped files from the errors table, grouped by reason (the catalog's and each model's)."""
    from ssl_attention.extraction import read_errors

    groups: dict[tuple[str, str], list[str]] = {}
    for row in read_errors(warehouse):
        groups.setdefault((row["source"], row["reason"]), []).append(row["file_name"])
    for (source, reason), files in sorted(groups.items()):
        shown = ", ".join(files[:limit]) + (f" and {len(files) - limit} more" if len(files) > limit else "")
        where = "" if source == "catalog" else f" ({source})"
        print(f"  skipped{where}: {reason}: {shown}")


def main(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
        images, warehouse = settings.images_path(), settings.warehouse_path()
    except ValidationError as exc:
        return fail(describe_errors(exc, {name: flag(name) for name in Settings.model_fields}))
    except WarehouseLocationError as exc:
        return fail(str(exc))
    if not images.is_dir():
        return fail(f"{flag('images_dir')} {images}: not a directory")

    # Imported here: Dagster takes seconds to import, and a bad flag should not wait for it.
    from pipelines.resources import ExtractionSettings
    from pipelines.runner import ModelOutcome, run_extraction

    models = list(settings.models)
    print(f"images    {images}\nwarehouse {warehouse}\nmodels    {', '.join(models)}\nweights   {settings.weights}")
    started = time.perf_counter()

    def report(outcome: ModelOutcome) -> None:
        md = outcome.metadata
        if not outcome.success:
            print(f"  {outcome.model:9s} FAILED: {outcome.error}")
            return
        line = (
            f"  {outcome.model:9s} {md.get('images_extracted', 0)} extracted, {md.get('images_up_to_date', 0)} up to"
            f" date, {md.get('images_skipped', 0)} skipped, {md.get('rows_written', 0)} rows,"
            f" {float(md.get('seconds', 0.0)):.1f}s  [{md.get('weights', '')}]"
        )
        print(line)
        if outcome.alignment:
            scored, rows = (
                outcome.alignment.get("maps_scored_this_run", 0),
                outcome.alignment.get("dagster/row_count", 0),
            )
            print(f"  {'':9s} alignment: {scored} maps scored, {rows} rows")
        if outcome.checks_failed:
            print(f"  {'':9s} data checks FAILED: {', '.join(outcome.checks_failed)}")

    resource = ExtractionSettings.from_settings(settings)
    result = run_extraction(resource, models, quiet=not args.verbose, on_model_done=report)
    if result.images_error:
        _print_skipped(warehouse)
        print(f"ssl-attention: error: {result.images_error}", file=sys.stderr)
        return 1
    print(f"images: {result.images.get('images_found', 0)} usable, {result.images.get('images_skipped', 0)} skipped")
    if result.annotations_error:
        print(f"annotations FAILED: {result.annotations_error}", file=sys.stderr)
    elif result.annotations:
        regions, errors = result.annotations.get("dagster/row_count", 0), result.annotations.get("errors", 0)
        print(f"annotations: {regions} regions on {result.annotations.get('images_annotated', 0)} images, "
              f"{errors} unusable entries (errors table, source annotations)")  # fmt: skip
        if result.annotations_warnings:
            print(f"  annotation checks warn: {', '.join(result.annotations_warnings)}")
    _print_skipped(warehouse)
    failed = [m.model for m in result.models if not m.success]
    maps = sum(int(m.metadata.get("rows_extracted_this_run", 0)) for m in result.models)
    print(f"maps written this run: {maps}; time {time.perf_counter() - started:.1f}s")
    if any(bool(m.metadata.get("random_weights")) for m in result.models):
        print("NOTE: some models ran with RANDOM weights: their maps show the machinery, not learned behaviour.")
    if result.duckdb_catalog_error:
        print(f"DuckDB catalog not written: {result.duckdb_catalog_error}", file=sys.stderr)
    if failed:
        print(f"failed models: {', '.join(failed)}", file=sys.stderr)
    if result.success:
        print(
            'next: `ssl-attention serve` (dashboard), `ssl-attention sql "SELECT ..."`, '
            "`DAGSTER_HOME=dagster_home dg dev` (Dagster UI)"
        )
    return 0 if result.success else 1
