"""Every example query in docs/sql.md runs against a tiny-checkpoint warehouse, through the SQL shell's
sandbox and through the catalog file, and its result equals an answer computed independently from the
Parquet files with numpy (plain per-map loops here, not the vectorised code in ssl_attention.stats).
Also: the documented schema of every view matches what DuckDB reports."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from ssl_attention.query.catalog import open_catalog
from ssl_attention.query.sandbox import open_sandbox, parse_statements, run_statement
from ssl_attention.warehouse.paths import iter_partitions
from tests.sql_helpers import build_sql_warehouse

DOC = Path(__file__).resolve().parents[1] / "docs" / "sql.md"
EXAMPLE = re.compile(r"```sql\n(.*?)```", re.S)
ID = re.compile(r"^--\s*example:\s*([a-z0-9-]+)\s*$", re.M)


def doc_examples() -> dict[str, str]:
    found = {}
    for block in EXAMPLE.findall(DOC.read_text()):
        match = ID.search(block)
        if match:
            assert match.group(1) not in found, f"duplicate example id {match.group(1)}"
            found[match.group(1)] = block
    return found


# --- an independent reading of the warehouse ----------------------------------------------------------------


@dataclass
class Map:
    model: str
    method: str
    image_id: str
    layer: int
    head: int | None
    values: np.ndarray  # float32 as stored
    grid: tuple[int, int]
    prefix: float
    register: float
    weights_mode: str


class Reference:
    def __init__(self, warehouse: Path) -> None:
        self.maps: list[Map] = []
        for partition in iter_partitions(warehouse, "attention_maps"):
            model, method = partition.keys["model"], partition.keys["method"]
            for r in pq.read_table(partition.path).to_pylist():
                self.maps.append(
                    Map(
                        model,
                        method,
                        r["image_id"],
                        r["layer"],
                        r["head"],
                        np.asarray(r["map_values"], dtype=np.float32),
                        (r["grid_h"], r["grid_w"]),
                        r["prefix_mass"],
                        r["register_mass"],
                        r["weights_mode"],
                    )
                )
        self.models = {}
        for partition in iter_partitions(warehouse, "models"):
            self.models[partition.keys["model"]] = pq.read_table(partition.path).to_pylist()[0]
        self.input_sizes = {  # each image's own input size per model (NaFlex and --resolution N vary per image)
            (partition.keys["model"], r["image_id"]): (r["input_h"], r["input_w"])
            for partition in iter_partitions(warehouse, "inputs")
            for r in pq.read_table(partition.path, columns=["image_id", "input_h", "input_w"]).to_pylist()
        }
        self.files = {
            r["image_id"]: r["file_name"] for r in pq.read_table(warehouse / "images/data.parquet").to_pylist()
        }
        self.by_key = {(m.model, m.method, m.image_id, m.layer, m.head): m for m in self.maps}
        self.alignment = [
            {**partition.keys, **row}
            for partition in iter_partitions(warehouse, "alignment")
            for row in pq.read_table(partition.path).to_pylist()
        ]
        self._stats: dict[tuple, dict[str, float]] = {}

    def fused_of(self, m: Map) -> Map:
        return self.by_key[(m.model, m.method, m.image_id, m.layer, None)]

    def stats(self, m: Map) -> dict[str, float]:
        key = (m.model, m.method, m.image_id, m.layer, m.head)
        if key not in self._stats:
            self._stats[key] = self._compute(m)
        return self._stats[key]

    def _compute(self, m: Map) -> dict[str, float]:
        gh, gw = m.grid
        ih, iw = self.input_sizes[(m.model, m.image_id)]
        p = m.values.astype(np.float64) / m.values.astype(np.float64).sum()
        n = len(p)
        entropy = -sum(v * math.log(v) for v in p if v > 0)
        xs = [(c + 0.5) * iw / gw for r in range(gh) for c in range(gw)]
        ys = [(r + 0.5) * ih / gh for r in range(gh) for c in range(gw)]
        cx = sum(pj * x for pj, x in zip(p, xs, strict=True))
        cy = sum(pj * y for pj, y in zip(p, ys, strict=True))
        dist = sum(pj * math.hypot(x - cx, y - cy) for pj, x, y in zip(p, xs, ys, strict=True))
        ranked = sorted(p, reverse=True)
        total, cells = 0.0, 0
        for v in ranked:
            total += v
            cells += 1
            if total >= 0.6 - 1e-9:
                break
        q = self.fused_of(m).values.astype(np.float64)
        q = q / q.sum()
        mid = (p + q) / 2
        jsd = 0.5 * sum(a * math.log(a / c) for a, c in zip(p, mid, strict=True) if a > 0)
        jsd += 0.5 * sum(b * math.log(b / c) for b, c in zip(q, mid, strict=True) if b > 0)
        return {
            "entropy_norm": entropy / math.log(n),
            "mean_dist_frac": dist / math.hypot(ih, iw),
            "area60_frac": cells / n,
            "top1pct_mass": sum(ranked[: math.ceil(n / 100)]),
            "pearson_fused": 1.0 if m.head is None else float(np.corrcoef(p, q)[0, 1]),
            "jsd_fused": 0.0 if m.head is None else jsd,
        }


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def group(maps: list[Map], key: Callable[[Map], Any]) -> dict[Any, list[Map]]:
    groups: dict[Any, list[Map]] = defaultdict(list)
    for m in maps:
        groups[key(m)].append(m)
    return groups


# --- expectations, one per example ---------------------------------------------------------------------------


def most_local_heads_last_layer(ref: Reference) -> list[tuple]:
    rows = []
    for model, maps in group([m for m in ref.maps if m.method in ("cls", "probe")], lambda m: m.model).items():
        last = max(m.layer for m in maps)
        heads = group([m for m in maps if m.layer == last and m.head is not None], lambda m: (m.method, m.head))
        ranked = sorted(
            (mean([ref.stats(m)["mean_dist_frac"] for m in ms]), head, method, len(ms))
            for (method, head), ms in heads.items()
        )
        rows += [(model, method, head, value, n) for value, head, method, n in ranked[:2]]
    return sorted(rows, key=lambda r: (r[0], r[3]))


def head_agreeing_most_with_fused(ref: Reference) -> list[tuple]:
    rows = []
    heads = [m for m in ref.maps if m.method in ("cls", "probe") and m.head is not None]
    for model, maps in group(heads, lambda m: m.model).items():
        scored = []
        for (method, layer, head), ms in group(maps, lambda m: (m.method, m.layer, m.head)).items():
            pearson = mean([ref.stats(m)["pearson_fused"] for m in ms])
            jsd = mean([ref.stats(m)["jsd_fused"] for m in ms])
            scored.append((-pearson, layer, head, method, pearson, jsd))
        best = min(scored)
        rows.append((model, best[3], best[1], best[2], best[4], best[5]))
    return sorted(rows)


def entropy_by_depth(ref: Reference) -> list[tuple]:
    fused = [m for m in ref.maps if m.head is None and m.method in ("cls", "probe", "gradcam")]
    groups = group(fused, lambda m: (m.model, m.method, m.layer))
    rows = [(k[0], k[1], k[2], mean([ref.stats(m)["entropy_norm"] for m in ms])) for k, ms in groups.items()]
    return sorted(rows, key=lambda r: (r[0], r[2]))


def register_mass_by_image(ref: Reference) -> list[tuple]:
    fused = [m for m in ref.maps if m.model == "dinov2" and m.method == "cls" and m.head is None]
    groups = group(fused, lambda m: ref.files[m.image_id])
    rows = [(f, mean([m.register for m in ms]), mean([m.prefix for m in ms])) for f, ms in groups.items()]
    return sorted(rows, key=lambda r: -r[1])[:3]


def head_diversity_by_layer(ref: Reference) -> list[tuple]:
    heads = [m for m in ref.maps if m.method == "cls" and m.head is not None]
    rows = []
    for (model, layer), ms in group(heads, lambda m: (m.model, m.layer)).items():
        values = [ref.stats(m)["jsd_fused"] for m in ms]
        rows.append((model, layer, mean(values), max(values)))
    return sorted(rows)


def sharpest_head_by_area60(ref: Reference) -> list[tuple]:
    rows = []
    for model, maps in group([m for m in ref.maps if m.head is not None], lambda m: m.model).items():
        scored = []
        for (method, layer, head), ms in group(maps, lambda m: (m.method, m.layer, m.head)).items():
            area = mean([ref.stats(m)["area60_frac"] for m in ms])
            top = mean([ref.stats(m)["top1pct_mass"] for m in ms])
            scored.append((area, method, layer, head, top))
        area, method, layer, head, top = min(scored)
        rows.append((model, method, layer, head, area, top))
    return sorted(rows)


def peak_cells_of_one_map(ref: Reference) -> list[tuple]:
    first = min(ref.files, key=lambda i: ref.files[i])
    layer = ref.models["dinov2"]["num_layers"] - 1
    m = ref.by_key[("dinov2", "cls", first, layer, None)]
    grid = m.values.reshape(m.grid)
    cells = [(r, c, float(grid[r, c])) for r in range(m.grid[0]) for c in range(m.grid[1])]
    return sorted(cells, key=lambda cell: -cell[2])[:5]


def gradcam_peak_per_image(ref: Reference) -> list[tuple]:
    rows = []
    for m in ref.maps:
        if m.model == "resnet50" and m.method == "gradcam" and m.layer == 3:
            grid = m.values.reshape(m.grid)
            r, c = np.unravel_index(int(np.argmax(grid)), grid.shape)
            rows.append((ref.files[m.image_id], int(r), int(c), float(grid.max())))
    return sorted(rows)


def fused_is_mean_of_heads(ref: Reference) -> list[tuple]:
    worst: dict[tuple[str, str], float] = {}
    for m in ref.maps:
        if m.method in ("cls", "mean", "probe") and m.head is None:
            heads = [h.values.astype(np.float64) for h in ref.maps if h.head is not None and _same(h, m)]
            diff = float(np.max(np.abs(m.values.astype(np.float64) - np.mean(heads, axis=0))))
            worst[(m.model, m.method)] = max(diff, worst.get((m.model, m.method), 0.0))
    return sorted((model, method, value) for (model, method), value in worst.items())


def _same(a: Map, b: Map) -> bool:
    return (a.model, a.method, a.image_id, a.layer) == (b.model, b.method, b.image_id, b.layer)


def mass_accounting(ref: Reference) -> list[tuple]:
    rows = []
    for (model, method), ms in group(
        [m for m in ref.maps if m.method in ("cls", "probe")], lambda m: (m.model, m.method)
    ).items():
        worst = max(abs(float(m.values.astype(np.float64).sum()) + m.prefix - 1) for m in ms)
        rows.append((model, method, worst, len(ms)))
    return sorted(rows)


def warehouse_contents(ref: Reference) -> list[tuple]:
    rows = []
    for (model, method), ms in group(ref.maps, lambda m: (m.model, m.method)).items():
        modes = {m.weights_mode for m in ms}
        assert len(modes) == 1
        rows.append((model, method, modes.pop(), len({m.image_id for m in ms}), len(ms)))
    return sorted(rows)


def model_shapes(ref: Reference) -> list[tuple]:
    rows = []
    for model, info in ref.models.items():
        patch = info["patch_size"]
        grid = (info["input_h"] // patch, info["input_w"] // patch) if patch else (None, None)
        rows.append(
            (model, info["family"], info["num_layers"], info["num_heads"], *grid, list(info["per_head_methods"]))
        )
    return sorted(rows)


def _entry(row: dict[str, Any]) -> str:
    if row["map_kind"] != "map":
        return row["map_kind"]
    return "fused" if row["head"] is None else f"head {row['head']}"


def _ranked(means: dict[str, float], higher_is_better: bool = True) -> dict[str, int]:
    """Competition ranks (1 + how many are strictly better, to 1e-12)."""
    sign = 1 if higher_is_better else -1
    return {e: 1 + sum(sign * (o - v) > 1e-12 for o in means.values()) for e, v in means.items()}


def heads_vs_fused_and_baselines(ref: Reference) -> list[tuple]:
    rows = []
    cls = [r for r in ref.alignment if r["method"] == "cls" and r["feature"] == "all"]
    for model, items in group(cls, lambda r: r["model"]).items():
        last = max(r["layer"] for r in items)
        scores = group([r for r in items if r["layer"] == last and r["iou_50"] is not None], _entry)
        means = {e: mean([r["iou_50"] for r in rs]) for e, rs in scores.items()}
        ranks = _ranked(means)
        rows += [(model, e, len(scores[e]), means[e], ranks[e]) for e in means]
    return sorted(rows, key=lambda r: (r[0], r[4], r[1]))


def head_specialisation(ref: Reference) -> list[tuple]:
    items = [r for r in ref.alignment if (r["model"], r["method"]) == ("dinov2", "cls") and r["feature"] != "all"]
    last = max(r["layer"] for r in items)
    heads = [r for r in items if r["layer"] == last and r["map_kind"] == "map" and r["head"] is not None]
    rows = []
    for head, rs in group(heads, lambda r: r["head"]).items():
        by_feature = group([r for r in rs if r["coverage"] is not None], lambda r: r["feature"])
        means = {f: mean([r["coverage"] for r in fr]) for f, fr in by_feature.items()}
        best = max(means.values())
        rows += [(head, f"head {head}", f, v) for f, v in means.items() if v == best]
    return [(entry, feature, value) for _, entry, feature, value in sorted(rows)]


def fused_map_exemplars(ref: Reference) -> list[tuple]:
    items = [r for r in ref.alignment if (r["model"], r["method"]) == ("clip", "cls")]
    last = max(r["layer"] for r in items)
    fused = [
        r
        for r in items
        if r["layer"] == last and r["map_kind"] == "map" and r["head"] is None and r["feature"] == "all"
    ]
    ranked = sorted((-r["coverage"], r["image_id"]) for r in fused if r["coverage"] is not None)[:2]
    return [(ref.files[image_id], -value) for value, image_id in ranked]


def pointing_game_by_layer(ref: Reference) -> list[tuple]:
    fused = [
        r
        for r in ref.alignment
        if r["map_kind"] == "map" and r["head"] is None and r["feature"] == "all" and r["pointing_hit"] is not None
    ]
    groups = group(fused, lambda r: (r["model"], r["method"], r["layer"]))
    return sorted((*k, "all", mean([float(r["pointing_hit"]) for r in rs]), len(rs)) for k, rs in groups.items())


EXPECTATIONS: dict[str, tuple[Callable[[Reference], list[tuple]], float]] = {
    # id: (expected rows, absolute tolerance for floats)
    "most-local-heads-last-layer": (most_local_heads_last_layer, 1e-9),
    "head-agreeing-most-with-fused": (head_agreeing_most_with_fused, 1e-9),
    "entropy-by-depth": (entropy_by_depth, 1e-9),
    "register-mass-by-image": (register_mass_by_image, 1e-7),
    "head-diversity-by-layer": (head_diversity_by_layer, 1e-9),
    "sharpest-head-by-area60": (sharpest_head_by_area60, 1e-9),
    "peak-cells-of-one-map": (peak_cells_of_one_map, 0.0),
    "gradcam-peak-per-image": (gradcam_peak_per_image, 0.0),
    "fused-is-mean-of-heads": (fused_is_mean_of_heads, 1e-9),
    "mass-accounting": (mass_accounting, 2e-6),  # DuckDB sums the FLOAT list in single precision
    "warehouse-contents": (warehouse_contents, 0.0),
    "model-shapes": (model_shapes, 0.0),
    "heads-vs-fused-and-baselines": (heads_vs_fused_and_baselines, 1e-9),
    "head-specialisation": (head_specialisation, 1e-9),
    "fused-map-exemplars": (fused_map_exemplars, 1e-12),
    "pointing-game-by-layer": (pointing_game_by_layer, 1e-12),
}


# --- the tests ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def warehouse(tiny_warehouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sql_warehouse(tiny_warehouse, tmp_path_factory.mktemp("docs") / "wh")


@pytest.fixture(scope="module")
def reference(warehouse: Path) -> Reference:
    return Reference(warehouse)


@pytest.fixture(scope="module")
def sandbox(warehouse: Path) -> duckdb.DuckDBPyConnection:
    return open_sandbox(warehouse)


@pytest.fixture(scope="module")
def catalog(warehouse: Path) -> duckdb.DuckDBPyConnection:
    con = open_catalog(warehouse)
    yield con
    con.close()


def test_the_docs_have_at_least_ten_examples_each_with_an_expectation():
    examples = doc_examples()
    assert len(examples) >= 10
    assert set(examples) == set(EXPECTATIONS)


def assert_rows_equal(actual: list[tuple], expected: list[tuple], tolerance: float) -> None:
    assert len(actual) == len(expected), (actual, expected)
    for got, want in zip(actual, expected, strict=True):
        assert len(got) == len(want), (got, want)
        for a, b in zip(got, want, strict=True):
            if isinstance(b, float) and not isinstance(a, bool):
                assert a == pytest.approx(b, rel=1e-9, abs=tolerance), (got, want)
            else:
                assert a == b, (got, want)


@pytest.mark.parametrize("example", sorted(EXPECTATIONS))
def test_example_result_matches_an_independent_computation(example, reference, sandbox, catalog):
    sql = doc_examples()[example]
    expect, tolerance = EXPECTATIONS[example]
    expected = expect(reference)
    assert expected, f"{example}: the expectation is empty, the test would prove nothing"
    (statement,) = parse_statements(sql)  # accepted by the read-only shell
    result = run_statement(sandbox, statement, max_rows=0, timeout_s=30)
    assert_rows_equal(result.rows, expected, tolerance)
    assert_rows_equal(catalog.execute(sql).fetchall(), expected, tolerance)  # and through the catalog file


def test_the_health_checks_in_the_examples_pass(reference):
    assert all(row[2] < 1e-6 for row in fused_is_mean_of_heads(reference))
    assert all(row[2] < 1e-4 for row in mass_accounting(reference))


def documented_columns() -> dict[str, list[tuple[str, str]]]:
    text = DOC.read_text()
    sections = re.split(r"^### ", text, flags=re.M)[1:]
    columns = {}
    for section in sections:
        names = re.findall(r"`([a-z_]+)`", section.splitlines()[0])
        rows = re.findall(r"^\| `([a-z_0-9]+)` \| ([A-Z][A-Z0-9 \[\]]*) \|", section, flags=re.M)
        for name in names:
            if rows:
                columns[name] = rows
    return columns


def test_the_documented_schema_matches_the_views(catalog):
    documented = documented_columns()
    tables = [r[0] for r in catalog.execute("SELECT table_name FROM information_schema.tables").fetchall()]
    assert set(tables) <= set(documented), set(tables) - set(documented)
    for table in tables:
        actual = [(r[0], r[1]) for r in catalog.execute(f"DESCRIBE {table}").fetchall()]
        assert documented[table] == actual, table
