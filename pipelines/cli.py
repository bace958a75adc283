"""`ssl-attention`: run the extraction (through the Dagster assets), query with SQL, serve the dashboard."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import socket
import sys
import time
import warnings
from pathlib import Path

from ssl_attention.images import DEFAULT_MAX_PIXELS
from ssl_attention.models.weights import WEIGHT_MODES, CheckpointError, parse_checkpoints
from ssl_attention.registry import MODELS, UnknownNameError, parse_model_list
from ssl_attention.warehouse.paths import ENV_VAR, WarehouseLocationError, local_path, resolve_warehouse

EXIT_USAGE = 2


def _run_parser(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser(
        "run",
        help="extract attention maps of a folder of images into the warehouse",
        description="Catalog the images, then extract every model's maps through the Dagster assets.",
    )
    run.add_argument("--images", default="data/samples", help="folder of images, searched recursively")
    run.add_argument("--models", default="all", help=f"all, or a comma-separated list of: {', '.join(MODELS)}")
    run.add_argument("--weights", default="auto", choices=WEIGHT_MODES, help="where weights come from")
    run.add_argument(
        "--checkpoint", action="append", default=[], metavar="MODEL=DIR", help="local checkpoint of one model"
    )
    run.add_argument("--warehouse", default=None, help=f"warehouse root (default ${ENV_VAR} or data/warehouse)")
    run.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    run.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    run.add_argument("--seed", type=int, default=0, help="seed of random weights (default 0)")
    run.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images")
    run.add_argument("--recompute", action="store_true", help="recompute images already extracted")
    run.add_argument("-v", "--verbose", action="store_true", help="show Dagster's own log lines")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssl-attention", description="Where self-supervised vision models look, per head and fused."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,sql,serve}")
    _run_parser(sub)
    sql = sub.add_parser("sql", help="ad-hoc, read-only SQL over the warehouse", add_help=False)
    sql.add_argument("rest", nargs=argparse.REMAINDER)
    serve = sub.add_parser("serve", help="open the Panel dashboard over the warehouse")
    serve.add_argument("--warehouse", default=None, help=f"warehouse root (default ${ENV_VAR} or data/warehouse)")
    serve.add_argument("--port", type=int, default=5006, help="port (default 5006; 0 picks a free one)")
    serve.add_argument("--address", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--show", action="store_true", help="open a browser tab")
    return parser


def _fail(message: str) -> int:
    print(f"ssl-attention: error: {message}", file=sys.stderr)
    return EXIT_USAGE


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


def cmd_run(args: argparse.Namespace) -> int:
    try:
        models = parse_model_list(args.models)
        parse_checkpoints(args.checkpoint, list(MODELS))
        warehouse = resolve_warehouse(args.warehouse)
    except (UnknownNameError, CheckpointError, WarehouseLocationError) as exc:
        return _fail(str(exc))
    if args.batch_size < 1:
        return _fail("--batch-size must be at least 1")
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        return _fail(f"--device {args.device!r}; valid devices: auto, cpu, cuda, cuda:N")
    if args.max_pixels < 1:
        return _fail("--max-pixels must be at least 1")
    try:
        images = local_path(args.images, "--images")
    except WarehouseLocationError as exc:
        return _fail(str(exc))
    if not images.is_dir():
        return _fail(f"--images {args.images}: not a directory")

    # Imported here: Dagster and torch take a few seconds to import, and `sql` does not need them.
    from pipelines.resources import ExtractionSettings
    from pipelines.runner import ModelOutcome, run_extraction

    settings = ExtractionSettings(
        images_dir=str(images),
        warehouse=str(warehouse),
        weights=args.weights,
        checkpoints=list(args.checkpoint),
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        max_pixels=args.max_pixels,
        recompute=args.recompute,
    )
    print(f"images    {images}\nwarehouse {warehouse}\nmodels    {', '.join(models)}\nweights   {args.weights}")
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
        if outcome.checks_failed:
            print(f"  {'':9s} data checks FAILED: {', '.join(outcome.checks_failed)}")

    result = run_extraction(settings, models, quiet=not args.verbose, on_model_done=report)
    if result.images_error:
        _print_skipped(warehouse)
        print(f"ssl-attention: error: {result.images_error}", file=sys.stderr)
        return 1
    print(f"images: {result.images.get('images_found', 0)} usable, {result.images.get('images_skipped', 0)} skipped")
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
            "`dagster dev -w workspace.yaml` (Dagster UI)"
        )
    return 0 if result.success else 1


def _free_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        warehouse = resolve_warehouse(args.warehouse)
    except WarehouseLocationError as exc:
        return _fail(str(exc))
    spec = importlib.util.find_spec("dashboards")
    if spec is None or not spec.submodule_search_locations:
        return _fail("the dashboards package is not installed")
    app = Path(next(iter(spec.submodule_search_locations))) / "app.py"
    port = args.port or _free_port(args.address)
    command = [sys.executable, "-m", "panel", "serve", str(app), "--port", str(port), "--address", args.address]
    command.append("--liveness")  # /liveness?endpoint=/app answers once the app builds
    for host in sorted({args.address, "localhost", "127.0.0.1"}):
        command += ["--allow-websocket-origin", f"{host}:{port}"]
    if args.show:
        command.append("--show")
    env = {**os.environ, ENV_VAR: str(warehouse)}
    print(f"serving the dashboard over {warehouse} at http://{args.address}:{port}/app", flush=True)
    # Become the server (no wrapper process): signals such as Ctrl-C or a supervisor's SIGTERM reach it.
    os.execve(sys.executable, command, env)
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "sql":
        from ssl_attention.sql_shell import sql_main

        return sql_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "serve":
        return cmd_serve(args)
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
