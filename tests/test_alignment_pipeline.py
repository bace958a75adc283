"""Alignment end to end on tiny checkpoints: extraction + the sample annotations -> annotations, alignment and
head_ranking for every model and method. Each stored number is checked against an independent route: row
counts from the maps and annotation tables, metrics by hand from the stored map and a hand-built coverage,
the ranking with pandas, transforms by hand from the processors' settings."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ssl_attention.alignment.annotations import AnnotationFormatError
from ssl_attention.alignment.compute import write_alignment
from ssl_attention.alignment.ranking import head_ranking_table
from ssl_attention.alignment.store import write_annotations
from ssl_attention.query import open_warehouse
from ssl_attention.query.errors import QueryError, UnknownNameError
from ssl_attention.query.sandbox import open_sandbox, parse_statements, run_statement
from ssl_attention.warehouse.paths import TABLES, iter_partitions, partition_file
from tests.sql_helpers import SAMPLE_ANNOTATIONS, SLUGS, build_sql_warehouse

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def aligned(tiny_warehouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny warehouse with the sample annotations and alignment for all six models (read-only here)."""
    return build_sql_warehouse(tiny_warehouse, tmp_path_factory.mktemp("aligned") / "wh")


def _table(warehouse: Path, table: str, **keys: str) -> pa.Table:
    return pq.read_table(
        partition_file(warehouse, table, **{**({"shard": "0"} if "shard" in TABLES[table] else {}), **keys})
    )


def _features_by_image(warehouse: Path) -> dict[str, set[str]]:
    regions = _table(warehouse, "annotations").to_pylist()
    features: dict[str, set[str]] = {}
    for r in regions:
        features.setdefault(r["image_id"], {"all"}).add(r["feature"])
    return features


# --- rows --------------------------------------------------------------------------------------------------


def test_every_model_and_method_has_one_row_per_map_and_feature_plus_baselines(aligned):
    features = _features_by_image(aligned)
    assert len(features) == 5  # every sample image has regions
    maps_partitions = list(iter_partitions(aligned, "attention_maps"))
    assert {p.keys["model"] for p in maps_partitions} == set(SLUGS)
    for partition in maps_partitions:
        maps = pq.read_table(partition.path, columns=["image_id", "layer", "head"]).to_pylist()
        rows = _table(aligned, "alignment", **partition.keys).to_pylist()
        expected = {(m["image_id"], m["layer"], m["head"], f) for m in maps for f in features[m["image_id"]]}
        got = [(r["image_id"], r["layer"], r["head"], r["feature"]) for r in rows if r["map_kind"] == "map"]
        assert len(got) == len(set(got)) == len(expected), partition.keys
        assert set(got) == expected, partition.keys
        layers = {(m["image_id"], m["layer"]) for m in maps}
        for kind in ("uniform", "centre_gaussian"):
            baseline = [(r["image_id"], r["layer"], r["feature"]) for r in rows if r["map_kind"] == kind]
            assert sorted(baseline) == sorted((i, layer, f) for i, layer in layers for f in features[i])
            assert all(r["head"] is None for r in rows if r["map_kind"] == kind)


def test_grad_cam_stages_are_scored_on_their_own_grids(aligned):
    maps = _table(aligned, "attention_maps", model="resnet50", method="gradcam").to_pylist()
    grids = {m["layer"]: (m["grid_h"], m["grid_w"]) for m in maps}
    assert len(set(grids.values())) == 4  # four stages, four grids
    for r in _table(aligned, "alignment", model="resnet50", method="gradcam").to_pylist():
        assert (r["grid_h"], r["grid_w"]) == grids[r["layer"]]


# --- transforms by hand ------------------------------------------------------------------------------------


def _catalog(warehouse: Path) -> dict[str, dict]:
    return {r["file_name"]: r for r in _table(warehouse, "images").to_pylist()}


def test_stored_transforms_equal_a_hand_computation(aligned, tiny_checkpoints):
    """CLIP: shortest edge 32 then a 32 x 32 centre crop; DINOv2 (no crop): a plain resize to 32 x 32."""
    catalog = _catalog(aligned)
    chelsea = catalog["chelsea.jpg"]
    assert (chelsea["width"], chelsea["height"]) == (451, 300)
    clip = {r["image_id"]: r for r in _table(aligned, "inputs", model="clip").to_pylist()}[chelsea["image_id"]]
    config = json.loads((tiny_checkpoints["clip"] / "preprocessor_config.json").read_text())
    assert config["size"] == {"shortest_edge": 32} and config["crop_size"] == {"height": 32, "width": 32}
    resized_w = int(32 * 451 / 300)  # 48: the longer side, truncated
    assert clip["scale_x"] == pytest.approx(resized_w / 451) and clip["scale_y"] == pytest.approx(32 / 300)
    assert (clip["crop_left"], clip["crop_top"]) == ((resized_w - 32) // 2, 0)
    assert (clip["input_w"], clip["input_h"]) == (32, 32)
    dinov2 = {r["image_id"]: r for r in _table(aligned, "inputs", model="dinov2").to_pylist()}[chelsea["image_id"]]
    assert dinov2["scale_x"] == pytest.approx(32 / 451) and dinov2["scale_y"] == pytest.approx(32 / 300)
    assert (dinov2["crop_left"], dinov2["crop_top"]) == (0, 0)


# --- metrics by hand ---------------------------------------------------------------------------------------


def _cell_coverage(box: tuple[float, ...], grid_h: int, grid_w: int, input_h: int, input_w: int) -> np.ndarray:
    """Area fraction of each cell inside one box (input pixels), by interval overlaps."""
    x0, y0, x1, y1 = box
    cw, ch = input_w / grid_w, input_h / grid_h
    out = np.zeros(grid_h * grid_w)
    for r in range(grid_h):
        for c in range(grid_w):
            ox = max(0.0, min(x1, (c + 1) * cw) - max(x0, c * cw))
            oy = max(0.0, min(y1, (r + 1) * ch) - max(y0, r * ch))
            out[r * grid_w + c] = ox * oy / (cw * ch)
    return out


def _soft_target(box: tuple[float, ...], grid_h: int, grid_w: int, input_h: int, input_w: int) -> np.ndarray:
    """One region's Gaussian at pixel centres, block means per cell (the grids here divide the input), sum 1."""
    x0, y0, x1, y1 = box
    sx, sy = max((x1 - x0) / 4, 1.0), max((y1 - y0) / 4, 1.0)
    xs, ys = np.arange(input_w) + 0.5, np.arange(input_h) + 0.5
    raster = np.exp(-0.5 * ((ys[:, None] - (y0 + y1) / 2) / sy) ** 2 - 0.5 * ((xs[None, :] - (x0 + x1) / 2) / sx) ** 2)
    bh, bw = input_h // grid_h, input_w // grid_w
    cells = raster.reshape(grid_h, bh, grid_w, bw).mean(axis=(1, 3)).reshape(-1)
    return cells / cells.sum()


def _hand_metrics(values: np.ndarray, coverage: np.ndarray, target: np.ndarray) -> dict[str, float]:
    n = len(values)
    order = sorted(range(n), key=lambda i: (-float(values[i]), i))
    a = values.astype(np.float64) / values.astype(np.float64).sum()
    out: dict[str, float] = {}
    for p in (50, 75, 90, 95):
        k = max(1, math.floor(n * (100 - p) / 100 + 0.5))
        inside = sum(coverage[i] for i in order[:k])
        out[f"iou_{p}"] = inside / (k + coverage.sum() - inside)
    out["coverage"] = float(a @ coverage)
    out["pointing_hit"] = bool(coverage[order[0]] >= 0.5)
    q = (a + 1e-8) / (1 + n * 1e-8)
    out["kl"] = sum(g * math.log(g / qi) for g, qi in zip(target, q, strict=True) if g > 0)
    out["mse"] = float(np.mean((a - target) ** 2))
    return out


@pytest.mark.parametrize("model,method", [("clip", "cls"), ("dinov2", "mean"), ("siglip", "probe")])
def test_stored_metrics_equal_a_hand_computation_from_the_stored_map(aligned, model, method):
    regions = [r for r in _table(aligned, "annotations").to_pylist()]
    single = {}  # (image, feature) -> its one region
    for r in regions:
        single.setdefault((r["image_id"], r["feature"]), []).append(r)
    inputs = {r["image_id"]: r for r in _table(aligned, "inputs", model=model).to_pylist()}
    maps = {
        (m["image_id"], m["layer"], m["head"]): m
        for m in _table(aligned, "attention_maps", model=model, method=method).to_pylist()
    }
    rows = [
        r
        for r in _table(aligned, "alignment", model=model, method=method).to_pylist()
        if r["map_kind"] == "map" and r["feature"] != "all" and len(single[(r["image_id"], r["feature"])]) == 1
    ]
    checked = 0
    for row in rows[:: max(1, len(rows) // 12)]:
        region = single[(row["image_id"], row["feature"])][0]
        t = inputs[row["image_id"]]
        box = (
            region["x0"] * t["scale_x"] - t["crop_left"],
            region["y0"] * t["scale_y"] - t["crop_top"],
            region["x1"] * t["scale_x"] - t["crop_left"],
            region["y1"] * t["scale_y"] - t["crop_top"],
        )
        clipped = (max(box[0], 0), max(box[1], 0), min(box[2], t["input_w"]), min(box[3], t["input_h"]))
        if not (clipped[2] > clipped[0] and clipped[3] > clipped[1]):
            assert row["iou_50"] is None and row["visible_fraction"] == 0.0  # recorded, not scored
            continue
        m = maps[(row["image_id"], row["layer"], row["head"])]
        values = np.asarray(m["map_values"], dtype=np.float32)
        coverage = _cell_coverage(clipped, m["grid_h"], m["grid_w"], t["input_h"], t["input_w"])
        target = _soft_target(box, m["grid_h"], m["grid_w"], t["input_h"], t["input_w"])
        expected = _hand_metrics(values, coverage, target)
        for name, value in expected.items():
            assert row[name] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, row["image_id"], row["head"])
        area = (clipped[2] - clipped[0]) * (clipped[3] - clipped[1])
        assert row["area_fraction"] == pytest.approx(area / (t["input_w"] * t["input_h"]))
        assert row["visible_fraction"] == pytest.approx(area / ((box[2] - box[0]) * (box[3] - box[1])))
        checked += 1
    assert checked >= 5


def test_uniform_baseline_scores_like_a_hand_computation(aligned):
    rows = _table(aligned, "alignment", model="mae", method="cls").to_pylist()
    maps = {
        (m["image_id"], m["layer"]): m for m in _table(aligned, "attention_maps", model="mae", method="cls").to_pylist()
    }
    for row in [r for r in rows if r["map_kind"] == "uniform" and r["feature"] == "all"][:4]:
        m = maps[(row["image_id"], row["layer"])]
        n = m["grid_h"] * m["grid_w"]
        fused = next(r for r in rows if r["map_kind"] == "map" and r["head"] is None and r["feature"] == "all"
                     and r["image_id"] == row["image_id"] and r["layer"] == row["layer"])  # fmt: skip
        # a uniform map's coverage is the mean coverage = the union's area fraction (the grid tiles the input)
        assert row["coverage"] == pytest.approx(fused["area_fraction"], rel=1e-9)
        # all cells tie: the top half is the first n/2 cells in raster order, i.e. the upper half of the grid
        assert row["pointing_hit"] is (fused["area_fraction"] > 0 and row["pointing_hit"])
        assert row["mse"] >= 0 and row["kl"] >= 0 and n == m["grid_h"] * m["grid_w"]


# --- the ranking -------------------------------------------------------------------------------------------


def _pandas_ranking(alignment: pa.Table, metric: str, higher_is_better: bool) -> pd.DataFrame:
    df = alignment.to_pandas()
    df["entry"] = np.where(
        df["map_kind"] != "map",
        df["map_kind"],
        np.where(df["head"].isna(), "fused", "head " + df["head"].astype("Int64").astype(str)),
    )
    df[metric] = df[metric].astype(float)
    scored = df.dropna(subset=[metric])
    means = scored.groupby(["layer", "feature", "entry"])[metric].agg(["mean", "median", "count"]).reset_index()
    means["rounded"] = means["mean"].round(12)  # the documented tie rule: means equal to 12 decimals tie
    means["rank"] = (
        means.groupby(["layer", "feature"])["rounded"].rank(method="min", ascending=not higher_is_better).astype(int)
    )
    return means


@pytest.mark.parametrize(
    "model,method,metric,better",
    [("dinov2", "cls", "iou_50", True), ("clip", "mean", "kl", False), ("resnet50", "gradcam", "pointing_hit", True)],
)
def test_the_ranking_equals_a_pandas_recomputation(aligned, model, method, metric, better):
    expected = _pandas_ranking(_table(aligned, "alignment", model=model, method=method), metric, better)
    stored = _table(aligned, "head_ranking", model=model, method=method).to_pandas()
    stored = stored[stored["metric"] == metric]
    unscored = stored[stored["n_images"] == 0]  # a feature wholly outside this model's view: recorded, no score
    assert unscored["mean"].isna().all() and unscored["rank"].isna().all()
    stored = stored[stored["n_images"] > 0]
    merged = expected.merge(stored, on=["layer", "feature", "entry"], suffixes=("_pd", ""))
    assert len(merged) == len(expected) == len(stored)
    np.testing.assert_allclose(merged["mean"], merged["mean_pd"], rtol=1e-12)
    np.testing.assert_allclose(merged["median"], merged["median_pd"], rtol=1e-12)
    assert (merged["n_images"] == merged["count"]).all()
    assert (merged["rank"] == merged["rank_pd"]).all()
    assert (merged["ci_low"] <= merged["mean"] + 1e-12).all() and (merged["mean"] <= merged["ci_high"] + 1e-12).all()
    assert set(stored["entry"]) >= {"fused", "uniform", "centre_gaussian"}


def test_the_bootstrap_is_seeded(aligned):
    table = _table(aligned, "alignment", model="clip", method="cls")
    first, second = head_ranking_table(table), head_ranking_table(table)
    assert first.column("ci_low").equals(second.column("ci_low"))
    assert first.column("ci_high").equals(second.column("ci_high"))


def test_the_query_api_ranks_heads_with_fused_and_baselines(aligned):
    wh = open_warehouse(aligned)
    layer = max(wh.layers("dinov2", "cls"))
    ranking = wh.head_ranking("dinov2", "cls", layer, "iou_50", "all").to_pylist()
    assert [r["rank"] for r in ranking] == sorted(r["rank"] for r in ranking)
    assert {r["entry"] for r in ranking} == {"fused", "uniform", "centre_gaussian", *(f"head {h}" for h in range(4))}
    matrix = wh.head_feature_matrix("dinov2", "cls", layer, "coverage")
    assert matrix.entries[:4] == ("head 0", "head 1", "head 2", "head 3") and "all" not in matrix.features
    stored = {
        (r["entry"], r["feature"]): r["mean"]
        for r in _table(aligned, "head_ranking", model="dinov2", method="cls").to_pylist()
        if r["metric"] == "coverage" and r["layer"] == layer
    }
    for i, entry in enumerate(matrix.entries):
        for j, feature in enumerate(matrix.features):
            assert matrix.values[i, j] == pytest.approx(stored[(entry, feature)])
    best = wh.exemplars("dinov2", "cls", layer, 1, "all", "coverage", limit=2).to_pylist()
    rows = [r for r in _table(aligned, "alignment", model="dinov2", method="cls").to_pylist()
            if r["layer"] == layer and r["head"] == 1 and r["feature"] == "all" and r["map_kind"] == "map"]  # fmt: skip
    top = sorted(rows, key=lambda r: (-r["coverage"], r["image_id"]))[:2]
    assert [b["image_id"] for b in best] == [r["image_id"] for r in top]
    assert best[0]["file_name"].endswith(".jpg")


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"metric": "iou"}, "valid metrics: iou_50, iou_75"),
        ({"feature": "dog"}, "valid features: all, "),
        ({"model": "vgg"}, "valid models"),
        ({"method": "rollout2"}, "valid methods"),
        ({"layer": 99}, "valid layers"),
    ],
)
def test_alignment_queries_name_the_valid_values(aligned, kwargs, needle):
    wh = open_warehouse(aligned)
    args = {"model": "clip", "method": "cls", "layer": 1, "metric": "iou_50", "feature": "all", **kwargs}
    with pytest.raises(UnknownNameError, match=re.escape(needle)):
        wh.head_ranking(**args)


def test_exemplars_check_the_head_and_the_limit(aligned):
    wh = open_warehouse(aligned)
    with pytest.raises(UnknownNameError, match="valid heads"):
        wh.exemplars("clip", "cls", 1, 9)
    with pytest.raises(QueryError, match="limit must be at least 1"):
        wh.exemplars("clip", "cls", 1, 0, limit=0)


def test_the_readme_head_ranking_query_runs_and_shows_heads_fused_and_baselines(aligned):
    text = (REPO / "README.md").read_text()
    (sql,) = [block for block in re.findall(r"```sql\n(.*?)```", text, re.S) if "head_ranking" in block]
    (statement,) = parse_statements(sql)
    result = run_statement(open_sandbox(aligned), statement, max_rows=0, timeout_s=30)
    entries = {row[3] for row in result.rows}
    assert {"fused", "uniform", "centre_gaussian", "head 0"} <= entries
    assert {row[0] for row in result.rows} == set(SLUGS)


# --- incremental -------------------------------------------------------------------------------------------


def test_a_second_run_recomputes_nothing_and_a_changed_annotation_only_its_image(aligned, tmp_path):
    warehouse = tmp_path / "wh"
    shutil.copytree(aligned, warehouse)
    path = partition_file(warehouse, "alignment", model="clip", method="cls", shard="0")
    before = path.stat().st_mtime_ns
    again = write_alignment(warehouse, "clip")
    assert again.maps_scored == 0 and path.stat().st_mtime_ns == before

    doc = json.loads(SAMPLE_ANNOTATIONS.read_text())
    doc["annotations"][0]["bbox"] = [10, 10, 200, 200]  # the astronaut's first region
    edited = tmp_path / "annotations.json"
    edited.write_text(json.dumps(doc))
    write_annotations(warehouse, edited)
    old = _table(aligned, "alignment", model="clip", method="cls")
    report = write_alignment(warehouse, "clip")
    assert {m.images_scored for m in report.methods.values()} == {1}
    new = _table(warehouse, "alignment", model="clip", method="cls")
    astronaut = _catalog(warehouse)["astronaut.jpg"]["image_id"]
    for table in (old, new):
        assert table.num_rows == old.num_rows
    others_old = old.filter(pc.not_equal(old["image_id"], astronaut)).sort_by([("image_id", "ascending")])
    others_new = new.filter(pc.not_equal(new["image_id"], astronaut)).sort_by([("image_id", "ascending")])
    assert others_old.equals(others_new)  # carried over as they were, computed_at included
    changed = new.filter(pc.equal(new["image_id"], astronaut))
    assert len(set(changed["computed_at"].to_pylist()) - set(old["computed_at"].to_pylist())) == 1


# --- bad input ---------------------------------------------------------------------------------------------


def test_bad_entries_go_to_errors_and_the_rest_is_written(aligned, tmp_path):
    warehouse = tmp_path / "wh"
    shutil.copytree(aligned, warehouse)
    doc = {
        "images": [
            {"id": 1, "file_name": "astronaut.jpg", "width": 512, "height": 512},
            {"id": 2, "file_name": "missing.jpg", "width": 10, "height": 10},
        ],
        "annotations": [
            {"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50]},
            {"image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 50]},
            {"image_id": 1, "category_id": 7, "bbox": [10, 10, 50, 50]},
            {"image_id": 2, "category_id": 1, "bbox": [1, 1, 2, 2]},
        ],
        "categories": [{"id": 1, "name": "face"}],
    }
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    report = write_annotations(warehouse, path)
    assert report.regions == 1
    errors = pq.read_table(partition_file(warehouse, "errors", source="annotations")).to_pylist()
    reasons = " | ".join(e["reason"] for e in errors)
    assert len(errors) == 3
    assert "zero area" in reasons and "unknown category id 7" in reasons and "unknown image" in reasons
    assert write_alignment(warehouse, "clip").rows_written > 0  # the run goes on with the good region
    catalog_errors = partition_file(warehouse, "errors", source="catalog")
    assert catalog_errors.is_file()  # the other sources' errors are untouched

    table_before = partition_file(warehouse, "annotations").read_bytes()
    neither = tmp_path / "neither.json"
    neither.write_text(json.dumps({"rows": []}))
    with pytest.raises(AnnotationFormatError, match=r"COCO.*WikiChurches"):
        write_annotations(warehouse, neither)
    assert partition_file(warehouse, "annotations").read_bytes() == table_before  # nothing lost
