"""Head statistics against values worked out by hand, and write_head_stats over a tiny warehouse."""

from __future__ import annotations

import datetime as dt
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ssl_attention.stats import (
    cell_centres,
    distribution_stats,
    head_stats_table,
    jensen_shannon_rows,
    pearson_rows,
    write_head_stats,
)
from ssl_attention.warehouse import schema


def stats_of(values: np.ndarray, grid_h: int, grid_w: int, input_h: float, input_w: float) -> dict[str, float]:
    out = distribution_stats(np.asarray(values, dtype=np.float64).reshape(1, -1), grid_h, grid_w, input_h, input_w)
    return {k: float(v[0]) for k, v in out.items() if k != "p"}


def test_uniform_map_on_a_4x4_grid():
    s = stats_of(np.full(16, 0.5), 4, 4, 32, 32)  # scale does not matter: p = m / sum(m)
    assert s["entropy"] == pytest.approx(math.log(16))
    assert s["entropy_norm"] == pytest.approx(1.0)
    assert s["top1_mass"] == pytest.approx(1 / 16)
    assert s["top1pct_mass"] == pytest.approx(1 / 16)  # ceil(16 / 100) = 1 cell
    assert s["area60_frac"] == pytest.approx(10 / 16)  # 0.6 * 16 = 9.6 -> 10 cells
    assert s["total_mass"] == pytest.approx(8.0)
    # cell centres 4, 12, 20, 28 px: centroid (16, 16); 4 cells at (4, 4), 8 at (4, 12), 4 at (12, 12)
    expected = (4 * math.sqrt(32) + 8 * math.sqrt(160) + 4 * math.sqrt(288)) / 16
    assert s["mean_dist_px"] == pytest.approx(expected)
    assert s["mean_dist_frac"] == pytest.approx(expected / math.hypot(32, 32))
    assert (s["centroid_x_px"], s["centroid_y_px"]) == pytest.approx((16, 16))


def test_uniform_area60_is_exactly_60_percent_when_it_divides():
    assert stats_of(np.ones(10), 2, 5, 20, 50)["area60_frac"] == pytest.approx(0.6)  # 6 of 10 cells, no rounding up
    assert stats_of(np.ones(5), 1, 5, 10, 50)["area60_frac"] == pytest.approx(0.6)  # 3 of 5


def test_one_hot_map():
    values = np.zeros(16)
    values[6] = 0.3  # row 1, col 2
    s = stats_of(values, 4, 4, 32, 32)
    assert s["entropy"] == 0.0 and s["entropy_norm"] == 0.0
    assert s["top1_mass"] == 1.0 and s["top1pct_mass"] == 1.0
    assert s["mean_dist_px"] == 0.0 and s["mean_dist_frac"] == 0.0
    assert s["area60_frac"] == pytest.approx(1 / 16)
    assert (s["centroid_x_px"], s["centroid_y_px"]) == pytest.approx((20, 12))


def test_non_square_grid_distance_by_hand():
    # 2 x 3 grid on a 20 x 60 input: cells 10 px tall, 20 px wide; centres x 10, 30, 50 and y 5, 15
    xs, ys = cell_centres(2, 3, 20, 60)
    assert xs.tolist() == [10, 30, 50, 10, 30, 50] and ys.tolist() == [5, 5, 5, 15, 15, 15]
    values = np.array([1.0, 0, 0, 0, 0, 1.0])  # half the mass top-left, half bottom-right
    s = stats_of(values, 2, 3, 20, 60)
    assert (s["centroid_x_px"], s["centroid_y_px"]) == pytest.approx((30, 10))
    assert s["mean_dist_px"] == pytest.approx(math.sqrt(20**2 + 5**2))
    assert s["mean_dist_frac"] == pytest.approx(math.sqrt(425) / math.sqrt(20**2 + 60**2))
    assert s["entropy"] == pytest.approx(math.log(2))
    assert s["entropy_norm"] == pytest.approx(math.log(2) / math.log(6))
    assert s["area60_frac"] == pytest.approx(2 / 6)  # one cell holds 0.5 < 0.6


def test_top_one_percent_takes_ceil_of_n_over_100():
    values = np.arange(250, dtype=np.float64)  # N = 250 -> 3 cells
    p = values / values.sum()
    assert stats_of(values, 10, 25, 100, 250)["top1pct_mass"] == pytest.approx(p[-3:].sum())
    values = np.arange(100, dtype=np.float64)  # N = 100 -> exactly 1 cell
    assert stats_of(values, 10, 10, 100, 100)["top1pct_mass"] == pytest.approx(99 / values.sum())


def test_a_map_without_mass_has_no_statistics():
    s = stats_of(np.zeros(4), 2, 2, 8, 8)  # an all-zero Grad-CAM stage
    assert s["total_mass"] == 0.0
    assert all(math.isnan(s[k]) for k in s if k != "total_mass")


def test_jensen_shannon_and_pearson():
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(12), size=2)
    jsd_pq = jensen_shannon_rows(p[None], q[None])[0]
    assert jsd_pq == pytest.approx(jensen_shannon_rows(q[None], p[None])[0])  # symmetric
    m = (p + q) / 2
    by_hand = 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))
    assert jsd_pq == pytest.approx(by_hand)
    assert jensen_shannon_rows(p[None], p[None])[0] == pytest.approx(0.0, abs=1e-15)
    disjoint = jensen_shannon_rows(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]))[0]
    assert disjoint == pytest.approx(math.log(2))
    assert pearson_rows(p[None], p[None])[0] == pytest.approx(1.0)
    assert pearson_rows(p[None], (1 - p)[None])[0] == pytest.approx(-1.0)
    assert pearson_rows(p[None], q[None])[0] == pytest.approx(np.corrcoef(p, q)[0, 1])
    assert math.isnan(pearson_rows(p[None], np.full((1, 12), 1 / 12))[0])  # constant map: undefined


def _maps_table(rows: list[tuple[str, int, int | None, np.ndarray, float]], grid: tuple[int, int]) -> pa.Table:
    n = len(rows)
    return pa.table(
        {
            "image_id": [r[0] for r in rows],
            "layer": pa.array([r[1] for r in rows], pa.int16()),
            "layer_name": [f"block {r[1]}" for r in rows],
            "head": pa.array([r[2] for r in rows], pa.int16()),
            "grid_h": pa.array([grid[0]] * n, pa.int16()),
            "grid_w": pa.array([grid[1]] * n, pa.int16()),
            "map_values": pa.array([r[3].astype(np.float32).tolist() for r in rows], pa.list_(pa.float32())),
            "prefix_mass": pa.array([r[4] for r in rows], pa.float32()),
            "register_mass": pa.array([r[4] / 2 for r in rows], pa.float32()),
            "weights_mode": ["random"] * n,
            "weights_id": ["random:x#0"] * n,
        }
    )


def test_head_stats_table_pairs_each_head_with_its_own_fused_map():
    rng = np.random.default_rng(1)
    rows = []
    for image in ("b-image", "a-image"):
        for layer in (0, 1):
            heads = rng.dirichlet(np.full(6, 0.5), size=3) * 0.8
            rows.append((image, layer, None, heads.mean(axis=0), 0.2))
            rows += [(image, layer, h, heads[h], 0.2) for h in range(3)]
    table = head_stats_table(_maps_table(rows, (2, 3)), (20, 30), dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
    assert table.schema == schema.HEAD_STATS
    assert table.num_rows == len(rows)
    for index, (_, layer, head, values, prefix) in enumerate(rows):
        row = table.slice(index, 1).to_pylist()[0]
        assert row["layer"] == layer and row["head"] == head
        fused = next(r[3] for r in rows if r[0] == rows[index][0] and r[1] == layer and r[2] is None)
        p, f = values / values.sum(), fused / fused.sum()
        if head is None:
            assert row["pearson_fused"] == 1.0 and row["jsd_fused"] == 0.0
        else:
            assert row["pearson_fused"] == pytest.approx(np.corrcoef(p, f)[0, 1], abs=1e-6)
            m = (p + f) / 2
            jsd = 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(f * np.log(f / m))
            assert row["jsd_fused"] == pytest.approx(jsd, abs=1e-6)
        assert row["entropy"] == pytest.approx(-np.sum(p * np.log(p)), abs=1e-6)
        assert row["prefix_mass"] == pytest.approx(prefix) and row["register_mass"] == pytest.approx(prefix / 2)
        assert (row["input_h"], row["input_w"], row["num_cells"]) == (20, 30, 6)


def test_write_head_stats_covers_every_map_and_matches_numpy(tiny_warehouse: Path, tmp_path: Path):
    warehouse = tmp_path / "wh"
    shutil.copytree(tiny_warehouse, warehouse)
    written = write_head_stats(warehouse, "dinov2")
    assert set(written) == {"cls", "mean", "rollout"}
    for method, stats in written.items():
        maps = pq.read_table(
            warehouse / "attention_maps" / "model=dinov2" / f"method={method}" / "shard=0" / "data.parquet"
        )
        table = pq.read_table(stats.path)
        assert table.num_rows == maps.num_rows == stats.rows
        assert table.schema == schema.HEAD_STATS
        ids = table["image_id"].to_pylist()
        assert ids == sorted(ids)  # clustered by image
        got = {(r["image_id"], r["layer"], r["head"]): r for r in table.to_pylist()}
        for r in maps.to_pylist():
            values = np.asarray(r["map_values"], dtype=np.float64)
            p = values / values.sum()
            row = got[(r["image_id"], r["layer"], r["head"])]
            assert row["entropy"] == pytest.approx(-np.sum(p[p > 0] * np.log(p[p > 0])), abs=1e-9)
            assert row["top1_mass"] == pytest.approx(p.max(), abs=1e-12)
            assert row["prefix_mass"] == pytest.approx(r["prefix_mass"])
    # Grad-CAM: four stages of different grids in one partition
    stages = pq.read_table(write_head_stats(warehouse, "resnet50")["gradcam"].path)
    assert sorted(set(zip(stages["grid_h"].to_pylist(), stages["grid_w"].to_pylist(), strict=True))) == [
        (2, 2),
        (4, 4),
        (8, 8),
        (16, 16),
    ]
    assert set(stages["input_h"].to_pylist()) == {64}
    assert all(v == 1.0 for v in stages["pearson_fused"].to_pylist() if v is not None)


def test_write_head_stats_needs_the_inputs_rows(tmp_path: Path, tiny_warehouse: Path):
    assert write_head_stats(tmp_path, "dinov2") == {}  # nothing extracted yet: nothing to do
    import shutil

    warehouse = tmp_path / "wh"
    shutil.copytree(tiny_warehouse, warehouse)
    (warehouse / "inputs" / "model=dinov2" / "shard=0" / "data.parquet").unlink()  # maps without their input sizes
    with pytest.raises(FileNotFoundError, match="no inputs rows"):
        write_head_stats(warehouse, "dinov2")


def test_head_stats_use_each_images_own_input_size():
    """Any resolution: two images on one 2x3 grid but different input sizes. A map with all its mass on the two
    corner cells (0, 0) and (1, 2) has its centre of mass at the input's centre, so each corner lies half the
    distance between the two cell centres away: hypot(2 * W / 3, H / 2) / 2, by hand from each image's size."""
    corners = np.array([0.5, 0, 0, 0, 0, 0.5])
    rows = [(image, 0, None, corners, 0.0) for image in ("small", "large")]
    sizes = {"small": (28, 42), "large": (56, 84)}
    table = head_stats_table(_maps_table(rows, (2, 3)), sizes, dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
    for row in table.to_pylist():
        height, width = sizes[row["image_id"]]
        assert (row["input_h"], row["input_w"]) == (height, width)
        assert row["mean_dist_px"] == pytest.approx(math.hypot(2 * width / 3, height / 2) / 2)
        assert row["mean_dist_frac"] == pytest.approx(row["mean_dist_px"] / math.hypot(height, width))
    with pytest.raises(ValueError, match="no input size"):
        head_stats_table(_maps_table(rows, (2, 3)), {"small": (28, 42)})
