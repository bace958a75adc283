"""The dashboard in a real browser: Playwright driving Debian's Chromium against the app served on a free port,
over a warehouse built from the tiny checkpoints (tests/conftest.py). What the page plotted is read from
Bokeh's document and compared with the maps in the Parquet files, not only with widget values.

A screenshot per test goes to tests/artifacts/ (git-ignored; CI keeps it as an artefact).
Skipped when /usr/bin/chromium is missing, unless SSL_ATTENTION_REQUIRE_BROWSER=1 (then they fail).
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pytest

from bench.browser import (
    DOC_READY_JS,
    WIDGET_VALUE_JS,
    browser_missing_reason,
    launch_chromium,
    plotted_by_title,
    plotted_images,
)
from dashboards.url_sync import URL_DELAY_MS
from ssl_attention.registry import MODELS
from ssl_attention.render import colormap_lut, palette_index
from tests.dashboard_fixtures import (
    RANDOM_MODEL,
    RANDOM_SEED,
    WIDE_IMAGES,
    browser_required,
    dashboard_warehouse,
    expected_map,
    image_id_of,
    serve_threaded,
    wide_warehouse,
)

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
SELECT = "panel.models.widgets.CustomSelect"
COLORBARS_JS = "() => [...Bokeh.documents[0].all_models].filter(m => m.type === 'ColorBar').map(m => m.title)"
# The top of the colour scale of the map plotted in the figure whose title starts with the argument.
SCALE_TOP_JS = """(prefix) => {
  const fig = [...Bokeh.documents[0].all_models].find(m => m.type === 'Plot' && m.title?.text?.startsWith(prefix));
  return fig?.renderers.find(r => r.glyph?.type === 'Image')?.glyph.color_mapper.high ?? null;
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
def warehouse(tiny_warehouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dashboard_warehouse(tiny_warehouse, tmp_path_factory.mktemp("dashboard") / "warehouse")


@pytest.fixture(scope="module")
def wide(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory, make_tiny_checkpoint: Any) -> Path:
    return wide_warehouse(sample_dir, tmp_path_factory.mktemp("wide"), make_tiny_checkpoint)


@pytest.fixture(scope="module")
def server(warehouse: Path, wide: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    from dashboards.app import create_app

    missing = tmp_path_factory.mktemp("no_warehouse") / "missing"
    damaged = tmp_path_factory.mktemp("damaged") / "warehouse"
    shutil.copytree(warehouse, damaged)
    (damaged / "models" / "model=clip" / "data.parquet").write_bytes(b"not parquet" * 50)
    routes = {
        "app": lambda: create_app(warehouse),
        "empty": lambda: create_app(missing),
        "damaged": lambda: create_app(damaged),
        "wide": lambda: create_app(wide),
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
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()


# --- helpers ---------------------------------------------------------------------------------------------------


def open_app(page: Any, port: int, query: str = "") -> None:
    page.goto(f"http://localhost:{port}/app{query}")
    page.wait_for_function(DOC_READY_JS)


def wait_for_title(page: Any, prefix: str) -> dict[str, Any]:
    page.wait_for_function(
        "(p) => [...Bokeh.documents[0].all_models].some(m => m.type === 'Plot' && m.title?.text?.startsWith(p))",
        arg=prefix,
    )
    plotted = plotted_by_title(page, prefix)
    assert plotted is not None, prefix
    return plotted


def plotted_array(plotted: dict[str, Any]) -> np.ndarray:
    """The numpy map a plotted image shows (Bokeh's rows run bottom-up)."""
    rows, cols = plotted["shape"]
    return np.flipud(np.asarray(plotted["values"], dtype=np.float32).reshape(rows, cols))


def widget(page: Any, title: str) -> dict[str, Any] | None:
    return page.evaluate(WIDGET_VALUE_JS, [SELECT, title])


def wait_for_widget(page: Any, title: str, value: str | None = None, visible: bool | None = None) -> None:
    page.wait_for_function(
        f"""([type, title, value, visible]) => {{
            const w = ({WIDGET_VALUE_JS})([type, title]);
            return !!w && (value === null || w.value === value) && (visible === null || w.visible === visible);
        }}""",
        arg=[SELECT, title, value, visible],
    )


def wait_for_query(page: Any, **expected: str) -> None:
    """The page's URL query holds ``expected`` (updated asynchronously, without a navigation)."""
    page.wait_for_function(
        "(expected) => { const q = new URLSearchParams(location.search);"
        " return Object.entries(expected).every(([k, v]) => q.get(k) === v); }",
        arg=expected,
    )


# --- tests -------------------------------------------------------------------------------------------------------


def test_selecting_heads_changes_the_rendered_heatmap(page: Any, server: int, warehouse: Path) -> None:
    image = image_id_of(warehouse, "chelsea.jpg")
    open_app(page, server, "?image=chelsea.jpg&model=dinov2&method=cls&layer=1&head=fused")
    fused = wait_for_title(page, "All heads (fused) · block 1")
    np.testing.assert_allclose(plotted_array(fused), expected_map(warehouse, "dinov2", "cls", image, 1, None))
    assert not page.get_by_text("Random weights").is_visible()  # local tiny checkpoints, not random

    shown = {}
    for head in (1, 3):
        page.get_by_label("Head").select_option(f"Head {head}")
        plotted = plotted_array(wait_for_title(page, f"Head {head} · block 1"))
        np.testing.assert_allclose(plotted, expected_map(warehouse, "dinov2", "cls", image, 1, head))
        shown[head] = plotted
    assert not np.allclose(shown[1], shown[3]), "different heads must render different maps"
    wait_for_query(page, head="3")

    # the head grid: one mosaic, fused first; clicking tile k selects head k - 1
    canvas = page.locator(".bk-Canvas").nth(3)  # thumbnails, fused overlay, head overlay, head grid
    box = canvas.bounding_box()
    tiles = 5  # fused + 4 heads of the tiny models
    page.mouse.click(box["x"] + box["width"] * (2 + 0.5) / tiles, box["y"] + box["height"] / 2)
    wait_for_widget(page, "Head", value="1")
    wait_for_query(page, head="1")
    plotted = plotted_array(wait_for_title(page, "Head 1 · block 1"))
    np.testing.assert_allclose(plotted, expected_map(warehouse, "dinov2", "cls", image, 1, 1))


def test_head_selector_hidden_for_rollout_and_resnet50(page: Any, server: int, warehouse: Path) -> None:
    open_app(page, server, "?model=clip&method=cls&head=2")
    assert widget(page, "Head") == {"value": "2", "visible": True}
    assert page.get_by_label("Head").is_visible()

    page.get_by_label("Method").select_option("Attention rollout")
    wait_for_query(page, method="rollout", head="fused")  # reset to fused ...
    wait_for_widget(page, "Head", value="-1", visible=False)  # ... and hidden
    assert not page.get_by_label("Head").is_visible()
    wait_for_title(page, "Attention rollout · up to block")  # one map, named after the method
    page.get_by_text("Head grid").wait_for(state="hidden")  # no heads: no grid, no caption
    assert "rollout" in page.evaluate(COLORBARS_JS)

    page.get_by_label("Method").select_option("CLS attention")
    wait_for_widget(page, "Head", value="-1", visible=True)  # shown again, still fused
    page.get_by_text("Head grid").wait_for(state="visible")
    assert page.locator(".bk-slider-title", has_text="Layer").first.inner_text().split() == ["Layer:", "block", "1"]

    page.get_by_label("Model").select_option("ResNet-50 (timm, ImageNet)")
    wait_for_query(page, model="resnet50", method="gradcam", head="fused")
    wait_for_widget(page, "Head", visible=False)
    assert not page.get_by_label("Head").is_visible()
    assert page.get_by_text("is a CNN: no attention heads").is_visible()
    wait_for_title(page, "Grad-CAM · stage layer")
    assert not page.get_by_text("Head grid").is_visible()
    assert set(page.evaluate(COLORBARS_JS)) == {"Grad-CAM"}
    slider = page.locator(".bk-slider-title", has_text="Stage")  # the stage's name, not its index
    assert slider.inner_text().replace("\n", " ").split() == ["Stage:", "layer2"]


def test_empty_warehouse_shows_the_fill_command(page: Any, server: int) -> None:
    page.goto(f"http://localhost:{server}/empty")
    page.get_by_text("No attention maps yet").wait_for()
    command = page.get_by_text("ssl-attention run --images data/samples --models all --weights random")
    assert command.is_visible()
    assert page.get_by_text("Traceback").count() == 0


def test_damaged_warehouse_shows_what_failed(page: Any, server: int) -> None:
    page.goto(f"http://localhost:{server}/damaged")
    page.get_by_text("The warehouse cannot be read").wait_for()
    assert page.get_by_text("models/model=clip/data.parquet").first.is_visible()  # the file, in the one-line error
    assert page.get_by_text("Traceback").count() == 0


def test_url_restores_a_view_and_ignores_bad_values(page: Any, server: int, warehouse: Path) -> None:
    image = image_id_of(warehouse, "coffee.jpg")
    open_app(page, server, "?image=coffee.jpg&model=siglip&method=probe&layer=2&head=2&cmap=magma&scale=independent")
    plotted = plotted_array(wait_for_title(page, "Head 2 · pooling head"))
    np.testing.assert_allclose(plotted, expected_map(warehouse, "siglip", "probe", image, 2, 2))
    assert widget(page, "Image")["value"] == image
    assert widget(page, "Model")["value"] == "siglip"
    assert widget(page, "Colormap")["value"] == "magma"
    assert widget(page, "Colour scale")["value"] == "independent"
    # independent: each map over its own maximum, not the layer's (fused and all heads), which shared uses
    layer_top = max(float(expected_map(warehouse, "siglip", "probe", image, 2, h).max()) for h in (None, 0, 1, 2, 3))
    for title, head in (("Head 2 · pooling head", 2), ("All heads (fused) · pooling head", None)):
        own_top = float(expected_map(warehouse, "siglip", "probe", image, 2, head).max())
        assert page.evaluate(SCALE_TOP_JS, title) == pytest.approx(own_top, rel=1e-6)
    assert own_top < layer_top  # the fused map is the mean of the heads: below the largest head value

    open_app(page, server, "?model=nope&method=rollout&layer=99&head=banana&cmap=rainbow&image=gone.jpg")
    wait_for_title(page, "Attention rollout · up to block 1")
    assert page.locator(".bk-Canvas >> visible=true").count() == 2  # thumbnails and the one map: no head, no grid
    assert widget(page, "Model")["value"] == "dinov2"
    assert widget(page, "Method")["value"] == "rollout"  # valid for the fallback model: kept
    assert widget(page, "Colormap")["value"] == "viridis"
    wait_for_query(page, model="dinov2", layer="1", head="fused", cmap="viridis")  # the URL shows what is shown


def test_export_downloads(page: Any, server: int, warehouse: Path) -> None:
    image = image_id_of(warehouse, "rocket.jpg")
    open_app(page, server, "?image=rocket.jpg&model=dinov3&method=mean&layer=0&head=1")
    wait_for_title(page, "Head 1 · block 0")
    with page.expect_download() as download:
        page.get_by_role("button", name="CSV").click()
    assert download.value.suggested_filename == "rocket_dinov3_mean_layer0_maps.csv"
    table = pacsv.read_csv(io.BytesIO(Path(download.value.path()).read_bytes()))
    assert set(table.column_names) >= {"image_id", "model", "method", "layer", "head", "row", "col", "value"}
    rows = table.filter(pc.equal(table["head"], 1)).sort_by([("row", "ascending"), ("col", "ascending")])
    expected = expected_map(warehouse, "dinov3", "mean", image, 0, 1)
    np.testing.assert_allclose(rows["value"].to_numpy(), expected.ravel(), rtol=1e-6)
    assert table.filter(pc.is_null(table["head"])).num_rows == expected.size  # the fused map is there too

    with page.expect_download() as download:
        page.get_by_role("button", name="PNG").click()
    assert download.value.suggested_filename == "rocket_dinov3_mean_layer0_head1.png"
    assert Path(download.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_random_weights_banner_follows_the_model(page: Any, server: int) -> None:
    open_app(page, server, f"?model={RANDOM_MODEL}")
    banner = page.get_by_text("Random weights")
    banner.wait_for(state="visible")
    assert page.get_by_text("They show the machinery").is_visible()
    # the provenance the rows carry: the architecture mimicked and the seed
    provenance = f"architecture of {MODELS[RANDOM_MODEL].default_weights}, seed {RANDOM_SEED}"
    assert page.get_by_text(provenance).is_visible()
    page.get_by_label("Model").select_option("CLIP ViT-B/16 (vision tower)")
    banner.wait_for(state="hidden")


URL_PAUSE_MS = URL_DELAY_MS + 300


def test_back_and_forward_bring_the_view_of_the_url_back(page: Any, server: int, warehouse: Path) -> None:
    """After Back or Forward the widgets and the plotted maps show the view the URL names; completing the
    opened URL and following Back/Forward add no history entries, each settled view change adds one."""
    image = image_id_of(warehouse, "chelsea.jpg")
    layer_top = max(float(expected_map(warehouse, "dinov2", "cls", image, 1, h).max()) for h in (None, 0, 1, 2, 3))
    opened = page.evaluate("history.length") + 1  # the blank page, then the app
    open_app(page, server, "?image=chelsea.jpg&model=dinov2&method=cls&layer=1&head=1")
    wait_for_title(page, "Head 1 · block 1")
    wait_for_query(page, head="1", cmap="viridis", scale="shared", tab="heads")  # the URL, completed ...
    assert page.evaluate("history.length") == opened  # ... in place

    page.get_by_label("Head").select_option("Head 3")
    wait_for_query(page, head="3", scale="shared")
    page.wait_for_timeout(URL_PAUSE_MS)  # a pause: the next change is a new history entry, not the same burst
    page.get_by_label("Colour scale").select_option("Independent")
    wait_for_query(page, head="3", scale="independent")
    fused = "All heads (fused) · block 1"
    fused_top = float(expected_map(warehouse, "dinov2", "cls", image, 1, None).max())
    assert fused_top < layer_top  # the two scales differ for the fused map
    page.wait_for_function(f"(p) => Math.abs(({SCALE_TOP_JS})(p) - {fused_top!r}) < 1e-6", arg=fused)
    assert page.evaluate("history.length") == opened + 2

    page.go_back()  # head 3, shared scale
    wait_for_query(page, head="3", scale="shared")
    wait_for_widget(page, "Colour scale", value="shared")
    page.wait_for_function(f"(p) => Math.abs(({SCALE_TOP_JS})(p) - {layer_top!r}) < 1e-6", arg=fused)

    page.go_back()  # head 1
    wait_for_query(page, head="1", scale="shared")
    wait_for_widget(page, "Head", value="1")
    plotted = plotted_array(wait_for_title(page, "Head 1 · block 1"))
    np.testing.assert_allclose(plotted, expected_map(warehouse, "dinov2", "cls", image, 1, 1))

    page.go_forward()  # head 3 again
    wait_for_query(page, head="3", scale="shared")
    wait_for_widget(page, "Head", value="3")
    plotted = plotted_array(wait_for_title(page, "Head 3 · block 1"))
    np.testing.assert_allclose(plotted, expected_map(warehouse, "dinov2", "cls", image, 1, 3))
    page.wait_for_timeout(1000)  # longer than the server's URL delay: following Forward pushed nothing
    assert page.evaluate("history.length") == opened + 2
    assert page.evaluate("new URLSearchParams(location.search).get('head')") == "3"

    page.get_by_label("Head").select_option("Head 0")  # then Back at once, before the view has settled
    wait_for_title(page, "Head 0 · block 1")
    page.go_back()
    wait_for_query(page, head="3", scale="shared")
    wait_for_widget(page, "Head", value="3")
    plotted = plotted_array(wait_for_title(page, "Head 3 · block 1"))
    np.testing.assert_allclose(plotted, expected_map(warehouse, "dinov2", "cls", image, 1, 3))


# The colours BokehJS gives the values of the map plotted in the figure whose title starts with the argument
# (its own colour mapper), as [r, g, b, a] per value, in the data's order (rows bottom-up).
MAPPED_COLOURS_JS = """(prefix) => {
  const fig = [...Bokeh.documents[0].all_models].find(m => m.type === 'Plot' && m.title?.text?.startsWith(prefix));
  const renderer = fig.renderers.find(r => r.glyph?.type === 'Image');
  const values = renderer.data_source.data.image[0];
  return {shape: values.shape, rgba: Array.from(renderer.glyph.color_mapper.rgba_mapper.v_compute(values))};
}"""
# The palette of every colour mapper that colours plotted data, by kind of plot: "mosaic" (HoloViews image,
# layers × heads), "heatmap" (HoloViews heatmap, statistics), "figure" (the heads tab's Bokeh models).
PLOTTED_PALETTES_JS = """() => {
  const out = [];
  for (const r of [...Bokeh.documents[0].all_models].filter(m => m.type === 'GlyphRenderer')) {
    const mapper = r.glyph.color_mapper ?? r.glyph.fill_color?.transform;
    const data = r.data_source.data;
    const count = (data.image ?? data.zvalues ?? []).length;
    if (!mapper?.palette || count === 0) continue;
    const kind = data.zvalues ? 'heatmap' : data.x ? 'mosaic' : 'figure';
    out.push({kind, palette: Array.from(mapper.palette)});
  }
  return out;
}"""


def test_exported_png_has_the_colours_bokeh_draws(page: Any, server: int) -> None:
    """At opacity 1, each cell of the exported PNG's fused map has the colour BokehJS's own colour mapper gives
    that cell's value on screen; every tab's plots (heads, layers × heads, statistics) use the same palette."""
    from bokeh.palettes import Magma256
    from PIL import Image

    from dashboards.export import CAPTION_PX, MARGIN_PX, PANEL_PX, TITLE_PX

    open_app(page, server, "?image=chelsea.jpg&model=dinov2&method=cls&layer=1&head=2&cmap=magma&opacity=1")
    wait_for_title(page, "Head 2 · block 1")
    mapped = page.evaluate(MAPPED_COLOURS_JS, "All heads (fused) · block 1")
    rows, cols = mapped["shape"]
    screen = np.flipud(np.asarray(mapped["rgba"], dtype=np.uint8).reshape(rows, cols, 4))[..., :3]
    assert len({tuple(c) for c in screen.reshape(-1, 3)}) > 1  # a real map, several colours

    with page.expect_download() as download:
        page.get_by_role("button", name="PNG").click()
    canvas = np.asarray(Image.open(download.value.path()).convert("RGB"))
    panel_h = PANEL_PX  # the tiny models' inputs are square
    ys = TITLE_PX + CAPTION_PX + ((np.arange(rows) + 0.5) * panel_h / rows).astype(int)
    xs = MARGIN_PX + ((np.arange(cols) + 0.5) * PANEL_PX / cols).astype(int)
    np.testing.assert_array_equal(canvas[np.ix_(ys, xs)], screen)

    expected = list(Magma256)
    seen = {entry["kind"] for entry in page.evaluate(PLOTTED_PALETTES_JS)}
    for tab, kind in (("Layers × heads", "mosaic"), ("Statistics", "heatmap")):
        page.locator(".bk-tab", has_text=tab).click()
        page.wait_for_function(f"(kind) => ({PLOTTED_PALETTES_JS})().some(e => e.kind === kind)", arg=kind)
        plotted = page.evaluate(PLOTTED_PALETTES_JS)
        seen |= {entry["kind"] for entry in plotted}
        wrong = {entry["kind"] for entry in plotted if entry["palette"] != expected}
        assert not wrong, (tab, wrong)
    assert seen == {"figure", "mosaic", "heatmap"}


# --- what a new user tripped over ---------------------------------------------------------------------------

# [low, high] of the colour scale of the map plotted in the figure whose title starts with the argument
SCALE_RANGE_JS = """(prefix) => {
  const fig = [...Bokeh.documents[0].all_models].find(m => m.type === 'Plot' && m.title?.text?.startsWith(prefix));
  const mapper = fig?.renderers.find(r => r.glyph?.type === 'Image')?.glyph.color_mapper;
  return mapper ? [mapper.low, mapper.high] : null;
}"""
# Every element (through shadow roots) whose box reaches past the window's right edge, with its class
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


def open_tab(page: Any, port: int, query: str) -> None:
    """Open the app on any tab (``open_app`` waits for the heads tab's maps, which only it draws)."""
    page.goto(f"http://localhost:{port}/app{query}")
    page.wait_for_function(f"() => !!({WIDGET_VALUE_JS})(['{SELECT}', 'Head'])")


def notice_text(page: Any) -> str:
    notice = page.get_by_text("Not as asked in the URL")
    notice.wait_for()
    return notice.locator("xpath=..").inner_text()


def test_each_bad_url_value_is_named_and_never_shows_another_image_unannounced(
    page: Any, server: int, warehouse: Path
) -> None:
    open_app(page, server, "?image=gone.jpg&model=dinov2&method=cls&layer=1&head=99")
    text = notice_text(page)
    assert "image “gone.jpg” is not in this warehouse" in text
    assert "head “99”: it does not exist (0–3): showing the fused map" in text  # the tiny models have 4 heads
    shown = text.split("showing ", 2)[-1].split(" instead", 1)[0]  # the image the notice says is shown instead
    fused = plotted_array(wait_for_title(page, "All heads (fused) · block 1"))
    np.testing.assert_allclose(fused, expected_map(warehouse, "dinov2", "cls", image_id_of(warehouse, shown), 1, None))
    assert widget(page, "Image")["value"] == image_id_of(warehouse, shown)

    for query, named in (
        ("?model=nope", "model “nope” is not in this warehouse"),
        ("?model=dinov2&head=-3", "head “-3”: it does not exist (0–3)"),
        ("?model=dinov2&method=cls&layer=99", "layer “99” is not stored for dinov2/cls (layers 0–1)"),
        ("?model=dinov2&cmap=rainbow", "cmap “rainbow” is not valid (valid: viridis"),
    ):
        open_app(page, server, query)
        assert named in notice_text(page), query

    open_app(page, server, "?image=chelsea.jpg&model=dinov2&method=cls&layer=1&head=2")  # all valid: no notice
    wait_for_title(page, "Head 2 · block 1")
    assert not page.get_by_text("Not as asked in the URL").is_visible()


@pytest.mark.parametrize("mode", ["zero", "min", "clip", "mass"])
def test_each_scale_mode_changes_what_is_drawn(page: Any, server: int, warehouse: Path, mode: str) -> None:
    image = image_id_of(warehouse, "chelsea.jpg")
    open_app(
        page, server, f"?image=chelsea.jpg&model=dinov2&method=cls&layer=1&head=2&scale=independent&contrast={mode}"
    )
    title = "Head 2 · block 1"
    plotted = plotted_array(wait_for_title(page, title))
    values = expected_map(warehouse, "dinov2", "cls", image, 1, 2).astype(np.float64)
    low, high = page.evaluate(SCALE_RANGE_JS, title)
    expected_range = {
        "zero": (0.0, values.max()),
        "min": (values.min(), values.max()),
        "clip": tuple(np.percentile(values, [2, 98])),
        "mass": (0.0, values.max()),
    }[mode]
    assert (low, high) == pytest.approx(expected_range, rel=1e-5)
    hidden = np.isnan(plotted)
    if mode == "mass":  # drawn: the fewest cells, hottest first, that hold 60% of the map's mass
        order = np.argsort(-values.ravel(), kind="stable")
        needed = int(np.argmax(np.cumsum(values.ravel()[order]) >= 0.6 * values.sum())) + 1
        kept = np.zeros(values.size, bool)
        kept[order[:needed]] = True
        assert (~hidden).ravel().tolist() == kept.tolist()
        np.testing.assert_allclose(plotted[~hidden], values[~hidden], rtol=1e-6)
    else:
        assert not hidden.any()
        np.testing.assert_allclose(plotted, values, rtol=1e-6)


def test_fused_is_never_shown_twice(page: Any, server: int) -> None:
    open_app(page, server, "?image=chelsea.jpg&model=dinov2&method=cls&layer=1&head=fused")
    wait_for_title(page, "All heads (fused) · block 1")
    titles = page.locator(".bk-Canvas >> visible=true")
    assert titles.count() == 3  # thumbnails, the fused map, the head grid: no second copy of the fused map
    page.get_by_label("Head").select_option("Head 1")
    wait_for_title(page, "Head 1 · block 1")
    expect_canvases(page, 4)
    page.get_by_label("Head").select_option(FUSED_OPTION)
    expect_canvases(page, 3)


FUSED_OPTION = "All heads (fused)"


def expect_canvases(page: Any, count: int) -> None:
    deadline = 50
    while page.locator(".bk-Canvas >> visible=true").count() != count and deadline:
        page.wait_for_timeout(100)
        deadline -= 1
    assert page.locator(".bk-Canvas >> visible=true").count() == count


@pytest.mark.parametrize("tab", ["heads", "overview", "statistics", "alignment", "compare", "glossary"])
def test_nothing_is_cut_off_at_1024_by_768(browser: Any, server: int, tab: str) -> None:
    context = browser.new_context(viewport={"width": 1024, "height": 768})
    page = context.new_page()
    page.set_default_timeout(15_000)
    try:
        open_tab(page, server, f"?image=chelsea.jpg&model=dinov2&method=cls&layer=1&head=2&tab={tab}")
        page.wait_for_timeout(1500)  # the open tab's plots are laid out
        layout = page.evaluate(CUT_OFF_JS)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"cut_off_1024_{tab}.png"), full_page=True)
        assert layout["cut"] == [], layout
        assert layout["scroll"] <= layout["inner"], layout
    finally:
        context.close()


@pytest.mark.parametrize("tab", ["heads", "overview", "statistics", "alignment", "compare", "glossary"])
def test_the_head_selector_rules_hold_on_every_tab(page: Any, server: int, tab: str) -> None:
    open_tab(page, server, f"?model=clip&method=cls&head=2&tab={tab}")
    wait_for_widget(page, "Head", value="2", visible=True)
    page.get_by_label("Method").first.select_option("Attention rollout")  # no heads: fused, hidden
    wait_for_query(page, method="rollout", head="fused", tab=tab)
    wait_for_widget(page, "Head", value="-1", visible=False)
    page.get_by_label("Method").first.select_option("CLS attention")  # back: shown, still fused
    wait_for_widget(page, "Head", value="-1", visible=True)
    open_tab(page, server, f"?model=resnet50&head=1&tab={tab}")  # a CNN: hidden, and the notice says why
    wait_for_widget(page, "Head", value="-1", visible=False)
    assert "has no per-head maps: showing the fused map" in notice_text(page)


# --- non-square grids ------------------------------------------------------------------------------------------

# The data area of the figure named ``name``: its box on the page (px) and the plot's x/y ranges
FRAME_JS = """(name) => {
  const all = [];
  const walk = (v) => { if (!v || all.includes(v)) return; all.push(v); (v.child_views ?? []).forEach(walk); };
  (typeof Bokeh.index.values === 'function' ? [...Bokeh.index.values()] : Object.values(Bokeh.index)).forEach(walk);
  const plot = all.find(v => v.model?.name === name);
  if (!plot) return null;
  const frame = plot.frame.bbox, canvas = plot.canvas_view.el.getBoundingClientRect();
  return {x: canvas.x + frame.left, y: canvas.y + frame.top, width: frame.width, height: frame.height};
}"""


def cell_brightness(page: Any, box: dict[str, float], rows: int, cols: int) -> np.ndarray:
    """Mean grey level of each of rows x cols equal blocks of a screenshot of ``box`` (inner halves only)."""
    from PIL import Image

    shot = np.asarray(Image.open(io.BytesIO(page.screenshot(clip=box))).convert("L"), dtype=np.float64)
    height, width = shot.shape
    means = np.empty((rows, cols))
    for r in range(rows):
        for c in range(cols):
            top, left = (r + 0.25) * height / rows, (c + 0.25) * width / cols
            block = shot[round(top) : round(top + height / rows / 2), round(left) : round(left + width / cols / 2)]
            means[r, c] = block.mean()
    return means


@pytest.mark.parametrize("file_name", sorted(WIDE_IMAGES))
def test_a_non_square_map_is_drawn_the_right_way_up_and_round(
    page: Any, server: int, wide: Path, file_name: str
) -> None:
    """A 2 x 3 (and a 3 x 2) grid: the page holds the Parquet rows' map, and the pixels drawn at each cell's
    place (grey colormap, opaque, each map over its own range) are the grey of the value stored for that cell:
    the hot cell is where the Parquet row says, not transposed or flipped."""
    grid_h, grid_w = WIDE_IMAGES[file_name]
    image = image_id_of(wide, file_name)
    query = f"?image={file_name}&model=dinov2&method=cls&layer=1&head=1&cmap=gray&opacity=1&scale=independent"
    page.goto(f"http://localhost:{server}/wide{query}")
    page.wait_for_function(DOC_READY_JS)
    for title, head, name in (
        ("Head 1 · block 1", 1, "head-plot"),
        ("All heads (fused) · block 1", None, "fused-plot"),
    ):
        values = expected_map(wide, "dinov2", "cls", image, 1, head)
        assert values.shape == (grid_h, grid_w)
        plotted = plotted_array(wait_for_title(page, title))
        np.testing.assert_allclose(plotted, values, rtol=1e-6)
        page.wait_for_timeout(300)  # drawn
        box = page.evaluate(FRAME_JS, name)
        assert box["width"] / box["height"] == pytest.approx(grid_w / grid_h, rel=0.02), box  # cells stay square
        drawn = cell_brightness(page, box, grid_h, grid_w)
        assert np.unravel_index(drawn.argmax(), drawn.shape) == np.unravel_index(values.argmax(), values.shape)
        # each cell's grey is the palette entry Bokeh picks for the stored value there (0 -> its own maximum)
        expected = colormap_lut("gray")[palette_index(values, 0.0, float(values.max()))][..., 0]
        np.testing.assert_allclose(drawn, expected, atol=3, err_msg=f"{file_name} {title}")

    # the head grid: fused then heads 0..3, each tile grid_h x grid_w, in one row of five tiles
    grids = [p for p in plotted_images(page) if p["title"] == ""]  # the head grid is the one untitled map
    assert len(grids) == 1
    mosaic = plotted_array(grids[0])
    assert mosaic.shape == (grid_h, 5 * grid_w)  # fused and 4 heads, in one row
    for k, head in enumerate((None, 0, 1, 2, 3)):
        values = expected_map(wide, "dinov2", "cls", image, 1, head)
        tile = mosaic[:, k * grid_w : (k + 1) * grid_w]
        np.testing.assert_allclose(tile, values / values.max(), rtol=1e-5)  # independent: each over its own max

    # fused alone: the larger frame keeps the grid's aspect too
    page.get_by_label("Head").select_option("All heads (fused)")
    wait_for_query(page, head="fused")
    page.wait_for_timeout(500)
    box = page.evaluate(FRAME_JS, "fused-plot")
    assert max(box["width"], box["height"]) > 300 and box["width"] / box["height"] == pytest.approx(
        grid_w / grid_h, rel=0.02
    )
