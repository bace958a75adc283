"""The annotated regions on the Heads tab's maps, in Chromium through the real page: the outlines Bokeh holds are
the stored regions carried through the model's stored transform (recomputed here from the Parquet rows), the
scores beside each map are the alignment rows of that image, the toggle says why it cannot be used, the URL
keeps it; and the contour scale mode, the titles' style after another tab, and the 1024-px layout.

A screenshot per test goes to tests/artifacts/ (git-ignored). Skipped when /usr/bin/chromium is missing, unless
SSL_ATTENTION_REQUIRE_BROWSER=1 (then they fail).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench.browser import DOC_READY_JS, browser_missing_reason, launch_chromium
from ssl_attention.alignment.compute import write_alignment
from ssl_attention.alignment.store import write_annotations
from ssl_attention.registry import MODELS
from ssl_attention.warehouse.paths import partition_file
from tests.dashboard_fixtures import browser_required, dashboard_warehouse, expected_map, image_id_of, serve_threaded
from tests.outline_helpers import cells_enclosed, top_mass_cells
from tests.sql_helpers import SAMPLE_ANNOTATIONS

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
UNANNOTATED = "chelsea.jpg"  # left out of the partial warehouse's annotation file

# The regions a figure draws (its Quad outlines and their labels) and the extent of its input image, by name.
REGIONS_JS = """(name) => {
  const plot = [...Bokeh.documents[0].all_models].find(m => m.type === 'Plot' && m.name === name);
  if (!plot) return null;
  const quad = plot.renderers.find(r => r.glyph?.type === 'Quad');
  const base = plot.renderers.find(r => r.glyph?.type === 'ImageRGBA');
  const labels = plot.center.find(m => m.type === 'LabelSet');
  const d = quad.data_source.data;
  return {left: Array.from(d.left), right: Array.from(d.right), bottom: Array.from(d.bottom), top: Array.from(d.top),
    text: Array.from(labels.source.data.text), dw: base.data_source.data.dw[0], dh: base.data_source.data.dh[0]};
}"""
# The contour segments a figure draws and the extent of its map image.
OUTLINE_JS = """(name) => {
  const plot = [...Bokeh.documents[0].all_models].find(m => m.type === 'Plot' && m.name === name);
  const seg = plot.renderers.find(r => r.glyph?.type === 'Segment').data_source.data;
  const heat = plot.renderers.find(r => r.glyph?.type === 'Image').data_source.data;
  return {x0: Array.from(seg.x0), y0: Array.from(seg.y0), x1: Array.from(seg.x1), y1: Array.from(seg.y1),
    dw: heat.dw[0], dh: heat.dh[0], shape: heat.image[0].shape, values: Array.from(heat.image[0])};
}"""
TOGGLE_JS = """() => {
  const m = [...Bokeh.documents[0].all_models].find(m => m.type === 'Toggle');
  return m ? {label: m.label, active: m.active, disabled: m.disabled} : null;
}"""
# The overlays' title views: what Bokeh draws them with.
TITLE_FONTS_JS = """() => {
  const all = [];
  const walk = (v) => { if (!v || all.includes(v)) return; all.push(v); (v.child_views ?? []).forEach(walk);
    (v.renderer_views ? [...v.renderer_views.values()] : []).forEach(walk); };
  (typeof Bokeh.index.values === 'function' ? [...Bokeh.index.values()] : Object.values(Bokeh.index)).forEach(walk);
  return all.filter(v => v.model?.type === 'Title' && v.model.text)
    .map(v => [v.model.text, v.visuals.text.font_value(), v.model.text_color, Math.round(v.bbox.height)]);
}"""
CUT_OFF_JS = """() => {
  const out = [];
  const walk = (root) => { for (const e of root.querySelectorAll('*')) {
    const r = e.getBoundingClientRect();
    if (r.width > 0 && r.height > 0 && r.right > window.innerWidth + 0.5)
      out.push(`${e.tagName}.${e.className} right=${r.right}`);
    if (e.shadowRoot) walk(e.shadowRoot); } };
  walk(document);
  return {cut: out.slice(0, 10), scroll: document.documentElement.scrollWidth, inner: window.innerWidth};
}"""


@pytest.fixture(scope="module", autouse=True)
def _need_browser() -> None:
    reason = browser_missing_reason()
    if reason is None:
        return
    if browser_required():
        pytest.fail(f"browser tests required (SSL_ATTENTION_REQUIRE_BROWSER=1) but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def annotated(tiny_warehouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dashboard's warehouse with the sample annotations and every model's alignment."""
    warehouse = dashboard_warehouse(tiny_warehouse, tmp_path_factory.mktemp("overlay") / "warehouse")
    write_annotations(warehouse, SAMPLE_ANNOTATIONS)
    for slug in MODELS:
        write_alignment(warehouse, slug)
    return warehouse


@pytest.fixture(scope="module")
def server(annotated: Path, tiny_warehouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    from dashboards.app import create_app

    bare = dashboard_warehouse(tiny_warehouse, tmp_path_factory.mktemp("bare") / "warehouse")  # no annotations
    partial = tmp_path_factory.mktemp("partial") / "warehouse"
    shutil.copytree(annotated, partial)
    coco = json.loads(SAMPLE_ANNOTATIONS.read_text())
    left_out = next(i["id"] for i in coco["images"] if i["file_name"] == UNANNOTATED)
    coco["images"] = [i for i in coco["images"] if i["id"] != left_out]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != left_out]
    partial_file = partial.parent / "annotations.json"
    partial_file.write_text(json.dumps(coco))
    write_annotations(partial, partial_file)
    routes = {
        "app": lambda: create_app(annotated),
        "bare": lambda: create_app(bare),
        "partial": lambda: create_app(partial),
    }
    with serve_threaded(routes) as port:
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
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()


# --- helpers ---------------------------------------------------------------------------------------------------


def open_app(page: Any, port: int, query: str, route: str = "app") -> None:
    page.goto(f"http://localhost:{port}/{route}{query}")
    page.wait_for_function(DOC_READY_JS)


def drawn_regions(page: Any, name: str, count: int | None = None) -> dict[str, Any]:
    """The regions figure ``name`` draws, once it draws ``count`` of them (any number > 0 when None)."""
    page.wait_for_function(
        f"(n) => {{ const r = ({REGIONS_JS})('{name}'); return !!r && (n === null ? r.left.length > 0"
        " : r.left.length === n); }",
        arg=count,
    )
    return page.evaluate(REGIONS_JS, name)


def in_input_pixels(drawn: dict[str, Any], input_w: int, input_h: int) -> list[tuple[str, float, float, float, float]]:
    """The drawn boxes back in input pixels (y downwards): the input image spans [0, dw] x [0, dh] of the plot."""
    boxes = []
    for k, text in enumerate(drawn["text"]):
        x0, x1 = drawn["left"][k] / drawn["dw"] * input_w, drawn["right"][k] / drawn["dw"] * input_w
        y0 = (1 - drawn["top"][k] / drawn["dh"]) * input_h
        y1 = (1 - drawn["bottom"][k] / drawn["dh"]) * input_h
        boxes.append((text, x0, y0, x1, y1))
    return sorted(boxes)


def stored_regions_in_view(warehouse: Path, image_id: str, model: str) -> tuple[list[Any], int, int, tuple[int, int]]:
    """The annotations rows of the image through the model's inputs row, by hand: x * scale_x - crop_left, then
    clipped to the input; regions left wholly outside are dropped, the cut ones labelled "(cut)". Also the input
    size and how many of the image's regions the crop (cut, left wholly outside)."""
    (transform,) = rows_of(partition_file(warehouse, "inputs", model=model, shard="0"), image_id)
    rows = rows_of(partition_file(warehouse, "annotations"), image_id)
    width, height = transform["input_w"], transform["input_h"]
    expected, cut, outside = [], 0, 0
    for r in rows:
        x0 = r["x0"] * transform["scale_x"] - transform["crop_left"]
        x1 = r["x1"] * transform["scale_x"] - transform["crop_left"]
        y0 = r["y0"] * transform["scale_y"] - transform["crop_top"]
        y1 = r["y1"] * transform["scale_y"] - transform["crop_top"]
        cx0, cx1 = min(max(x0, 0), width), min(max(x1, 0), width)
        cy0, cy1 = min(max(y0, 0), height), min(max(y1, 0), height)
        whole, seen = (x1 - x0) * (y1 - y0), (cx1 - cx0) * (cy1 - cy0)
        cut += 0 < seen < whole
        outside += seen <= 0
        if seen > 0:
            expected.append((r["feature"] + (" (cut)" if seen < whole else ""), cx0, cy0, cx1, cy1))
    return sorted(expected), width, height, (cut, outside)


def rows_of(path: Path, image_id: str) -> list[dict[str, Any]]:
    """The rows of one image in a Parquet file, as dicts (columns without the JPEG)."""
    columns = [c for c in pq.read_schema(path).names if c != "jpeg"]
    return [r for r in pq.read_table(path, columns=columns).to_pylist() if r["image_id"] == image_id]


def alignment_rows(
    warehouse: Path, model: str, method: str, image_id: str, layer: int, feature: str
) -> list[dict[str, Any]]:
    rows = rows_of(partition_file(warehouse, "alignment", model=model, method=method, shard="0"), image_id)
    return [r for r in rows if (r["layer"], r["feature"]) == (layer, feature)]


def shown_scores(page: Any, map_label: str) -> dict[str, dict[str, str]]:
    """entry -> metric -> data-value of the scores table beside the map ``map_label`` ("fused", "head 2")."""
    table = page.locator(f'table.region-scores[data-map="{map_label}"]')
    table.wait_for()
    scores: dict[str, dict[str, str]] = {}
    for row in table.locator("tr[data-entry]").all():
        cells = row.locator("td[data-metric]").all()
        scores[row.get_attribute("data-entry")] = {
            c.get_attribute("data-metric"): c.get_attribute("data-value") for c in cells
        }
    return scores


def expected_scores(rows: list[dict], head: int | None) -> dict[str, dict[str, str]]:
    def value(metric: str, v: Any) -> str:
        if v is None:
            return ""
        return str(int(v)) if metric == "pointing_hit" else repr(float(v))

    picked = {
        "map": next(r for r in rows if r["map_kind"] == "map" and r["head"] == head),
        "uniform": next(r for r in rows if r["map_kind"] == "uniform"),
        "centre_gaussian": next(r for r in rows if r["map_kind"] == "centre_gaussian"),
    }
    return {kind: {m: value(m, r[m]) for m in ("iou_90", "coverage", "pointing_hit")} for kind, r in picked.items()}


def wait_for_query(page: Any, **expected: str) -> None:
    page.wait_for_function(
        "(expected) => { const q = new URLSearchParams(location.search);"
        " return Object.entries(expected).every(([k, v]) => q.get(k) === v); }",
        arg=expected,
    )


def note_text(page: Any, part: str) -> str:
    """The text of the note beside the toggle, once it holds ``part``."""
    note = page.locator(".regions-note", has_text=part)
    note.wait_for()
    return note.inner_text()


# --- tests -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "file_name", "head"),
    [("dinov2", "astronaut.jpg", 1), ("clip", "rocket.jpg", 2), ("resnet50", "coffee.jpg", None)],
)
def test_the_overlay_draws_the_stored_regions_through_the_models_transform(
    page: Any, server: int, annotated: Path, model: str, file_name: str, head: int | None
) -> None:
    image = image_id_of(annotated, file_name)
    expected, width, height, _ = stored_regions_in_view(annotated, image, model)
    assert expected, "every sample image has regions in the view"
    head_query = "" if head is None else f"&head={head}"
    open_app(page, server, f"?image={file_name}&model={model}{head_query}&annotations=1")
    figures = ["fused-plot"] if head is None else ["fused-plot", "head-plot"]
    for name in figures:  # the same outlines on the fused map and on the head map
        drawn = in_input_pixels(drawn_regions(page, name, len(expected)), width, height)
        assert [d[0] for d in drawn] == [e[0] for e in expected], name
        np.testing.assert_allclose([d[1:] for d in drawn], [e[1:] for e in expected], atol=1e-6, err_msg=name)

    # one feature: only its regions; back off: none drawn
    feature = expected[0][0].removesuffix(" (cut)")
    page.get_by_label("Feature").select_option(feature)
    wait_for_query(page, regions=feature, annotations="1")
    mine = [e for e in expected if e[0].removesuffix(" (cut)") == feature]
    drawn = in_input_pixels(drawn_regions(page, "fused-plot", len(mine)), width, height)
    np.testing.assert_allclose([d[1:] for d in drawn], [e[1:] for e in mine], atol=1e-6)
    page.get_by_role("button", name="Annotations").click()
    wait_for_query(page, annotations="0")
    drawn_regions(page, "fused-plot", 0)
    assert not page.locator("table.region-scores").first.is_visible()


def test_regions_the_crop_cuts_or_leaves_out_are_clipped_and_named(page: Any, server: int, annotated: Path) -> None:
    """Somewhere in the samples a centre crop cuts a region: it is drawn clipped, labelled "(cut)", and the note
    counts what the crop did."""
    cases = [
        (model, file_name)
        for model in ("dinov2", "clip", "resnet50", "siglip")
        for file_name in ("astronaut.jpg", "rocket.jpg", "coffee.jpg")
        if stored_regions_in_view(annotated, image_id_of(annotated, file_name), model)[3][0]
    ]
    assert cases, "no sample region is cut by any crop: the test would prove nothing"
    model, file_name = cases[0]
    expected, width, height, (cut, outside) = stored_regions_in_view(
        annotated, image_id_of(annotated, file_name), model
    )
    open_app(page, server, f"?image={file_name}&model={model}&annotations=1")
    drawn = in_input_pixels(drawn_regions(page, "fused-plot", len(expected)), width, height)
    assert [d[0] for d in drawn] == [e[0] for e in expected]
    assert sum(d[0].endswith(" (cut)") for d in drawn) == cut
    for _, x0, y0, x1, y1 in drawn:
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height  # inside the input frame
    note = note_text(page, f"on {file_name}")
    assert f"{cut} cut by the model's crop (drawn clipped)" in note
    assert (f"{outside} wholly outside the model's view (not drawn)" in note) == (outside > 0), note


def test_the_scores_beside_each_map_are_the_alignment_rows(page: Any, server: int, annotated: Path) -> None:
    image = image_id_of(annotated, "astronaut.jpg")
    open_app(page, server, "?image=astronaut.jpg&model=dinov2&method=cls&layer=1&head=2&annotations=1&regions=face")
    rows = alignment_rows(annotated, "dinov2", "cls", image, 1, "face")
    assert shown_scores(page, "fused") == expected_scores(rows, None)
    assert shown_scores(page, "head 2") == expected_scores(rows, 2)

    page.get_by_label("Feature").select_option("all")
    page.locator('table.region-scores[data-feature="all"]').first.wait_for()
    rows = alignment_rows(annotated, "dinov2", "cls", image, 1, "all")
    assert shown_scores(page, "fused") == expected_scores(rows, None)
    page.get_by_label("Head").select_option("Head 3")
    page.locator('table.region-scores[data-map="head 3"]').wait_for()
    assert shown_scores(page, "head 3") == expected_scores(rows, 3)
    # layer 0: the baselines' rows of that layer
    open_app(page, server, "?image=astronaut.jpg&model=dinov2&method=cls&layer=0&head=fused&annotations=1")
    rows = alignment_rows(annotated, "dinov2", "cls", image, 0, "all")
    assert shown_scores(page, "fused") == expected_scores(rows, None)
    assert page.locator("table.region-scores").count() >= 1 and not page.locator('[data-map^="head"]').count()


def test_without_annotations_the_toggle_says_so(page: Any, server: int) -> None:
    open_app(page, server, "?image=astronaut.jpg&model=dinov2&annotations=1", route="bare")
    assert page.evaluate(TOGGLE_JS) == {"label": "No annotations", "active": True, "disabled": True}
    assert page.get_by_role("button", name="Annotations").is_disabled()
    text = note_text(page, "No annotations")
    assert "in this warehouse" in text and "ssl-attention run --annotations FILE" in text
    assert page.evaluate(REGIONS_JS, "fused-plot")["left"] == []

    open_app(page, server, f"?image={UNANNOTATED}&model=dinov2&annotations=1", route="partial")
    assert page.evaluate(TOGGLE_JS) == {"label": "No regions here", "active": True, "disabled": True}
    assert f"on {UNANNOTATED} (4 of the 5 images have some)" in note_text(page, "No annotated regions")
    assert page.evaluate(REGIONS_JS, "fused-plot")["left"] == []
    page.get_by_label("Image").first.select_option("astronaut.jpg")  # an annotated image: usable again, still on
    drawn_regions(page, "fused-plot")
    assert page.evaluate(TOGGLE_JS) == {"label": "Annotations", "active": True, "disabled": False}


def test_the_overlay_is_kept_in_the_url(page: Any, server: int) -> None:
    open_app(page, server, "?image=chelsea.jpg&model=dinov2&method=cls&head=1")
    wait_for_query(page, annotations="0", regions="all")
    page.get_by_role("button", name="Annotations").click()
    wait_for_query(page, annotations="1")
    page.get_by_label("Feature").select_option("eye")
    wait_for_query(page, annotations="1", regions="eye")
    drawn_regions(page, "head-plot", 2)  # chelsea has two eyes

    page.reload()  # the URL restores the view
    page.wait_for_function(DOC_READY_JS)
    assert page.evaluate(TOGGLE_JS)["active"] is True
    drawn_regions(page, "fused-plot", 2)

    open_app(page, server, "?model=dinov2&annotations=maybe&regions=wing")
    notice = page.get_by_text("Not as asked in the URL")
    notice.wait_for()
    text = notice.locator("xpath=..").inner_text()
    assert "regions “wing” is not valid (valid: all, cup, eye" in text
    assert "annotations “maybe” is not valid" in text


def test_contour_mode_outlines_the_top_60_percent_of_the_mass(page: Any, server: int, annotated: Path) -> None:
    image = image_id_of(annotated, "chelsea.jpg")
    open_app(page, server, "?image=chelsea.jpg&model=dinov2&method=cls&layer=1&head=2&contrast=contour")
    for name, head in (("head-plot", 2), ("fused-plot", None)):
        values = expected_map(annotated, "dinov2", "cls", image, 1, head).astype(np.float64)
        page.wait_for_function(f"() => ({OUTLINE_JS})('{name}').x0.length > 0")
        drawn = page.evaluate(OUTLINE_JS, name)
        rows, cols = values.shape
        # plot units back to cell edges: x over [0, dw] is cols columns, y over [0, dh] upwards is rows rows
        cells = np.column_stack(
            [
                np.asarray(drawn["x0"]) / drawn["dw"] * cols,
                (1 - np.asarray(drawn["y0"]) / drawn["dh"]) * rows,
                np.asarray(drawn["x1"]) / drawn["dw"] * cols,
                (1 - np.asarray(drawn["y1"]) / drawn["dh"]) * rows,
            ]
        )
        assert cells_enclosed(cells, values.shape).tolist() == top_mass_cells(values).tolist(), name
        assert not np.isnan(drawn["values"]).any()  # the whole map is drawn under the contour
    page.get_by_label("Contrast").select_option("Top 60% of the mass (mask)")
    page.wait_for_function(f"() => ({OUTLINE_JS})('head-plot').x0.length === 0")  # the mask: no contour


@pytest.mark.parametrize("first", ["statistics", "overview"])
def test_heads_titles_keep_their_style_when_opened_after_another_tab(page: Any, server: int, first: str) -> None:
    query = "?image=chelsea.jpg&model=dinov2&method=cls&layer=1&head=2"
    open_app(page, server, query)
    page.wait_for_timeout(500)
    direct = sorted(page.evaluate(TITLE_FONTS_JS))
    assert [t[0] for t in direct] == ["All heads (fused) · block 1", "Head 2 · block 1"]
    page.goto(f"http://localhost:{server}/app{query}&tab={first}")
    page.wait_for_timeout(1500)
    page.locator(".bk-tab", has_text="Heads").first.click()
    page.wait_for_function(f"() => ({TITLE_FONTS_JS})().length === 2")
    page.wait_for_timeout(500)
    assert sorted(page.evaluate(TITLE_FONTS_JS)) == direct


def test_nothing_is_cut_off_at_1024_by_768_with_the_overlay_on(browser: Any, server: int) -> None:
    context = browser.new_context(viewport={"width": 1024, "height": 768})
    page = context.new_page()
    page.set_default_timeout(15_000)
    try:
        open_app(page, server, "?image=astronaut.jpg&model=dinov2&method=cls&layer=1&head=2&annotations=1")
        drawn_regions(page, "head-plot")
        page.locator('table.region-scores[data-map="head 2"]').wait_for()
        page.wait_for_timeout(1000)  # laid out
        layout = page.evaluate(CUT_OFF_JS)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "overlay_cut_off_1024.png"), full_page=True)
        assert layout["cut"] == [], layout
        assert layout["scroll"] <= layout["inner"], layout
    finally:
        context.close()
