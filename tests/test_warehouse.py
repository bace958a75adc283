"""Warehouse location, layout and atomic partition replacement (including SIGKILL mid-write)."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from ssl_attention.settings import WAREHOUSE_ENV as ENV_VAR
from ssl_attention.warehouse import schema
from ssl_attention.warehouse.atomic import PartitionWriter, remove_stale_temp_files, write_table_atomic
from ssl_attention.warehouse.paths import (
    DATA_FILE,
    TABLES,
    WarehouseLocationError,
    has_partitions,
    iter_partitions,
    partition_dir,
    partition_file,
    resolve_warehouse,
    table_glob,
)

SCHEMA = pa.schema([pa.field("i", pa.int64(), nullable=False), pa.field("payload", pa.string())])


def table(start: int, rows: int, tag: str) -> pa.Table:
    return pa.table({"i": list(range(start, start + rows)), "payload": [tag] * rows}, schema=SCHEMA)


def temp_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name != DATA_FILE)


# --- location -------------------------------------------------------------------------------------------


def test_resolve_warehouse_default_env_and_flag(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_warehouse() == tmp_path / "data" / "warehouse"

    monkeypatch.setenv(ENV_VAR, str(tmp_path / "from-env"))
    assert resolve_warehouse() == tmp_path / "from-env"
    assert resolve_warehouse(tmp_path / "from-flag") == tmp_path / "from-flag"  # the flag wins
    assert resolve_warehouse("relative/wh") == tmp_path / "relative" / "wh"  # made absolute


def test_resolve_warehouse_file_urls(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_warehouse(f"file://{tmp_path}/w") == tmp_path / "w"
    assert resolve_warehouse(f"file://localhost{tmp_path}/w") == tmp_path / "w"
    assert resolve_warehouse(f"file://{tmp_path}/with%20space") == tmp_path / "with space"
    monkeypatch.setenv(ENV_VAR, f"file://{tmp_path}/env-url")
    assert resolve_warehouse() == tmp_path / "env-url"


@pytest.mark.parametrize("location", ["s3://bucket/warehouse", "gs://bucket/w", "file://otherhost/w"])
def test_resolve_warehouse_rejects_remote_locations(location, monkeypatch):
    monkeypatch.setenv(ENV_VAR, location)
    with pytest.raises(WarehouseLocationError, match="file://"):
        resolve_warehouse()
    with pytest.raises(WarehouseLocationError):
        resolve_warehouse(location)


def test_partition_layout(tmp_path):
    path = partition_file(tmp_path, "attention_maps", model="clip", method="cls", shard="0")
    assert path == tmp_path / "attention_maps" / "model=clip" / "method=cls" / "shard=0" / DATA_FILE
    assert partition_file(tmp_path, "images") == tmp_path / "images" / DATA_FILE
    for bad in ("", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="invalid partition value"):
            partition_dir(tmp_path, "attention_maps", model=bad)
    with pytest.raises(ValueError, match=r"partitioned by \(model, method, shard\)"):
        partition_dir(tmp_path, "attention_maps", method="cls")  # not a leading run of the keys
    with pytest.raises(ValueError, match="missing: method"):
        partition_file(tmp_path, "attention_maps", model="clip", shard="0")
    with pytest.raises(ValueError, match="unknown warehouse table 'maps'; tables: images, attention_maps"):
        partition_file(tmp_path, "maps")


def test_tables_match_the_schemas_and_keys_are_not_file_columns():
    assert set(TABLES) == set(schema.SCHEMAS)
    for table, keys in TABLES.items():
        assert not set(keys) & set(schema.SCHEMAS[table].names), table


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_iter_partitions_yields_exactly_the_partitions_with_their_key_values(tmp_path):
    maps = tmp_path / "head_ranking"  # partitioned by (model, method)
    expected = {
        ("b", "x"): _touch(maps / "model=b" / "method=x" / DATA_FILE),
        ("a", "y"): _touch(maps / "model=a" / "method=y" / DATA_FILE),
        ("a", "x"): _touch(maps / "model=a" / "method=x" / DATA_FILE),
    }
    # what is not a partition: stray files and folders, wrong keys or depths, hidden and empty values, temp files
    _touch(maps / "README.txt")
    _touch(maps / "model=a" / "notes" / DATA_FILE)
    _touch(maps / "model=a" / "method=x" / ".123-abc.parquet.tmp")
    _touch(maps / "model=c" / DATA_FILE)
    _touch(maps / "other=q" / "method=x" / DATA_FILE)
    _touch(maps / "model=" / "method=x" / DATA_FILE)
    _touch(maps / "model=.hidden" / "method=x" / DATA_FILE)
    _touch(maps / "model=d")  # a file named like a partition folder
    (maps / "model=a" / "method=z").mkdir()  # a partition folder without its data file
    _touch(maps / "model=a" / "method=w" / "data.parquet" / "oops")  # data.parquet that is a folder

    found = list(iter_partitions(tmp_path, "head_ranking"))
    assert [(p.keys["model"], p.keys["method"]) for p in found] == [("a", "x"), ("a", "y"), ("b", "x")]
    assert {(p.keys["model"], p.keys["method"]): p.path for p in found} == expected
    assert all(p.table == "head_ranking" and list(p.keys) == ["model", "method"] for p in found)
    assert all(p.path == partition_file(tmp_path, "head_ranking", **p.keys) for p in found)

    pinned = list(iter_partitions(tmp_path, "head_ranking", model="a"))
    assert [dict(p.keys) for p in pinned] == [{"model": "a", "method": "x"}, {"model": "a", "method": "y"}]
    assert list(iter_partitions(tmp_path, "head_ranking", model="zzz")) == []
    with pytest.raises(ValueError, match="leading run"):
        list(iter_partitions(tmp_path, "head_ranking", method="x"))
    assert has_partitions(tmp_path, "head_ranking") and not has_partitions(tmp_path, "alignment")


def test_iter_partitions_of_unpartitioned_and_one_key_tables(tmp_path):
    assert list(iter_partitions(tmp_path / "nowhere", "images")) == []
    _touch(tmp_path / "images" / DATA_FILE)
    _touch(tmp_path / "images" / "source=x" / DATA_FILE)  # no keys: only the table's own file counts
    (images,) = iter_partitions(tmp_path, "images")
    assert (images.keys, images.path) == ({}, tmp_path / "images" / DATA_FILE)
    for source in ("mae", "catalog"):
        _touch(tmp_path / "errors" / f"source={source}" / DATA_FILE)
    assert [p.keys["source"] for p in iter_partitions(tmp_path, "errors")] == ["catalog", "mae"]


def test_a_table_or_key_added_to_tables_is_laid_out_iterated_and_globbed(tmp_path, monkeypatch):
    """Adding a table (or a key, such as a shard) is one entry of TABLES: paths, iteration and the views'
    glob follow it."""
    monkeypatch.setitem(TABLES, "alignment", ("model", "method", "shard"))
    path = partition_file(tmp_path, "alignment", model="clip", method="cls", shard="0")
    assert path == tmp_path / "alignment" / "model=clip" / "method=cls" / "shard=0" / DATA_FILE
    _touch(path)
    _touch(partition_file(tmp_path, "alignment", model="clip", method="cls", shard="1"))
    _touch(tmp_path / "alignment" / "model=clip" / "method=cls" / DATA_FILE)  # one level short
    found = [dict(p.keys) for p in iter_partitions(tmp_path, "alignment", model="clip")]
    assert found == [{"model": "clip", "method": "cls", "shard": s} for s in ("0", "1")]
    globbed = sorted(Path(p) for p in glob.glob(table_glob(tmp_path, "alignment")))
    assert globbed == [p.path for p in iter_partitions(tmp_path, "alignment")]


# --- atomic replacement ---------------------------------------------------------------------------------


def test_commit_replaces_and_abort_keeps_old(tmp_path):
    directory = tmp_path / "part"
    write_table_atomic(directory, table(0, 10, "old"), SCHEMA)
    old_bytes = (directory / DATA_FILE).read_bytes()

    writer = PartitionWriter(directory, SCHEMA)
    writer.write(table(100, 5, "new"))
    assert writer.temp.exists() and writer.temp.parent == directory
    assert (directory / DATA_FILE).read_bytes() == old_bytes  # nothing visible before commit
    writer.abort()
    assert (directory / DATA_FILE).read_bytes() == old_bytes
    assert temp_files(directory) == []

    with pytest.raises(RuntimeError, match="boom"), PartitionWriter(directory, SCHEMA) as failing:
        failing.write(table(200, 5, "failed"))
        raise RuntimeError("boom")
    assert (directory / DATA_FILE).read_bytes() == old_bytes
    assert temp_files(directory) == []

    writer = PartitionWriter(directory, SCHEMA)
    writer.write(table(100, 5, "new"))
    writer.write(table(105, 5, "new"))
    stats = writer.commit()
    assert stats.rows == 10 and stats.path == directory / DATA_FILE
    assert stats.bytes == (directory / DATA_FILE).stat().st_size
    assert pq.read_table(directory / DATA_FILE).equals(pa.concat_tables([table(100, 5, "new"), table(105, 5, "new")]))
    assert pq.ParquetFile(directory / DATA_FILE).num_row_groups == 2  # one row group per write
    assert temp_files(directory) == []
    with pytest.raises(RuntimeError):
        writer.write(table(0, 1, "late"))


def test_writer_selects_and_casts_to_the_schema(tmp_path):
    reordered = pa.table({"extra": [1.5], "payload": ["a"], "i": pa.array([7], pa.int32())})
    stats = write_table_atomic(tmp_path / "part", reordered, SCHEMA)
    assert pq.read_table(stats.path).equals(pa.table({"i": [7], "payload": ["a"]}, schema=SCHEMA))
    errors = pq.read_schema(write_table_atomic(tmp_path / "errors", schema.ERRORS.empty_table(), schema.ERRORS).path)
    assert errors.names == schema.ERRORS.names


CHILD = r"""
import sys, time
import pyarrow as pa
from pathlib import Path
from ssl_attention.warehouse.atomic import PartitionWriter

schema = pa.schema([pa.field("i", pa.int64(), nullable=False), pa.field("payload", pa.string())])
writer = PartitionWriter(Path(sys.argv[1]), schema)
for n in range(1_000_000):
    writer.write(pa.table({"i": list(range(n * 1000, (n + 1) * 1000)), "payload": ["x" * 64] * 1000}, schema=schema))
    if n == 20:
        print(writer.temp, flush=True)
    time.sleep(0.005)
"""


def test_sigkill_mid_write_leaves_previous_data_whole(tmp_path):
    directory = tmp_path / "part"
    old = table(0, 1000, "old")
    write_table_atomic(directory, old, SCHEMA)
    old_bytes = (directory / DATA_FILE).read_bytes()

    child = subprocess.Popen([sys.executable, "-c", CHILD, str(directory)], stdout=subprocess.PIPE, text=True)
    try:
        temp = Path(child.stdout.readline().strip())
        assert temp.parent == directory and temp.name.startswith(".")
        deadline = time.monotonic() + 10
        while temp.stat().st_size < 100_000 and time.monotonic() < deadline:  # row groups really on disk
            time.sleep(0.01)
        assert temp.stat().st_size >= 100_000
        # a reader during the write sees the old partition, through pyarrow datasets and DuckDB globs
        assert pq.read_table(directory / DATA_FILE).equals(old)
        assert ds.dataset(directory, format="parquet").count_rows() == 1000
        glob = str(directory / "*.parquet")
        assert duckdb.connect().execute("SELECT count(*) FROM read_parquet(?)", [glob]).fetchone()[0] == 1000
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()

    assert (directory / DATA_FILE).read_bytes() == old_bytes
    assert pq.read_table(directory / DATA_FILE).equals(old)
    assert temp.exists()  # the orphan is still there...
    writer = PartitionWriter(directory, SCHEMA)  # ...until the next writer cleans it up
    assert not temp.exists()
    assert temp_files(directory) == [writer.temp]
    writer.write(table(0, 3, "next"))
    writer.commit()
    assert pq.read_table(directory / DATA_FILE).equals(table(0, 3, "next"))
    assert temp_files(directory) == []


def test_temp_files_of_live_writers_are_kept(tmp_path):
    directory = tmp_path / "part"
    directory.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = directory / f".{sleeper.pid}-abc.parquet.tmp"
        live.write_bytes(b"in progress")
        junk = directory / ".not-a-pid.parquet.tmp"
        junk.write_bytes(b"junk")
        removed = remove_stale_temp_files(directory)
        assert removed == [junk]
        assert live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_stale_temp_files(directory) == [live]
