"""``ssl-attention sql``: read-only refusals, the sandbox, output formats, row cap, time limit, stdin scripts."""

from __future__ import annotations

import csv
import gc
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from ssl_attention.cli import sql as sql_cli
from ssl_attention.query import sandbox
from ssl_attention.query.sandbox import open_sandbox
from ssl_attention.registry import MODELS
from tests.sql_helpers import build_sql_warehouse


@pytest.fixture(scope="module")
def warehouse(tiny_warehouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sql_warehouse(tiny_warehouse, tmp_path_factory.mktemp("shell") / "wh")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = sql_cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_select_prints_a_table(capsys, warehouse):
    code, out, err = run(
        capsys, "SELECT model, count(*) AS n FROM models GROUP BY model ORDER BY model", "--warehouse", str(warehouse)
    )
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["model", "|", "n"] and lines[-1] == f"({len(MODELS)} rows)"
    assert [line.split()[0] for line in lines[2:-1]] == sorted(MODELS)


def test_csv_and_json_output_and_output_file(capsys, warehouse, tmp_path):
    query = "SELECT image_id, file_name, thumbnail FROM images ORDER BY file_name"
    code, out, _ = run(capsys, query, "--warehouse", str(warehouse), "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [r["file_name"] for r in rows][:2] == ["astronaut.jpg", "chelsea.jpg"]
    target = tmp_path / "out.json"
    code, out, err = run(capsys, query, "--warehouse", str(warehouse), "--format", "json", "--output", str(target))
    records = json.loads(target.read_text())
    assert code == 0 and out == "" and "wrote" in err
    assert len(records) == 5 and records[0]["file_name"] == "astronaut.jpg"
    assert isinstance(records[0]["thumbnail"], str)  # bytes as base64
    code, out, _ = run(capsys, "SELECT [1.5::DOUBLE, 2] AS l, {'a': 1} AS s, NULL AS n, 'x,y' AS t", "--format", "csv")
    assert code == 0 and list(csv.reader(io.StringIO(out))) == [
        ["l", "s", "n", "t"],
        ["[1.5, 2.0]", '{"a": 1}', "", "x,y"],
    ]


@pytest.mark.parametrize(
    ("sql", "needle"),
    [
        ("COPY (SELECT 1) TO '{w}/leak.csv'", "COPY"),
        ("COPY images TO '{w}/leak.parquet'", "COPY"),
        ("ATTACH '{w}/other.duckdb' AS other", "ATTACH"),
        ("DETACH memory", "DETACH"),
        ("INSTALL httpfs", "INSTALL/LOAD"),
        ("LOAD httpfs", "INSTALL/LOAD"),
        ("SET threads = 1", "SET"),
        ("RESET threads", "SET"),
        ("PRAGMA threads = 1", "SET"),
        ("PRAGMA enable_profiling", "PRAGMA enable_profiling is not a read-only pragma"),
        ("CREATE TABLE t AS SELECT 1", "CREATE"),
        ("CREATE OR REPLACE VIEW images AS SELECT 1", "CREATE"),
        ("INSERT INTO images SELECT * FROM images", "INSERT"),
        ("DROP VIEW images", "DROP"),
        ("CALL pragma_version()", "CALL"),
        ("EXPORT DATABASE '{w}/dump'", "EXPORT"),
        ("EXPLAIN ANALYZE COPY (SELECT 1) TO '{w}/leak.csv'", "EXPLAIN is allowed for queries only"),
        ("SELECT 1; DROP VIEW images", "DROP"),
    ],
)
def test_statements_that_write_or_reconfigure_are_refused(capsys, warehouse, sql, needle):
    code, out, err = run(capsys, sql.format(w=warehouse), "--warehouse", str(warehouse))
    assert_one_line_error(code, err, "refused", needle)
    assert out == ""  # nothing ran, not even the SELECT before the DROP
    assert not list(warehouse.glob("leak*")) and not (warehouse / "other.duckdb").exists()


@pytest.mark.parametrize(
    ("sql", "needle"),
    [
        ("SELECT * FROM read_csv('/etc/passwd')", "reads the warehouse only"),
        ("SELECT * FROM read_text('/etc/hostname')", "reads the warehouse only"),
        ("SELECT * FROM glob('/etc/*')", "reads the warehouse only"),
        ("SELECT * FROM read_parquet('{w}/../outside.parquet')", "reads the warehouse only"),
        ("SELECT * FROM '/etc/passwd'", "does not exist"),  # no replacement scan of files without access
    ],
)
def test_reading_files_outside_the_warehouse_is_refused(capsys, warehouse, sql, needle):
    (warehouse.parent / "outside.parquet").write_bytes(b"PAR1")
    code, _, err = run(capsys, sql.format(w=warehouse), "--warehouse", str(warehouse))
    assert_one_line_error(code, err, needle)


def test_the_working_directorys_tmp_is_not_readable(capsys, warehouse, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    (cwd / ".tmp").mkdir(parents=True)
    (cwd / ".tmp" / "secret.csv").write_text("secret,data\n")
    monkeypatch.chdir(cwd)  # DuckDB's default temp directory is .tmp here, and it is allowed by default
    for sql in ("SELECT * FROM read_text('.tmp/secret.csv')", f"SELECT * FROM read_csv('{cwd}/.tmp/secret.csv')"):
        code, out, err = run(capsys, sql, "--warehouse", str(warehouse))
        assert_one_line_error(code, err, "reads the warehouse only")
        assert "secret" not in out
    query = "SELECT unnest(current_setting('allowed_directories')) AS d, current_setting('temp_directory') AS t"
    code, out, _ = run(capsys, query, "--warehouse", str(warehouse), "--format", "json")
    rows = json.loads(out)
    allowed = {row["d"] for row in rows}
    spill = rows[0]["t"].rstrip("/") + "/"
    assert code == 0 and allowed == {f"{warehouse}/", spill}
    assert not any(d.startswith(f"{cwd}/") for d in allowed) and not spill.startswith(f"{tmp_path}/")
    con = open_sandbox(warehouse)
    spill = con.execute("SELECT current_setting('temp_directory')").fetchone()[0]
    assert Path(spill).is_dir()
    del con
    gc.collect()
    assert not Path(spill).exists()  # the private temp directory goes with its connection


def test_unknown_statement_types_and_explain_with_comments(capsys, warehouse):
    code, out, err = run(capsys, "UPDATE EXTENSIONS;", "--warehouse", str(warehouse))
    assert_one_line_error(code, err, "refused: UPDATE EXTENSIONS statements are not allowed", "allowed: SELECT")
    for sql in ("EXPLAIN /*c*/ ANALYZE SELECT 1;", "EXPLAIN (FORMAT JSON) SELECT 1", "EXPLAIN (SELECT 1)"):
        code, out, err = run(capsys, sql, "--warehouse", str(warehouse))
        assert code == 0 and out.strip() and err == "", (sql, err)
    code, out, err = run(capsys, "EXPLAIN (ANALYZE) COPY (SELECT 1) TO 'x.csv'", "--warehouse", str(warehouse))
    assert_one_line_error(code, err, "refused: EXPLAIN is allowed for queries only")


def test_pivot_without_in_list_is_refused_naming_the_workaround(capsys, warehouse):
    code, out, err = run(capsys, "PIVOT images ON format", "--warehouse", str(warehouse))
    assert_one_line_error(code, err, "refused: PIVOT without an IN list", "ON format IN ('JPEG', 'PNG')")
    workaround = "PIVOT (SELECT format FROM images) ON format IN ('JPEG', 'PNG')"
    code, out, err = run(capsys, workaround, "--warehouse", str(warehouse), "--format", "json")
    assert code == 0 and json.loads(out) == [{"JPEG": 5, "PNG": 0}], err


def test_json_output_has_no_infinity_or_nan(capsys, warehouse):
    query = "SELECT 'inf'::DOUBLE AS x, '-inf'::DOUBLE AS y, 'nan'::DOUBLE AS z, [1.5, 'inf'::DOUBLE] AS l"
    code, out, _ = run(capsys, query, "--warehouse", str(warehouse), "--format", "json")

    def strict(name: str) -> None:
        raise AssertionError(f"{name} is not JSON")

    assert code == 0 and json.loads(out, parse_constant=strict) == [{"x": None, "y": None, "z": None, "l": [1.5, None]}]
    code, out, _ = run(capsys, query, "--warehouse", str(warehouse), "--format", "csv")
    assert code == 0 and out.splitlines()[1] == ',,,"[1.5, null]"'


def test_read_only_statements_that_are_allowed(capsys, warehouse):
    for sql in (
        "WITH x AS (SELECT 1 AS a) SELECT * FROM x",
        "DESCRIBE head_stats",
        "SHOW TABLES",
        "SUMMARIZE images",
        "EXPLAIN SELECT * FROM images",
        "EXPLAIN ANALYZE SELECT count(*) FROM attention_maps",
        "PRAGMA table_info('models')",
        "FROM methods",
        f"SELECT count(*) FROM read_parquet('{warehouse}/images/data.parquet')",
    ):
        code, out, err = run(capsys, sql, "--warehouse", str(warehouse))
        assert code == 0, (sql, err)
        assert out.strip()


def test_row_cap_says_when_it_truncates(capsys, warehouse):
    code, out, err = run(capsys, "SELECT * FROM range(100)", "--warehouse", str(warehouse), "--max-rows", "10")
    assert code == 0 and out.splitlines()[-1] == "(10 rows)"
    assert "truncated to the first 10 rows" in err
    code, out, err = run(capsys, "SELECT * FROM range(100)", "--warehouse", str(warehouse), "--max-rows", "0")
    assert code == 0 and out.splitlines()[-1] == "(100 rows)" and err == ""
    code, out, err = run(capsys, "SELECT * FROM range(100)", "--warehouse", str(warehouse), "--max-rows", "100")
    assert code == 0 and "truncated" not in err
    code, out, err = run(capsys, "SELECT * FROM range(20000)", "--warehouse", str(warehouse))
    assert out.splitlines()[-1] == "(10000 rows)" and "truncated" in err  # the default cap


def test_time_limit_interrupts_a_slow_query(capsys, warehouse):
    slow = "SELECT sum(a.range * b.range) FROM range(100000000) AS a, range(100000000) AS b"
    start = time.monotonic()
    code, _, err = run(capsys, slow, "--warehouse", str(warehouse), "--timeout", "0.5")
    elapsed = time.monotonic() - start
    assert_one_line_error(code, err, "time limit of 0.5 s", "--timeout")
    assert elapsed < 5, elapsed


def test_ctrl_c_cancels_a_running_query(tmp_path):
    slow = "SELECT sum(a.range * b.range) FROM range(100000000) AS a, range(100000000) AS b"
    child = subprocess.Popen(
        [sys.executable, "-m", "ssl_attention.cli", "sql", slow, "--warehouse", str(tmp_path / "empty")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # CI shells may ignore SIGINT
    )
    try:
        note = child.stderr.readline()  # printed once the sandbox is open, just before the query starts
        assert note.startswith("note: no attention maps"), note
        time.sleep(1.0)  # the query is running (it would take minutes)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=15)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 2
    assert err.strip() == "error: interrupted"


def test_bad_sql_and_bad_arguments_are_one_line_errors(capsys, warehouse):
    code, _, err = run(capsys, "SELEC 1", "--warehouse", str(warehouse))
    assert_one_line_error(code, err, "syntax error")
    code, _, err = run(capsys, "SELECT * FROM no_such_table", "--warehouse", str(warehouse))
    assert_one_line_error(code, err, "no_such_table")
    code, _, err = run(capsys, "SELECT 1", "--format", "xml")
    assert_one_line_error(code, err, "invalid choice")
    code, _, err = run(capsys, "SELECT 1", "--warehouse", "s3://bucket/warehouse")
    assert_one_line_error(code, err, "only local paths")
    code, _, err = run(capsys, "SELECT 1", "--max-rows", "-1")
    assert_one_line_error(code, err, ">= 0")


def test_a_damaged_file_is_a_one_line_error_naming_it(capsys, warehouse, tmp_path):
    root = tmp_path / "damaged"
    shutil.copytree(warehouse, root)
    path = root / "attention_maps" / "model=mae" / "method=cls" / "shard=0" / "data.parquet"  # not a table's first file
    path.write_bytes(b"this is not parquet " * 64)
    code, _, err = run(capsys, "SELECT count(*) FROM attention_maps WHERE model = 'mae'", "--warehouse", str(root))
    assert_one_line_error(code, err, str(path))
    code, out, _ = run(capsys, "SELECT count(*) FROM attention_maps WHERE model = 'clip'", "--warehouse", str(root))
    assert code == 0 and int(out.splitlines()[2]) > 0  # pruned away: the other partitions still answer


def test_empty_warehouse_runs_queries_with_no_rows(capsys, tmp_path):
    code, out, err = run(capsys, "SELECT count(*) AS n FROM attention_maps", "--warehouse", str(tmp_path / "none"))
    assert code == 0 and out.splitlines()[2].strip() == "0"
    assert "no attention maps" in err


def test_a_script_on_stdin_runs_every_statement(capsys, warehouse, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("SELECT 40 + 2 AS answer;\n-- a comment\nSELECT 'x' AS y;\n"))
    code, out, err = run(capsys, "--warehouse", str(warehouse), "--format", "csv")
    assert code == 0 and err == "" and out == "answer\n42\ny\nx\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("SELECT 1 AS a; COPY images TO 'x.csv';"))
    code, out, err = run(capsys, "--warehouse", str(warehouse))
    assert_one_line_error(code, err, "refused: COPY")
    assert out == ""  # the whole script is checked before its first statement runs


def test_no_query_at_a_terminal_points_to_duckdbs_own_client(capsys, warehouse, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal(""))
    code, out, err = run(capsys, "--warehouse", str(warehouse))
    setting = f"SET file_search_path = '{warehouse}'"
    assert_one_line_error(
        code, err, "no query given", f'duckdb -readonly -cmd "{setting}" {warehouse}/attention.duckdb'
    )
    assert out == ""


def test_a_failing_statement_of_a_script_is_a_one_line_error_after_the_ones_before(capsys, warehouse, monkeypatch):
    real_run_statement = sandbox.run_statement

    def run_statement(con, statement, max_rows, timeout_s):  # an error that no gate turned into a SandboxError
        if "boom" in statement.query:
            raise duckdb.InvalidInputException("boom\nLINE 1: ...")
        return real_run_statement(con, statement, max_rows, timeout_s)

    monkeypatch.setattr(sql_cli, "run_statement", run_statement)
    query = "EXPLAIN /*c*/ ANALYZE SELECT 1; SELECT 40 + 2 AS answer; SELECT 'boom'; SELECT 7 AS never"
    code, out, err = run(capsys, query, "--warehouse", str(warehouse))
    assert_one_line_error(code, err, "boom")
    assert err.strip() == "error: boom"
    assert "analyzed_plan" in out and " 42" in out and "never" not in out


def test_spill_directories_of_killed_shells_are_removed(warehouse):
    """A shell killed with SIGKILL cannot remove its spill directory; the next shell removes it (and leaves
    those of shells still running alone)."""
    import tempfile

    dead = subprocess.Popen(["sleep", "0"])
    dead.wait()
    orphan = Path(tempfile.gettempdir()) / f"{sandbox.SPILL_PREFIX}{dead.pid}-abc"
    running = Path(tempfile.gettempdir()) / f"{sandbox.SPILL_PREFIX}{os.getpid()}-abc"
    for path in (orphan, running):
        path.mkdir(exist_ok=True)
        (path / "spill.bin").write_bytes(b"x")
    try:
        open_sandbox(warehouse).close()
        assert not orphan.exists()
        assert (running / "spill.bin").is_file()
    finally:
        shutil.rmtree(orphan, ignore_errors=True)
        shutil.rmtree(running, ignore_errors=True)


def test_duckdbs_own_client_reads_the_catalog_read_only(warehouse):
    """The documented interactive route, `duckdb -readonly -cmd "SET file_search_path = '<warehouse>'"
    <warehouse>/attention.duckdb` (PyPI's duckdb-cli, an older DuckDB than the Python module): it opens the
    catalog and sees the same rows as the shell."""
    client = shutil.which("duckdb") or shutil.which("duckdb", path=str(Path(sys.executable).parent))
    if client is None:
        pytest.skip("the DuckDB CLI is not installed (pip install duckdb-cli)")
    query = "SELECT model, count(*) AS n FROM attention_maps GROUP BY model ORDER BY model"
    shown = subprocess.run(
        [
            client,
            "-readonly",
            "-csv",
            "-cmd",
            f"SET file_search_path = '{warehouse}'",
            str(warehouse / "attention.duckdb"),
            "-c",
            query,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    expected = duckdb.execute(
        "SELECT model, count(*) AS n FROM read_parquet($files, hive_partitioning = true) GROUP BY model ORDER BY model",
        {"files": f"{warehouse}/attention_maps/*/*/*/data.parquet"},
    ).fetchall()
    assert list(csv.reader(io.StringIO(shown.stdout)))[1:] == [[model, str(n)] for model, n in expected]
