"""Image shards: the second partition dimension of the per-image tables, and the shard count the warehouse records.

An image's shard is a fixed function of its id (a content hash, hex): ``int(image_id[:8], 16) % shards``. The
tables whose last partition key is ``shard`` (``SHARDED_TABLES``: attention_maps, head_stats, inputs,
alignment) keep each image's rows in that one shard, so a lookup of one image reads one file and a (model,
shard) step writes its own files, atomically, beside the other shards'.

The count is recorded in ``<root>/layout.json`` (``{"format": 1, "shards": N}``), written once, atomically
(a temporary file linked into place: two writers racing to record it both see one value). A run that asks for
another count, or a warehouse written before shards existed (``data.parquet`` directly under
``method=<x>/``), is refused with the command that fixes it (``ssl-attention migrate-shards``).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path

from ssl_attention.warehouse.paths import DATA_FILE, TABLES, partition_dir

SHARD_KEY = "shard"
LAYOUT_FILE = "layout.json"
LAYOUT_FORMAT = 1
DEFAULT_SHARDS = 1  # one file per (model, method): what one machine needs; more only to spread a backfill
MAX_SHARDS = 4096
SHARD_HEX_DIGITS = 8  # the id's first 32 bits decide its shard
SHARDED_TABLES = tuple(table for table, keys in TABLES.items() if keys[-1:] == (SHARD_KEY,))


class LayoutError(ValueError):
    """A warehouse whose shard layout does not fit the request; the message says what to run."""


class LegacyLayoutError(LayoutError):
    """A warehouse written before the shard dimension: it must be migrated first."""


class ShardCountError(LayoutError):
    """A run asked for another shard count than the warehouse records."""


def check_shards(count: object) -> int:
    """A shard count: an integer in 1..MAX_SHARDS."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_SHARDS:
        raise ValueError(f"shard count must be an integer in 1..{MAX_SHARDS}, got {count!r}")
    return count


def shard_of(image_id: str, shards: int) -> str:
    """The shard (a partition value, ``"0"`` .. ``str(shards - 1)``) of an image: its id's first 8 hex digits
    as an integer, modulo ``shards``."""
    check_shards(shards)
    head = image_id[:SHARD_HEX_DIGITS]
    try:
        number = int(head, 16)
    except ValueError:
        raise ValueError(f"image id {image_id!r} is not a hex digest; its shard cannot be computed") from None
    return str(number % shards)


def shard_names(shards: int) -> list[str]:
    """The partition values of ``shards`` shards: ``["0", "1", ...]``."""
    return [str(index) for index in range(check_shards(shards))]


def migrate_command(root: Path, shards: int | None = None) -> str:
    return f"ssl-attention migrate-shards --warehouse {root}" + (f" --shards {shards}" if shards else "")


# --- the recorded layout ------------------------------------------------------------------------------------


def layout_path(root: Path) -> Path:
    return Path(root) / LAYOUT_FILE


def recorded_shards(root: Path) -> int | None:
    """The shard count recorded in the warehouse, or None where none is (a new or a pre-shard warehouse)."""
    path = layout_path(root)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LayoutError(f"{path} cannot be read ({exc}); it records the warehouse's shard count") from None
    if not isinstance(data, dict) or data.get("format") != LAYOUT_FORMAT:
        raise LayoutError(f"{path}: unknown layout format {data!r} (this version reads format {LAYOUT_FORMAT})")
    try:
        return check_shards(data.get("shards"))
    except ValueError as exc:
        raise LayoutError(f"{path}: {exc}") from None


def write_layout(root: Path, shards: int, replace: bool) -> None:
    """Write ``layout.json`` atomically: replacing it, or (``replace=False``) only where none exists yet."""
    root.mkdir(parents=True, exist_ok=True)
    temp = root / f".{LAYOUT_FILE}.{os.getpid()}-{uuid.uuid4().hex}.tmp"
    try:
        with open(temp, "w") as handle:
            json.dump({"format": LAYOUT_FORMAT, "shards": shards}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(temp, layout_path(root))
        else:
            with contextlib.suppress(FileExistsError):  # another writer recorded it first: compare after
                os.link(temp, layout_path(root))
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def legacy_files(root: Path) -> list[Path]:
    """Data files of the sharded tables written before the shard dimension (``.../method=<x>/data.parquet``)."""
    found = []
    for table in SHARDED_TABLES:
        found.extend(_walk_dirs(partition_dir(root, table), TABLES[table][:-1]))
    return [directory / DATA_FILE for directory in found if (directory / DATA_FILE).is_file()]


def _walk_dirs(directory: Path, keys: tuple[str, ...]) -> list[Path]:
    """The directories ``k1=v1/k2=v2/...`` below ``directory`` for ``keys`` (hidden entries skipped)."""
    if not keys:
        return [directory]
    prefix = f"{keys[0]}="
    try:
        children = sorted(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for child in children:
        value = child.name[len(prefix) :]
        if child.name.startswith(prefix) and value and not value.startswith(".") and child.is_dir():
            found.extend(_walk_dirs(child, keys[1:]))
    return found


def readable_shards(root: Path) -> int:
    """The shard count to read the warehouse with: the recorded one; ``DEFAULT_SHARDS`` for a warehouse with
    no per-image table yet. A pre-shard warehouse raises ``LegacyLayoutError`` naming the migration command."""
    root = Path(root)
    recorded = recorded_shards(root)
    if recorded is not None:
        return recorded
    if legacy_files(root):
        raise LegacyLayoutError(
            f"the warehouse at {root} was written before image shards (files such as "
            f"attention_maps/model=<m>/method=<x>/data.parquet); migrate it once with: {migrate_command(root)}"
        )
    return DEFAULT_SHARDS


def check_layout(root: Path, shards: int) -> None:
    """Whether a run with ``shards`` image shards may write the warehouse (nothing is recorded): raises
    ``ShardCountError`` / ``LegacyLayoutError``, which say what to run, where it may not."""
    check_shards(shards)
    recorded = recorded_shards(root)
    if recorded is None:
        readable_shards(root)  # refuses a pre-shard warehouse
    elif recorded != shards:
        raise _count_error(Path(root), recorded, shards)


def ensure_shards(root: Path, shards: int) -> int:
    """Before writing a per-image table: record ``shards`` in a warehouse that has no count yet, or check that it
    is the recorded one. ``ShardCountError`` / ``LegacyLayoutError`` say what to run otherwise."""
    root = Path(root)
    check_shards(shards)
    recorded = recorded_shards(root)
    if recorded is None:
        readable_shards(root)  # a pre-shard warehouse is refused before anything is recorded
        write_layout(root, shards, replace=False)
        recorded = recorded_shards(root)
    if recorded != shards:
        raise _count_error(root, recorded, shards)
    return recorded


def _count_error(root: Path, recorded: int | None, shards: int) -> ShardCountError:
    return ShardCountError(
        f"the warehouse at {root} is laid out in {recorded} image shards ({layout_path(root)}), but this run asks "
        f"for {shards}: run with --shards {recorded} (Dagster: $SSL_ATTENTION_SHARDS={recorded}), or re-shard "
        f"the warehouse first with: {migrate_command(root, shards)}"
    )
