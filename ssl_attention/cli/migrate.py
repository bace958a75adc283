"""`ssl-attention migrate-shards`: lay a warehouse out in image shards (ssl_attention/warehouse/migrate.py).

A warehouse written before image shards is migrated once (``--shards`` defaults to 1, or
``$SSL_ATTENTION_SHARDS``); a sharded one is re-sharded to another ``--shards N``. Idempotent: on a warehouse
already so laid out it only removes files left by an interrupted migration. The DuckDB catalog, if there is
one, is rebuilt over the new files.
"""

import argparse

from ssl_attention.cli.usage import fail
from ssl_attention.settings import WAREHOUSE_ENV, default_shards, resolve_warehouse
from ssl_attention.warehouse.paths import CATALOG_FILE, WarehouseLocationError
from ssl_attention.warehouse.shards import MAX_SHARDS, LayoutError, check_shards, recorded_shards

COMMAND = "migrate-shards"


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        COMMAND,
        help="lay a warehouse out in image shards (once, for a warehouse written before them; or re-shard)",
        description="Split each (model, method) partition file by image shard, then record the count; safe to "
        "interrupt and to run again.",
    )
    parser.add_argument("--warehouse", help=f"warehouse root (default ${WAREHOUSE_ENV} or data/warehouse)")
    parser.add_argument(
        "--shards",
        type=int,
        metavar="N",
        help=f"image shards, 1..{MAX_SHARDS} (default: the recorded count; for an old warehouse "
        "$SSL_ATTENTION_SHARDS, else 1)",
    )


def _count(shards: int) -> str:
    return f"{shards} shard" + ("s" if shards != 1 else "")


def main(args: argparse.Namespace) -> int:
    from ssl_attention.warehouse.migrate import migrate_shards

    try:
        root = resolve_warehouse(args.warehouse)
        shards = check_shards(args.shards) if args.shards is not None else recorded_shards(root) or default_shards()
    except (WarehouseLocationError, ValueError) as exc:
        return fail(str(exc))
    if not root.is_dir():
        return fail(f"--warehouse {root}: not a directory")
    try:
        report = migrate_shards(root, shards)
    except LayoutError as exc:
        return fail(str(exc))
    before = "the pre-shard layout" if report.previous is None else _count(report.previous)
    moved = ", ".join(f"{table} {rows}" for table, rows in sorted(report.rows.items())) or "none"
    print(f"warehouse {root}: {before} -> {_count(report.shards)}")
    print(f"  {report.files_split} partition files split into {report.files_written} shard files; rows: {moved}")
    if report.leftovers_removed:
        print(f"  {report.leftovers_removed} old-layout files removed")
    if (root / CATALOG_FILE).is_file():
        from ssl_attention.query.catalog import write_catalog

        print(f"  DuckDB catalog rebuilt: {write_catalog(root)}")
    return 0
