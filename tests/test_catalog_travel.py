"""A warehouse travels: moved or copied, its ``attention.duckdb`` reads the files where it now is.

Each test builds a warehouse, moves or copies it (the copy changed so that it differs from the original,
which still exists), then opens the catalog as a plain DuckDB client would and through ``open_warehouse``,
and checks the rows against the moved files read by pyarrow (an independent reader).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from ssl_attention.cli import sql as sql_cli
from ssl_attention.query import client_command, open_catalog, open_warehouse, refresh_catalog, write_catalog
from ssl_attention.query.catalog import CATALOG_FORMAT, catalog_is_current
from ssl_attention.query.views import create_views
from ssl_attention.stats import write_head_stats
from ssl_attention.warehouse.paths import CATALOG_FILE, DATA_FILE, iter_partitions

COUNT_BY_MODEL = "SELECT model, count(*) AS n FROM attention_maps GROUP BY model ORDER BY model"


def rows_on_disk(root: Path) -> list[tuple[str, int]]:
    """(model, rows) of the attention_maps files under ``root``, summed from their Parquet footers."""
    counts: dict[str, int] = {}
    for partition in iter_partitions(root, "attention_maps"):
        model = partition.keys["model"]
        counts[model] = counts.get(model, 0) + pq.ParquetFile(partition.path).metadata.num_rows
    return sorted(counts.items())


def plain_client(root: Path, **config: str) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(str(root / CATALOG_FILE), read_only=True, config=config)


@pytest.fixture
def original(tiny_warehouse: Path, tmp_path: Path) -> Path:
    root = tmp_path / "original"
    shutil.copytree(tiny_warehouse, root)
    write_catalog(root)
    return root


def drop_model(root: Path, model: str) -> None:
    """Make a copy differ from its original: one model's maps and facts removed."""
    for table in ("attention_maps", "models", "inputs"):
        shutil.rmtree(root / table / f"model={model}")


def test_a_moved_warehouse_reads_the_moved_files(original: Path, tmp_path: Path, monkeypatch):
    expected = rows_on_disk(original)
    moved = Path(shutil.move(original, tmp_path / "elsewhere" / "wh"))
    assert not original.exists() and rows_on_disk(moved) == expected
    monkeypatch.chdir(tmp_path)  # neither the old nor the new folder
    con = plain_client(moved, file_search_path=str(moved))
    try:
        assert con.execute(COUNT_BY_MODEL).fetchall() == expected
        assert con.execute("SELECT count(*) FROM models").fetchone()[0] == len(expected)
    finally:
        con.close()
    with open_catalog(moved) as con:
        assert con.execute(COUNT_BY_MODEL).fetchall() == expected
    assert open_warehouse(moved).sql(COUNT_BY_MODEL).to_pylist() == [{"model": m, "n": n} for m, n in expected]


def test_a_client_without_the_search_path_is_told_what_to_run(original: Path, tmp_path: Path, monkeypatch):
    """Not the working directory's files either: from inside another warehouse, the copy's catalog refuses."""
    copy = Path(shutil.copytree(original, tmp_path / "copy"))
    monkeypatch.chdir(original)  # relative globs would resolve to the original's files here
    con = plain_client(copy)
    try:
        with pytest.raises(duckdb.InvalidInputException) as refused:
            con.execute("SELECT count(*) FROM attention_maps").fetchall()
        message = str(refused.value)
        assert "SET file_search_path = '/path/to/warehouse'" in message and "duckdb -readonly -cmd" in message
        with pytest.raises(duckdb.InvalidInputException, match="file_search_path"):
            con.execute("SELECT * FROM map_cells('clip', 'cls', 'x', 0)").fetchall()
        assert con.execute("SELECT format FROM catalog_info").fetchone() == (CATALOG_FORMAT,)
    finally:
        con.close()


def test_a_copy_reads_its_own_files_while_the_original_exists(original: Path, tmp_path: Path, monkeypatch):
    copy = Path(shutil.copytree(original, tmp_path / "copy"))
    drop_model(copy, "clip")
    images = pq.read_table(copy / "images" / DATA_FILE)
    pq.write_table(images.slice(1), copy / "images" / DATA_FILE)  # one image fewer in the copy's catalog
    in_copy, in_original = rows_on_disk(copy), rows_on_disk(original)
    assert "clip" in dict(in_original) and "clip" not in dict(in_copy)
    monkeypatch.chdir(original)  # inside the original: DuckDB would find its files by a plain relative name
    for root, expected, image_rows in ((copy, in_copy, images.num_rows - 1), (original, in_original, images.num_rows)):
        con = plain_client(root, file_search_path=str(root))
        try:
            assert con.execute(COUNT_BY_MODEL).fetchall() == expected
            assert con.execute("SELECT count(*) FROM images").fetchone() == (image_rows,)
        finally:
            con.close()
    wh = open_warehouse(copy)
    assert "clip" not in [m.slug for m in wh.models()]
    assert wh.sql(COUNT_BY_MODEL).to_pylist() == [{"model": m, "n": n} for m, n in in_copy]
    assert catalog_is_current(copy)  # the copy's catalog names no path: nothing to rewrite


def write_old_catalog(root: Path) -> None:
    """A catalog as the previous version wrote it: views over absolute paths into ``root``."""
    (root / CATALOG_FILE).unlink()
    con = duckdb.connect(str(root / CATALOG_FILE))
    try:
        create_views(con, root)
    finally:
        con.close()


def test_our_code_rewrites_an_old_catalog_that_reads_another_folder(original: Path, tmp_path: Path):
    write_old_catalog(original)
    copies = {name: Path(shutil.copytree(original, tmp_path / name)) for name in ("api", "cli")}
    for copy in copies.values():
        drop_model(copy, "clip")
        con = plain_client(copy)
        try:  # the bug this fixes: the copy's old catalog silently reads the original
            assert con.execute(COUNT_BY_MODEL).fetchall() == rows_on_disk(original)
        finally:
            con.close()
        assert not catalog_is_current(copy)
    open_warehouse(copies["api"])  # the first open in a process refreshes a stale catalog
    assert sql_cli.main(["SELECT 1", "--warehouse", str(copies["cli"])]) == 0  # and so does ssl-attention sql
    for copy in copies.values():
        assert catalog_is_current(copy)
        with open_catalog(copy) as con:
            assert con.execute(COUNT_BY_MODEL).fetchall() == rows_on_disk(copy)
    assert refresh_catalog(copies["api"]) is False  # current now: left alone


def test_a_table_that_gets_its_first_files_makes_the_catalog_stale(original: Path):
    with open_catalog(original) as con:
        assert con.execute("SELECT count(*) FROM head_stats").fetchone() == (0,)  # no files when written
    write_head_stats(original, "dinov2")
    assert not catalog_is_current(original)
    assert refresh_catalog(original) is True
    stats_rows = sum(pq.ParquetFile(p.path).metadata.num_rows for p in iter_partitions(original, "head_stats"))
    with open_catalog(original) as con:
        assert con.execute("SELECT count(*) FROM head_stats").fetchone() == (stats_rows,) and stats_rows > 0


def test_duckdbs_own_client_opens_a_moved_catalog_with_the_documented_command(original: Path, tmp_path: Path):
    client = shutil.which("duckdb") or shutil.which("duckdb", path=str(Path(sys.executable).parent))
    if client is None:
        pytest.skip("the DuckDB CLI is not installed (pip install duckdb-cli)")
    expected = rows_on_disk(original)
    moved = Path(shutil.move(original, tmp_path / "moved wh"))  # a space: the command quotes it
    command = client_command(moved)
    assert command.startswith("duckdb ")
    shown = subprocess.run(
        f'{client} -csv -noheader {command.removeprefix("duckdb ")} -c "{COUNT_BY_MODEL}"',
        shell=True,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert [tuple(line.split(",")) for line in shown.stdout.split()] == [(m, str(n)) for m, n in expected]
    unset = subprocess.run(
        [client, "-readonly", str(moved / CATALOG_FILE), "-c", COUNT_BY_MODEL],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unset.returncode != 0 and "SET file_search_path" in unset.stdout + unset.stderr
