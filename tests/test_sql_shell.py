"""``ssl-attention sql``: read-only refusals, the sandbox, output formats, row cap, time limit, prompt."""

from __future__ import annotations

import csv
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssl_attention.sql_shell import Settings, history_file, interactive, open_sandbox, sql_main
from tests.sql_helpers import build_sql_warehouse


@pytest.fixture(scope="module")
def warehouse(tiny_warehouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sql_warehouse(tiny_warehouse, tmp_path_factory.mktemp("shell") / "wh")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = sql_main(list(argv))
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
    assert lines[0].split() == ["model", "|", "n"] and lines[-1] == "(6 rows)"
    assert [line.split()[0] for line in lines[2:-1]] == ["clip", "dinov2", "dinov3", "mae", "resnet50", "siglip"]


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


def test_ctrl_c_cancels_a_running_query(warehouse):
    slow = "SELECT sum(a.range * b.range) FROM range(100000000) AS a, range(100000000) AS b"
    child = subprocess.Popen(
        [sys.executable, "-m", "ssl_attention.sql_shell", slow, "--warehouse", str(warehouse)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # CI shells may ignore SIGINT
    )
    try:
        time.sleep(2.0)  # imports done, query running (it would take minutes)
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
    path = root / "attention_maps" / "model=mae" / "method=cls" / "data.parquet"  # not a table's first file
    path.write_bytes(b"this is not parquet " * 64)
    code, _, err = run(capsys, "SELECT count(*) FROM attention_maps WHERE model = 'mae'", "--warehouse", str(root))
    assert_one_line_error(code, err, str(path))
    code, out, _ = run(capsys, "SELECT count(*) FROM attention_maps WHERE model = 'clip'", "--warehouse", str(root))
    assert code == 0 and int(out.splitlines()[2]) > 0  # pruned away: the other partitions still answer


def test_empty_warehouse_runs_queries_with_no_rows(capsys, tmp_path):
    code, out, err = run(capsys, "SELECT count(*) AS n FROM attention_maps", "--warehouse", str(tmp_path / "none"))
    assert code == 0 and out.splitlines()[2].strip() == "0"
    assert "no attention maps" in err


def test_interactive_prompt(warehouse):
    lines = iter(
        [
            "SELECT 40 + 2",
            "  AS answer;",
            ".format csv",
            "SELECT 'x' AS y;",
            "COPY images TO 'x.csv';",
            ".schema methods",
            ".bogus",
            ".quit",
        ]
    )

    def read(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out, err = io.StringIO(), io.StringIO()
    code = interactive(open_sandbox(warehouse), Settings(), warehouse, read=read, out=out, err=err)
    assert code == 0
    text = out.getvalue()
    assert " answer" in text and " 42" in text  # table, then
    assert "y\nx\n" in text  # csv after .format csv
    assert "methods: method VARCHAR, per_head BOOLEAN" in text
    errors = err.getvalue().splitlines()
    assert errors[0].startswith("error: refused: COPY") and errors[1].startswith("error: unknown or malformed")


def test_history_file_location(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert history_file() == tmp_path / "state" / "ssl_attention" / "history"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert history_file() == tmp_path / "home" / ".ssl_attention_history"
