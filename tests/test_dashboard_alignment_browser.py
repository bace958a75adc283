"""The Alignment tab in a real browser (Playwright driving Debian's Chromium, as tests/test_dashboard_browser.py):
the ranking table's order against the SQL view, a click on a head and its exemplars, the message without
annotations, the URL's metric and feature (round trip, Back, notices), the exports and the layout at 1024 px.

Skipped when /usr/bin/chromium is missing, unless SSL_ATTENTION_REQUIRE_BROWSER=1 (then they fail).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from bench.browser import browser_missing_reason, launch_chromium
from ssl_attention.query import open_warehouse
from tests.dashboard_fixtures import (
    aligned_dashboard_warehouse,
    browser_required,
    dashboard_warehouse,
    expected_map,
    serve_threaded,
)
from tests.test_dashboard_browser import (
    ARTIFACTS,
    CUT_OFF_JS,
    FRAME_JS,
    notice_text,
    wait_for_query,
    wait_for_widget,
)

pytestmark = pytest.mark.browser

ALIGNED_MODELS = ("dinov2", "clip", "resnet50")
EXEMPLARS = 4  # dashboards.tabs.alignment.EXEMPLARS
ENTRY_CELLS = ".alignment-ranking .tabulator-row .tabulator-cell[tabulator-field='entry']"
MEAN_CELLS = ".alignment-ranking .tabulator-row .tabulator-cell[tabulator-field='mean']"
# The map plotted in the figure named by the argument (rows bottom-up, as Bokeh holds them)
PLOTTED_BY_NAME_JS = """(name) => {
  const fig = [...Bokeh.documents[0].all_models].find(m => m.name === name);
  const a = fig?.renderers.find(r => r.glyph?.type === 'Image')?.data_source.data.image?.[0];
  return a ? {shape: a.shape, values: Array.from(a)} : null;
}"""
# The order of the SQL view, as docs/sql.md documents head_ranking: by rank, maps before baselines, fused first
RANKING_VIEW_SQL = """SELECT entry, mean FROM head_ranking
WHERE model = $model AND method = $method AND layer = $layer AND metric = $metric AND feature = $feature
ORDER BY rank, map_kind <> 'map', head NULLS FIRST"""


@pytest.fixture(scope="module", autouse=True)
def _need_browser() -> None:
    reason = browser_missing_reason()
    if reason is None:
        return
    if browser_required():
        pytest.fail(f"browser tests required (SSL_ATTENTION_REQUIRE_BROWSER=1) but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def aligned(tiny_warehouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return aligned_dashboard_warehouse(tiny_warehouse, tmp_path_factory.mktemp("aligned") / "wh", ALIGNED_MODELS)


@pytest.fixture(scope="module")
def server(aligned: Path, tiny_warehouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    from dashboards.app import create_app

    plain = dashboard_warehouse(tiny_warehouse, tmp_path_factory.mktemp("plain") / "wh")
    with serve_threaded({"app": lambda: create_app(aligned), "plain": lambda: create_app(plain)}) as port:
        yield port


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()


def open_alignment(page: Any, port: int, query: str, route: str = "app") -> None:
    page.goto(f"http://localhost:{port}/{route}?tab=alignment&{query}")
    page.wait_for_function("() => !!window.Bokeh?.documents?.[0]")


def shown_entries(page: Any, count: int) -> list[str]:
    page.locator(ENTRY_CELLS).nth(count - 1).wait_for()
    return page.locator(ENTRY_CELLS).all_inner_texts()


def sql_ranking(warehouse: Path, **params: Any) -> list[dict[str, Any]]:
    return open_warehouse(warehouse).sql(RANKING_VIEW_SQL, params).to_pylist()


def wait_for_entries(page: Any, expected: list[str], timeout_s: float = 15.0) -> None:
    """The table's rows (through the page's shadow roots, which Playwright's locators pierce) become ``expected``."""
    for _ in range(int(timeout_s * 10)):
        if page.locator(ENTRY_CELLS).all_inner_texts() == expected:
            return
        page.wait_for_timeout(100)
    assert page.locator(ENTRY_CELLS).all_inner_texts() == expected


@pytest.mark.parametrize(
    ("model", "method", "metric", "feature"),
    [("dinov2", "cls", "iou_50", "all"), ("clip", "mean", "kl", "face"), ("clip", "rollout", "coverage", "all")],
)
def test_the_ranking_table_is_in_the_order_of_the_sql_view(
    page: Any, server: int, aligned: Path, model: str, method: str, metric: str, feature: str
) -> None:
    params = {"model": model, "method": method, "layer": 1, "metric": metric, "feature": feature}
    expected = sql_ranking(aligned, **params)
    open_alignment(page, server, "&".join(f"{k}={v}" for k, v in params.items()))
    assert shown_entries(page, len(expected)) == [r["entry"] for r in expected]
    means = [float(text) for text in page.locator(MEAN_CELLS).all_inner_texts()]
    assert means == pytest.approx([r["mean"] for r in expected], abs=5e-5)  # shown with 4 decimals
    # sortable: a click on the mean's header sorts the rows by it
    page.locator(".alignment-ranking .tabulator-col[tabulator-field='mean'] .tabulator-col-title").click()
    page.wait_for_timeout(300)
    resorted = [float(text) for text in page.locator(MEAN_CELLS).all_inner_texts()]
    assert resorted in (sorted(means), sorted(means, reverse=True)) and len(resorted) == len(means)


def test_clicking_a_head_shows_its_exemplars_beside_the_fused_map(page: Any, server: int, aligned: Path) -> None:
    open_alignment(page, server, "model=dinov2&method=cls&layer=1&head=fused&metric=coverage")
    expected = sql_ranking(aligned, model="dinov2", method="cls", layer=1, metric="coverage", feature="all")
    shown_entries(page, len(expected))
    page.locator(ENTRY_CELLS).get_by_text("head 2", exact=True).click()  # a row of the ranking
    wait_for_query(page, head="2", layer="1")
    best = open_warehouse(aligned).exemplars("dinov2", "cls", 1, 2, "all", "coverage", limit=EXEMPLARS).to_pylist()
    captions = page.locator(".exemplar-caption")
    for k, row in enumerate(best):
        captions.nth(k).get_by_text(f"{k + 1}. {row['file_name']}").wait_for()
        for name, head in ((f"exemplar-{k}-head", 2), (f"exemplar-{k}-fused", None)):
            plotted = page.evaluate(PLOTTED_BY_NAME_JS, name)
            rows, cols = plotted["shape"]
            drawn = np.flipud(np.asarray(plotted["values"], dtype=np.float32).reshape(rows, cols))
            np.testing.assert_array_equal(drawn, expected_map(aligned, "dinov2", "cls", row["image_id"], 1, head))

    # a click on a cell of the layers x heads grid: block 0 (the first row), head 3 (the fourth column)
    box = page.evaluate(FRAME_JS, "alignment-grid")
    rows, columns = 2, 4 + 1 + 3  # 2 layers; 4 heads, a blank column, fused and the two baselines
    page.mouse.click(box["x"] + (3 + 0.5) * box["width"] / columns, box["y"] + 0.5 * box["height"] / rows)
    wait_for_query(page, head="3", layer="0")
    best = open_warehouse(aligned).exemplars("dinov2", "cls", 0, 3, "all", "coverage", limit=EXEMPLARS).to_pylist()
    captions.first.get_by_text(f"1. {best[0]['file_name']}").wait_for()
    page.wait_for_function(
        "(name) => [...Bokeh.documents[0].all_models].find(m => m.name === name)?.title?.text"
        "?.startsWith('Head 3 · coverage ')",
        arg="exemplar-0-head",
    )


def test_without_annotations_the_tab_says_how_to_add_them(page: Any, server: int) -> None:
    open_alignment(page, server, "model=dinov2&method=cls", route="plain")
    heading = page.get_by_text("Alignment of dinov2/cls: no annotations scored yet")
    heading.wait_for()
    text = heading.locator("xpath=..").inner_text()  # the whole message
    for needed in ("--annotations FILE", "COCO instances JSON", "WikiChurches", "data/samples/annotations.json"):
        assert needed in text, needed
    assert not page.locator(".alignment-ranking").is_visible()  # no empty plots or tables
    assert not page.locator(".exemplar-caption").first.is_visible()
    assert not page.locator(".bk-Canvas >> visible=true").count() > 1  # the thumbnails only


def test_url_metric_and_feature_round_trip_with_notices(page: Any, server: int, aligned: Path) -> None:
    open_alignment(page, server, "model=dinov2&method=cls&layer=1&metric=kl&feature=face")
    wait_for_widget(page, "Metric", value="kl")
    wait_for_widget(page, "Feature", value="face")
    expected = sql_ranking(aligned, model="dinov2", method="cls", layer=1, metric="kl", feature="face")
    assert shown_entries(page, len(expected)) == [r["entry"] for r in expected]
    page.get_by_label("Metric").select_option("Coverage (mass inside the regions)")
    wait_for_query(page, metric="coverage", feature="face", tab="alignment")
    expected = sql_ranking(aligned, model="dinov2", method="cls", layer=1, metric="coverage", feature="face")
    wait_for_entries(page, [r["entry"] for r in expected])
    page.wait_for_timeout(800)  # the URL settles (dashboards/url_sync.py)
    page.go_back()
    wait_for_widget(page, "Metric", value="kl")
    wait_for_query(page, metric="kl", feature="face")

    open_alignment(page, server, "model=dinov2&method=cls&metric=nope&feature=unicorn")
    text = notice_text(page)
    assert "metric “nope” is not valid (valid: iou_50," in text and "showing metric=iou_50" in text
    assert "feature “unicorn” is not valid (valid: all," in text and "showing feature=all" in text
    wait_for_widget(page, "Metric", value="iou_50")
    wait_for_widget(page, "Feature", value="all")


@pytest.mark.parametrize(("kind", "fmt"), [("ranking", "csv"), ("ranking", "parquet"), ("matrix", "csv")])
def test_exports_equal_the_table(page: Any, server: int, aligned: Path, kind: str, fmt: str) -> None:
    open_alignment(page, server, "model=clip&method=cls&layer=1&metric=iou_90&feature=all")
    expected = sql_ranking(aligned, model="clip", method="cls", layer=1, metric="iou_90", feature="all")
    shown = shown_entries(page, len(expected))
    label = f"{kind.capitalize()} {'CSV' if fmt == 'csv' else 'Parquet'}"
    with page.expect_download() as download:
        page.get_by_role("button", name=label).click()
    data = Path(download.value.path()).read_bytes()
    table = pacsv.read_csv(io.BytesIO(data)) if fmt == "csv" else pq.read_table(io.BytesIO(data))
    if kind == "ranking":
        assert download.value.suggested_filename == f"clip_cls_layer1_iou_90_all_ranking.{fmt}"
        assert table["entry"].to_pylist() == shown
        assert table["mean"].to_pylist() == pytest.approx([r["mean"] for r in expected])
    else:
        matrix = open_warehouse(aligned).head_feature_matrix("clip", "cls", 1, "iou_90")
        got = {(e, f): m for e, f, m in zip(*(table[c].to_pylist() for c in ("entry", "feature", "mean")), strict=True)}
        for i, entry in enumerate(matrix.entries):
            for j, feature in enumerate(matrix.features):
                value = matrix.values[i, j]
                assert (
                    (got[(entry, feature)] is None)
                    if np.isnan(value)
                    else got[(entry, feature)] == pytest.approx(value)
                )


@pytest.mark.parametrize("query", ["model=dinov2&method=cls&head=2", "model=clip&method=rollout", "route=plain"])
def test_nothing_on_the_alignment_tab_is_cut_off_at_1024_by_768(browser: Any, server: int, query: str) -> None:
    context = browser.new_context(viewport={"width": 1024, "height": 768})
    page = context.new_page()
    page.set_default_timeout(15_000)
    try:
        route = "plain" if query == "route=plain" else "app"
        page.goto(f"http://localhost:{server}/{route}?tab=alignment&layer=1&{query}")
        page.wait_for_function("() => !!window.Bokeh?.documents?.[0]")
        if route == "app":
            page.locator(ENTRY_CELLS).first.wait_for()
        page.wait_for_timeout(1500)  # the open tab's plots are laid out
        layout = page.evaluate(CUT_OFF_JS)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"cut_off_1024_alignment_{route}_{query[:20]}.png"), full_page=True)
        assert layout["cut"] == [], layout
        assert layout["scroll"] <= layout["inner"], layout
    finally:
        context.close()
