"""The alignment tab without a browser: the shaping of its data (dashboards.alignment_views) on hand-built
tables, and the tab over a tiny warehouse with the sample annotations, checked against the stored Parquet
files read with pyarrow (an independent route from the query layer's SQL)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from dashboards import alignment_views as av
from tests.dashboard_fixtures import aligned_dashboard_warehouse, dashboard_warehouse, expected_map, open_explorer

if TYPE_CHECKING:
    from dashboards.app import AttentionExplorer
    from dashboards.tabs.alignment import AlignmentTab

ALIGNED_MODELS = ("dinov2", "clip", "resnet50")  # the others have maps but no alignment


@pytest.fixture(scope="module")
def aligned(tiny_warehouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return aligned_dashboard_warehouse(tiny_warehouse, tmp_path_factory.mktemp("aligned") / "wh", ALIGNED_MODELS)


@pytest.fixture
def explorer(aligned: Path) -> AttentionExplorer:
    app = open_explorer(aligned)
    app.session.tab = "alignment"
    return app


def tab_of(explorer: AttentionExplorer) -> AlignmentTab:
    tab = explorer.tabs["alignment"]
    tab.__panel__()  # built as the page builds it
    return tab  # type: ignore[return-value]


def stored_ranking(warehouse: Path, model: str, method: str, **equal: object) -> pa.Table:
    table = pq.read_table(warehouse / "head_ranking" / f"model={model}" / f"method={method}" / "data.parquet")
    for column, value in equal.items():
        table = table.filter(pc.equal(table[column], value))
    return table


# --- shaping, on hand-built tables -------------------------------------------------------------------------


def test_score_grid_places_each_entry_in_its_layer_and_column() -> None:
    table = pa.table(
        {
            "layer": [0, 0, 1, 1, 1, 7],
            "entry": ["head 1", "fused", "head 0", "uniform", "centre_gaussian", "head 0"],
            "mean": [0.5, 0.25, 0.125, None, 0.75, 9.0],
            "n_images": [3, 3, 2, 0, 2, 1],
        }
    )
    grid = av.score_grid(table, [0, 1], num_heads=2, per_head=True)
    assert grid.entries == ("head 0", "head 1", "", "fused", "uniform", "centre_gaussian")
    nan = np.nan
    expected = np.array([[nan, 0.5, nan, 0.25, nan, nan], [0.125, nan, nan, nan, nan, 0.75]])
    np.testing.assert_array_equal(grid.values, expected)  # layer 7 is not shown; a null mean stays NaN
    assert grid.n_images.tolist() == [[0, 3, 0, 3, 0, 0], [2, 0, 0, 0, 0, 2]]
    assert (grid.column(1), grid.column(None), grid.column(5)) == (1, 3, None)


def test_a_method_without_heads_has_the_fused_map_and_the_baselines_only() -> None:
    assert av.grid_entries(12, per_head=False) == ("fused", "uniform", "centre_gaussian")
    assert av.grid_entries(0, per_head=True) == ("fused", "uniform", "centre_gaussian")  # a CNN
    labels = [av.entry_label(e, False, "Grad-CAM") for e in av.grid_entries(0, False)]
    assert labels == ["Grad-CAM", "uniform", "centre"]


@pytest.mark.parametrize("head", [None, 0, 11])
def test_entries_and_heads_name_each_other(head: int | None) -> None:
    assert av.entry_head(av.head_entry(head)) == head
    assert av.entry_head("uniform") == "uniform"  # a baseline: no map, no head


def test_exported_tables_hold_what_the_table_shows() -> None:
    ranking = pa.table(
        {
            "rank": [1, 2],
            "entry": ["head 1", "uniform"],
            "mean": [0.5, 0.25],
            "ci_low": [0.4, 0.2],
            "ci_high": [0.6, 0.3],
            "median": [0.45, 0.25],
            "n_images": [4, 4],
            "head_rank": [1, None],
        }
    )
    frame = av.ranking_frame(ranking)
    table = av.ranking_table(frame, "clip", "cls", 3, "kl", "face")
    assert table.column_names[:5] == ["model", "method", "layer", "metric", "feature"]
    assert table.select(list(av.RANKING_COLUMNS)).to_pylist() == ranking.to_pylist()
    assert set(table["feature"].to_pylist()) == {"face"} and set(table["layer"].to_pylist()) == {3}


# --- the tab over a warehouse with alignment -----------------------------------------------------------------


def test_the_features_are_those_of_the_annotations(explorer: AttentionExplorer, aligned: Path) -> None:
    tab = tab_of(explorer)
    explorer.session.apply_query({"model": "dinov2", "method": "cls"})
    regions = pq.read_table(aligned / "annotations" / "data.parquet")
    assert tab.param.feature.objects == ["all", *sorted(set(regions["feature"].to_pylist()))]
    assert tab.available


@pytest.mark.parametrize(("metric", "feature"), [("iou_50", "all"), ("kl", "face")])
def test_the_grid_and_the_ranking_hold_the_stored_means(
    explorer: AttentionExplorer, aligned: Path, metric: str, feature: str
) -> None:
    tab = tab_of(explorer)
    explorer.session.apply_query({"model": "dinov2", "method": "cls", "layer": 1, "metric": metric, "feature": feature})
    assert (tab.metric, tab.feature) == (metric, feature)
    stored = stored_ranking(aligned, "dinov2", "cls", metric=metric, feature=feature).to_pylist()
    drawn = dict(zip(zip(tab.grid.source.data["row"], tab.grid.source.data["column"], strict=True),
                     tab.grid.source.data["value"], strict=True))  # fmt: skip
    labels = {"fused": "fused", "uniform": "uniform", "centre_gaussian": "centre"}
    for row in stored:
        column = labels.get(row["entry"], row["entry"].removeprefix("head "))
        assert drawn[(f"block {row['layer']}", column)] == pytest.approx(row["mean"], nan_ok=True)
    assert len(drawn) == len(stored)  # every stored entry once, nothing else (the spacer column is not drawn)
    layer_rows = sorted((r for r in stored if r["layer"] == 1), key=lambda r: r["rank"])
    assert [r["rank"] for r in layer_rows] == tab.ranking.value["rank"].tolist()
    assert tab.ranking.value["mean"].tolist() == pytest.approx([r["mean"] for r in layer_rows])


def test_clicks_select_the_layer_head_and_feature(explorer: AttentionExplorer, aligned: Path) -> None:
    tab, session = tab_of(explorer), explorer.session
    session.apply_query({"image": "chelsea.jpg", "model": "dinov2", "method": "cls", "layer": 1, "head": "fused"})
    tab.on_grid_tap(0, 2)  # first row (block 0), third column (head 2)
    assert (session.selection.layer, session.selection.head) == (0, 2)
    tab.on_grid_tap(1, tab._score.entries.index("uniform"))  # a baseline: the layer, but the head stays
    assert (session.selection.layer, session.selection.head) == (1, 2)
    tab.on_grid_tap(1, tab._score.entries.index(""))  # the blank column: nothing
    assert (session.selection.layer, session.selection.head) == (1, 2)
    matrix = tab._matrix
    tab.on_matrix_tap(matrix.entries.index("head 3"), matrix.features.index("face"))
    assert (session.selection.head, tab.feature) == (3, "face")
    frame = tab.ranking.value
    row = frame.index[frame["entry"] == "fused"][0]
    tab.on_ranking_click(type("Click", (), {"row": int(row)})())
    assert session.selection.head is None


def test_the_exemplars_are_the_best_images_with_their_head_and_fused_maps(
    explorer: AttentionExplorer, aligned: Path
) -> None:
    tab, session = tab_of(explorer), explorer.session
    session.apply_query({"model": "dinov2", "method": "cls", "layer": 1, "head": 2, "metric": "coverage"})
    scores = pq.read_table(aligned / "alignment" / "model=dinov2" / "method=cls" / "shard=0" / "data.parquet")
    scores = scores.to_pylist()
    mine = [
        r for r in scores if r["layer"] == 1 and r["head"] == 2 and r["feature"] == "all" and r["map_kind"] == "map"
    ]
    best = sorted((r for r in mine if r["coverage"] is not None), key=lambda r: (-r["coverage"], r["image_id"]))[:4]
    names = {i["image_id"]: i["file_name"] for i in pq.read_table(aligned / "images" / "data.parquet").to_pylist()}
    for k, row in enumerate(best):
        pair = tab.pairs[k]
        assert pair.layout.visible and f"{k + 1}. {names[row['image_id']]}" in pair.caption.object
        for figure, head in ((pair.head, 2), (pair.fused, None)):
            shown = np.flipud(figure.heat.data["image"][0])
            np.testing.assert_array_equal(shown, expected_map(aligned, "dinov2", "cls", row["image_id"], 1, head))
        assert pair.head_holder.visible
    session.head = -1  # fused: its own best images, each shown once
    assert not any(pair.head_holder.visible for pair in tab.pairs if pair.layout.visible)


def test_a_method_without_heads_compares_its_map_with_the_baselines(explorer: AttentionExplorer) -> None:
    tab, session = tab_of(explorer), explorer.session
    for query in ({"model": "clip", "method": "rollout"}, {"model": "resnet50"}):
        session.apply_query(query)
        assert tab._score.entries == ("fused", "uniform", "centre_gaussian")
        assert sorted(tab.ranking.value["entry"]) == ["centre_gaussian", "fused", "uniform"]
        assert tab._matrix.entries == ("fused", "uniform", "centre_gaussian")
        assert not any(pair.head_holder.visible for pair in tab.pairs if pair.layout.visible)
        assert "has no per-head maps" in tab.note


def test_bad_url_values_are_named_and_replaced(explorer: AttentionExplorer) -> None:
    tab, session = tab_of(explorer), explorer.session
    session.apply_query({"model": "dinov2", "method": "cls", "metric": "nope", "feature": "unicorn"})
    assert "metric “nope” is not valid (valid: iou_50, " in session.notice
    assert "showing metric=iou_50" in session.notice
    assert "feature “unicorn” is not valid (valid: all, " in session.notice and "showing feature=all" in session.notice
    assert (tab.metric, tab.feature) == ("iou_50", "all")
    session.apply_query({"model": "dinov2", "method": "cls", "metric": "kl", "feature": "face"})
    assert session.notice == "" and session.query()["metric"] == "kl" and session.query()["feature"] == "face"


def test_without_alignment_the_tab_says_how_to_add_annotations(explorer: AttentionExplorer, aligned: Path) -> None:
    tab, session = tab_of(explorer), explorer.session
    session.apply_query({"model": "dinov2", "method": "cls", "feature": "face"})
    session.apply_query({"model": "mae", "method": "cls"})  # maps, but no alignment
    assert not tab.available and tab.feature == "all" and tab.param.feature.objects == ["all"]
    for needed in ("mae/cls", "--annotations FILE", "COCO instances JSON", "WikiChurches", "building_parts.json",
                   "data/samples/annotations.json", str(aligned)):  # fmt: skip
        assert needed in tab.missing, needed


def test_back_from_a_model_without_alignment_the_views_are_drawn(explorer: AttentionExplorer) -> None:
    tab, session = tab_of(explorer), explorer.session
    session.apply_query({"model": "mae", "method": "cls", "tab": "alignment"})
    assert not tab.available
    session.model = "dinov2"  # the control, as a user switches
    assert tab.available and tab.problem == ""
    assert tab.grid.source.data["value"] and len(tab.ranking.value) == 4 + 1 + 2  # 4 heads, fused, baselines


def test_a_warehouse_without_annotations_shows_the_message(tiny_warehouse: Path, tmp_path: Path) -> None:
    app = open_explorer(dashboard_warehouse(tiny_warehouse, tmp_path / "wh"))
    tab = app.tabs["alignment"]
    assert not tab.available and "ssl-attention run" in tab.missing and "--annotations" in tab.missing


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_exports_equal_the_table_and_the_matrix(explorer: AttentionExplorer, aligned: Path, fmt: str) -> None:
    tab, session = tab_of(explorer), explorer.session
    session.apply_query({"model": "clip", "method": "cls", "layer": 1, "metric": "iou_90", "feature": "face"})

    def read(download: object) -> pa.Table:
        data = download.data.getvalue()  # type: ignore[attr-defined]
        return pacsv.read_csv(io.BytesIO(data)) if fmt == "csv" else pq.read_table(io.BytesIO(data))

    ranking = read(tab.ranking_export(fmt))
    shown = tab.ranking.value
    assert ranking["entry"].to_pylist() == shown["entry"].tolist()
    assert ranking["mean"].to_pylist() == pytest.approx(shown["mean"].tolist())
    assert ranking["ci_low"].to_pylist() == pytest.approx(shown["ci_low"].tolist())
    assert set(ranking["feature"].to_pylist()) == {"face"} and set(ranking["model"].to_pylist()) == {"clip"}
    matrix = read(tab.matrix_export(fmt))
    stored = stored_ranking(aligned, "clip", "cls", layer=1, metric="iou_90").to_pylist()
    expected = {(r["entry"], r["feature"]): r["mean"] for r in stored if r["feature"] != "all"}
    got = {(e, f): m for e, f, m in zip(*(matrix[c].to_pylist() for c in ("entry", "feature", "mean")), strict=True)}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, nan_ok=True) or (got[key] is None and value is None), key


def test_a_tap_on_the_heat_grid_names_the_cell_from_the_top() -> None:
    from bokeh.events import Tap

    from dashboards.heatgrid import HeatGrid

    taps: list[tuple[int, int]] = []
    grid = HeatGrid(lambda row, column: taps.append((row, column)), "test-grid")
    grid.render(np.arange(6, dtype=float).reshape(3, 2), ["a", "b", "c"], ["x", "y"], "viridis", "t", "v")
    for x, y in ((0.5, 2.5), (1.9, 0.1), (2.5, 0.5), (0.5, -0.1)):  # top left, bottom right, outside twice
        grid._tapped(Tap(grid.figure, x=x, y=y))
    assert taps == [(0, 0), (2, 1)]
    assert grid.source.data["value"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert grid.source.data["y"][:2] == [2.5, 2.5]  # row 0 at the top


@pytest.mark.parametrize("cmap", ["magma", "gray"])
def test_every_part_draws_with_the_chosen_palette(explorer: AttentionExplorer, cmap: str) -> None:
    from bokeh import palettes

    tab, session = tab_of(explorer), explorer.session
    session.apply_query({"model": "dinov2", "method": "cls", "layer": 1, "head": 1, "cmap": cmap})
    expected = list({"magma": palettes.Magma256, "gray": palettes.Greys256}[cmap])  # as ssl_attention.render
    mappers = [tab.grid.mapper, tab.matrix.mapper, tab.pairs[0].head.mapper, tab.pairs[0].fused.mapper]
    for mapper in mappers:
        assert list(mapper.palette) == expected
