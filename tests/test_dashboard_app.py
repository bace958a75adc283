"""The dashboard's server side without a browser: the viewer over the tiny warehouse, what its Bokeh models
hold after each switch, URL restore, exports, the other tabs' views, the empty-warehouse message, and the
message (never a traceback) over a damaged warehouse."""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import panel as pn
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from ssl_attention.registry import MODELS
from tests.dashboard_fixtures import (
    RANDOM_MODEL,
    RANDOM_SEED,
    dashboard_warehouse,
    expected_map,
    image_id_of,
    open_explorer,
    stored_layers,
)

if TYPE_CHECKING:
    from dashboards.app import AttentionExplorer
    from dashboards.figures import OverlayFigure
    from dashboards.tabs.heads import HeadsTab


@pytest.fixture(scope="module")
def warehouse(tiny_warehouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dashboard_warehouse(tiny_warehouse, tmp_path_factory.mktemp("dashboard_app") / "warehouse")


@pytest.fixture
def explorer(warehouse: Path) -> AttentionExplorer:
    return open_explorer(warehouse)


def shown(overlay: OverlayFigure) -> np.ndarray:
    """The map an overlay figure holds, rows back in numpy order."""
    return np.flipud(overlay.heat.data["image"][0])


def heads_tab(explorer: AttentionExplorer) -> HeadsTab:
    return explorer.tabs["heads"]  # type: ignore[return-value]


def test_head_switch_updates_the_head_figure_only(explorer: AttentionExplorer, warehouse: Path) -> None:
    session = explorer.session
    heads = heads_tab(explorer)
    session.apply_query({"image": "chelsea.jpg", "model": "dinov2", "method": "cls", "layer": 1, "head": 0})
    image = image_id_of(warehouse, "chelsea.jpg")
    fused_sent = heads.overlays.fused.heat.data["image"][0]
    for head in (1, 3):
        session.head = head
        np.testing.assert_array_equal(
            shown(heads.overlays.head), expected_map(warehouse, "dinov2", "cls", image, 1, head)
        )
        assert heads.overlays.head.figure.title.text == f"Head {head} · block 1"
    np.testing.assert_array_equal(shown(heads.overlays.fused), expected_map(warehouse, "dinov2", "cls", image, 1, None))
    assert heads.overlays.fused.heat.data["image"][0] is fused_sent  # the fused map was not re-sent
    assert heads.grid_strip.outline.data["left"] == [4]  # tile 4 = head 3 (fused is tile 0)


def _watch_changes(explorer: AttentionExplorer) -> Callable[[Callable[[], None]], set[tuple[Any, str]]]:
    """Puts the explorer in a document; the returned function runs a switch and answers the (Bokeh model,
    property) pairs it changed: what the browser is sent."""
    from bokeh.document import Document

    doc = Document()
    doc.add_root(explorer.__panel__().get_root(doc))
    events: list[Any] = []
    doc.on_change(events.append)

    def changes(switch: Callable[[], None]) -> set[tuple[Any, str]]:
        events.clear()
        switch()
        return {(event.model, event.attr) for event in events if hasattr(event, "attr")}

    return changes


def test_a_switch_sends_only_what_it_changes(explorer: AttentionExplorer) -> None:
    """No visibility, layout, label, palette or caption updates on a plain head or layer switch (each costs
    the browser a re-layout or a redraw), and nothing for a hidden head map."""
    session = explorer.session
    heads = heads_tab(explorer)
    session.apply_query({"image": "chelsea.jpg", "model": "dinov2", "method": "cls", "layer": 1, "head": 0})
    fused, head, grid = heads.overlays.fused, heads.overlays.head, heads.grid_strip
    changes = _watch_changes(explorer)

    def widget(title: str) -> Any:  # the Bokeh model of a control: its value echoes the switch
        return next(m for m in explorer.controls.head_select._models.values() if m[0].title == title)[0]

    changed = changes(lambda: setattr(session, "head", 2))
    assert {(head.heat, "data"), (head.figure.title, "text"), (grid.outline, "data")} <= changed
    assert changed - {(widget("Head"), "value")} == {
        (head.heat, "data"),
        (head.figure.title, "text"),
        (grid.outline, "data"),
    }

    changed = changes(lambda: setattr(session, "layer", 0))
    must = {(o.heat, "data") for o in (fused, head)} | {(o.figure.title, "text") for o in (fused, head)}
    assert must | {(grid.maps, "data")} <= changed
    allowed = must | {(grid.maps, "data"), (fused.mapper, "high"), (head.mapper, "high")}
    others = {(type(model).__name__, attr) for model, attr in changed - allowed}
    assert others <= {("Slider", "value"), ("HTML", "text")}, others  # the slider and the note naming the layer

    changed = changes(lambda: setattr(session, "method", "rollout"))
    assert not session.show_heads
    assert not {m for m, _ in changed} & {head.heat, head.figure.title, head.mapper, grid.maps, grid.captions}


def test_grid_and_thumbnail_clicks_select(explorer: AttentionExplorer) -> None:
    session = explorer.session
    heads = heads_tab(explorer)
    heads.on_grid_tile(2)
    assert session.selection.head == 1
    heads.on_grid_tile(0)
    assert session.selection.head is None
    explorer.controls.on_thumb_tile(1)
    assert session.selection.image == session.index.images[1].image_id


def test_method_and_model_switches_follow_the_rules(explorer: AttentionExplorer) -> None:
    session = explorer.session
    session.apply_query({"model": "clip", "method": "cls", "head": 2})
    assert session.show_heads and session.head == 2
    session.method = "rollout"
    assert (session.selection.head, session.head, session.show_heads) == (None, -1, False)
    session.method = "cls"
    assert session.show_heads and session.selection.head is None
    session.head = 3
    session.model = "siglip"  # cls -> probe, which lives at the pooling head only; head 3 kept
    assert (session.selection.method, session.selection.layer, session.selection.head) == ("probe", 2, 3)
    assert not session.multi_layer
    session.model = "resnet50"
    assert (session.selection.method, session.show_heads, session.selection.head) == ("gradcam", False, None)
    assert list(session.param.head.objects) == [-1]


@pytest.mark.parametrize(
    ("query", "title", "value_label", "slider"),
    [
        ({"model": "clip", "method": "rollout", "layer": 1}, "Attention rollout · up to block 1", "rollout", "Layer"),
        ({"model": "resnet50", "method": "gradcam", "layer": 1}, "Grad-CAM · stage layer2", "Grad-CAM", "Stage"),
    ],
)
def test_methods_without_heads_show_one_map_named_after_the_method(
    explorer: AttentionExplorer, query: dict[str, object], title: str, value_label: str, slider: str
) -> None:
    session = explorer.session
    heads = heads_tab(explorer)
    session.apply_query({"model": "dinov2", "method": "cls", "head": 2})
    assert session.show_heads
    session.apply_query(query)
    assert not session.show_heads  # hides the head selector, the head map, the grid and its caption
    fused = heads.overlays.fused
    assert fused.figure.title.text == title  # not "All heads (fused)": there are no heads
    assert fused.colorbar.title == value_label and fused.hover.tooltips[0][0] == value_label
    # the slider shows the layer's name, not its index: "Layer: block 1", "Stage: layer2"
    assert explorer.controls.layer_slider.name == slider
    assert title.endswith(explorer.controls.layer_slider.format.args["labels"][str(query["layer"])])
    layout = explorer.__panel__()
    figures = (heads.overlays.head.figure, heads.grid_strip.figure)  # the head map; the grid and its caption
    holders = [
        column
        for column in layout.select(pn.Column)
        if any(isinstance(pane, pn.pane.Bokeh) and pane.object in figures for pane in column.objects)
    ]
    assert len(holders) == 2 and not any(column.visible for column in holders)
    assert any("Head grid" in str(pane.object) for pane in holders[1].objects)
    png = explorer.controls.png_download.callback().getvalue()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    session.apply_query({"model": "dinov2", "method": "cls"})  # fused: the grid, but no head map repeating it
    assert session.show_heads and holders[1].visible and not holders[0].visible
    session.apply_query({"model": "dinov2", "method": "cls", "head": 1})
    assert all(column.visible for column in holders)
    assert heads.overlays.fused.colorbar.title == "attention"


def test_query_round_trip_and_bad_values(explorer: AttentionExplorer) -> None:
    session = explorer.session
    session.apply_query(
        {"model": "dinov3", "method": "mean", "layer": 0, "head": 3, "cmap": "magma", "tab": "statistics"}
    )
    query = session.query()
    assert query["model"] == "dinov3" and query["head"] == "3" and query["cmap"] == "magma"
    assert query["tab"] == "statistics"
    session.apply_query({"model": "nope", "head": "x", "cmap": "rainbow", "opacity": 7, "tab": 3})
    assert (session.selection.model, session.selection.head) == ("dinov2", None)
    assert session.tab == "statistics"
    assert session.cmap == "magma" and session.opacity == 0.6  # invalid display values keep the current ones


def test_random_weights_are_flagged_with_their_provenance(explorer: AttentionExplorer) -> None:
    session = explorer.session
    session.model = RANDOM_MODEL
    assert explorer.is_random(session.selection, "heads")
    banner = explorer.banner(session.selection, "heads")
    assert "Random weights" in banner
    assert MODELS[RANDOM_MODEL].default_weights in banner and f"seed {RANDOM_SEED}" in banner  # the architecture
    session.model = "clip"
    assert not explorer.is_random(session.selection, "heads")


def _banner_alert(explorer: AttentionExplorer, layout: pn.viewable.Viewable) -> pn.pane.Alert:
    return next(a for a in layout.select(pn.pane.Alert) if a.alert_type == "warning" and "Random" in str(a.object))


def test_compare_tab_flags_every_compared_model_with_random_weights(
    explorer: AttentionExplorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compare tab draws every model: the banner shows while any of them has random weights, naming them,
    and each such card says so — whichever model is selected."""
    session = explorer.session
    session.param.update(model="clip", tab="compare")
    layout = explorer.__panel__()
    alert = _banner_alert(explorer, layout)
    assert alert.visible
    label = MODELS[RANDOM_MODEL].label
    assert label in alert.object and f"seed {RANDOM_SEED}" in alert.object
    assert MODELS["clip"].label not in alert.object  # clip's weights are real
    compare = explorer.tabs["compare"].view(session.selection.image, 1.0, "cls", "viridis", 0.6, "compare")
    captions = {card.objects[0].object.split("**")[1]: card.objects[0].object for card in compare.objects[0].objects}
    assert set(captions) == set(MODELS)
    flagged = {model for model, caption in captions.items() if "random weights" in caption}
    assert flagged == {RANDOM_MODEL}

    session.tab = "heads"  # only the selected model's maps are shown: clip, real weights
    assert not alert.visible
    session.tab = "compare"
    assert alert.visible

    monkeypatch.setitem(session.loaded.random_weights, "siglip", "architecture of some/hub-id, seed 7")
    banner = explorer.banner(session.selection, "compare")
    assert label in banner and MODELS["siglip"].label in banner and "seed 7" in banner
    assert not explorer.is_random(session.selection, "heads")


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.8, 1.0])
def test_compare_picks_the_layer_at_the_relative_depth(
    explorer: AttentionExplorer, warehouse: Path, depth: float
) -> None:
    """Each card shows its model's map at layer index round(depth * (L - 1)) of the L layers its method stores
    (read from the Parquet files here), and its drawn pixels are that map's overlay."""
    from PIL import Image

    from dashboards import data
    from ssl_attention.render import overlay

    session = explorer.session
    image = image_id_of(warehouse, "chelsea.jpg")
    compare = explorer.tabs["compare"].view(image, depth, "cls", "magma", 0.5, "compare")
    cards = compare.objects[0].objects
    assert len(cards) == len(MODELS)
    for card in cards:
        caption, png = card.objects[0].object, card.objects[1].objects[0].object  # caption; (map, colour bar)
        model, method = caption.split("**")[1], caption.split(" · ")[1]
        layers = stored_layers(warehouse, model, method)
        position = depth * (len(layers) - 1)
        assert position % 1 != 0.5  # no tie: the expected layer is unambiguous
        layer = layers[round(position)]
        info = session.index.models[model]
        assert f" · {info.layer_label(layer)} (depth " in caption, (model, layer, caption)
        drawn = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        rgb = data.input_rgb(str(warehouse), image, model)
        expected = overlay(rgb, expected_map(warehouse, model, method, image, layer, None), alpha=0.5, cmap="magma")
        np.testing.assert_array_equal(drawn, expected, err_msg=f"{model} at depth {depth}")


def test_exports(explorer: AttentionExplorer, warehouse: Path) -> None:
    session = explorer.session
    session.apply_query({"image": "rocket.jpg", "model": "dinov2", "method": "mean", "layer": 0, "head": 2})
    image = image_id_of(warehouse, "rocket.jpg")
    png = explorer.controls.png_download.callback().getvalue()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert explorer.controls.png_download.filename == "rocket_dinov2_mean_layer0_head2.png"
    table = pacsv.read_csv(io.BytesIO(explorer.controls.csv_download.callback().getvalue()))
    assert explorer.controls.csv_download.filename == "rocket_dinov2_mean_layer0_maps.csv"
    grid = expected_map(warehouse, "dinov2", "mean", image, 0, 2)
    head_rows = table.filter(table["head"].to_numpy(zero_copy_only=False) == 2)
    np.testing.assert_allclose(head_rows["value"].to_numpy().reshape(grid.shape), grid, rtol=1e-6)
    assert table.num_rows == 5 * grid.size  # fused + 4 heads
    parquet = pq.read_table(explorer.controls.parquet_download.callback())
    assert parquet.num_rows == table.num_rows and parquet["head"].null_count == grid.size


def test_other_tabs_build_their_views(explorer: AttentionExplorer) -> None:
    import holoviews as hv

    session = explorer.session
    session.apply_query({"model": "resnet50"})  # Grad-CAM stages have different grids: resampled tiles
    overview = explorer.tabs["overview"].plot((session.selection, "viridis", "shared", "zero"))
    assert isinstance(overview, hv.Image)
    assert overview.opts.get().kwargs["xticks"] == [(0.5, "Grad-CAM")]  # one column, named after the method
    session.apply_query({"model": "dinov2", "head": 1})
    heat = explorer.tabs["statistics"].plot((session.selection, "viridis"), "entropy_norm", "all")
    assert isinstance(heat, hv.HeatMap) and len(heat) == 2 * 5  # 2 layers x (fused + 4 heads)
    assert "<table" in explorer.tabs["statistics"].table(session.selection, "statistics")
    compare = explorer.tabs["compare"].view(session.selection.image, 0.5, "cls", "viridis", 0.6, "compare")
    assert len(compare.objects[0].objects) == len(MODELS)  # one card per model


def test_hidden_tabs_do_not_follow_the_selection(explorer: AttentionExplorer) -> None:
    session = explorer.session
    session.tab = "overview"
    seen = explorer.tabs["overview"].view_key
    assert seen[0] == session.selection
    session.tab = "heads"
    session.head = 2
    assert (
        explorer.tabs["overview"].view_key == seen and explorer.tabs["statistics"].view_key is None
    )  # nothing redrawn behind the scenes
    session.tab = "overview"
    assert explorer.tabs["overview"].view_key[0].head == 2


def test_empty_or_missing_warehouse_shows_the_fill_command(tmp_path: Path) -> None:
    from dashboards.app import create_app
    from dashboards.pages import EmptyWarehouse

    (tmp_path / "empty").mkdir()
    for location in (tmp_path / "missing", tmp_path / "empty", "s3://bucket/warehouse"):
        app = create_app(location)
        assert isinstance(app, EmptyWarehouse)
        text = app.__panel__().objects[1].object
        assert "ssl-attention run --images data/samples --models all --weights random" in text


FILL = "ssl-attention run --images data/samples --models all --weights random --warehouse"


def test_a_warehouse_from_the_environment_is_named_in_the_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$SSL_ATTENTION_WAREHOUSE, not an argument: the message and the fill command name that location."""
    from dashboards.app import create_app
    from dashboards.pages import EmptyWarehouse

    missing = tmp_path / "from_env"
    monkeypatch.setenv("SSL_ATTENTION_WAREHOUSE", str(missing))
    app = create_app()
    assert isinstance(app, EmptyWarehouse)
    text = app.__panel__().objects[1].object
    assert f"`{missing}` is empty or missing" in text and f"{FILL} {missing}\n" in text


def test_an_unsupported_location_says_what_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    """An object-store URL is neither empty nor missing: the message names it and says what a location may be."""
    from dashboards.app import create_app
    from dashboards.pages import EmptyWarehouse

    monkeypatch.setenv("SSL_ATTENTION_WAREHOUSE", "s3://bucket/warehouse")
    for app in (create_app(), create_app("s3://bucket/warehouse")):
        assert isinstance(app, EmptyWarehouse)
        text = app.__panel__().objects[1].object
        assert "`s3://bucket/warehouse`" in text and "``" not in text.replace("```", "")
        assert "empty or missing" not in text
        assert "local path" in text and "file://" in text
        assert f"{FILL} s3://" not in text and not text.rstrip().endswith("--warehouse")


def test_panel_serve_builds_the_app_at_slash_app(warehouse: Path) -> None:
    """``panel serve dashboards/app.py`` as a user runs it; the liveness probe of /app builds a session."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = Path(__file__).resolve().parents[1] / "dashboards" / "app.py"
    command = [sys.executable, "-m", "panel", "serve", str(app), "--port", str(port), "--address", "127.0.0.1"]
    command += ["--liveness", "--allow-websocket-origin", f"127.0.0.1:{port}"]
    env = {**os.environ, "SSL_ATTENTION_WAREHOUSE": str(warehouse)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                answer = requests.get(f"http://127.0.0.1:{port}/liveness?endpoint=/app", timeout=30)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "panel serve did not start"
                time.sleep(0.2)
        assert answer.status_code == 200 and answer.json() == {"/app": True}
    finally:
        process.terminate()
        process.wait(15)


# --- a damaged warehouse: a message saying what failed, never a traceback ------------------------------------


def _damaged_copy(warehouse: Path, destination: Path, *relative: str) -> Path:
    """A copy of ``warehouse`` whose files at ``relative`` hold garbage instead of Parquet."""
    shutil.copytree(warehouse, destination)
    for path in relative:
        (destination / path).write_bytes(b"not a parquet file \x00\xff" * 64)
    return destination


def test_a_damaged_models_file_shows_what_failed(warehouse: Path, tmp_path: Path) -> None:
    from dashboards.app import create_app
    from dashboards.pages import WarehouseProblem

    damaged = _damaged_copy(warehouse, tmp_path / "warehouse", "models/model=clip/data.parquet")
    app = create_app(damaged)  # must not raise
    assert isinstance(app, WarehouseProblem)
    assert app.failed == "reading the list of models and images" and app.error and "\n" not in app.error
    text = app.__panel__().objects[1].object
    assert str(damaged) in text and app.error.replace("`", "'") in text and "Traceback" not in text


def test_a_damaged_partition_is_left_out_with_a_note(warehouse: Path, tmp_path: Path) -> None:
    from dashboards.app import AttentionExplorer, create_app

    damaged = _damaged_copy(
        warehouse, tmp_path / "warehouse", "attention_maps/model=clip/method=mean/shard=0/data.parquet"
    )
    app = create_app(damaged)
    assert isinstance(app, AttentionExplorer)  # the other maps are still there
    methods = app.session.index.models["clip"].methods
    assert "mean" not in methods and "cls" in methods
    assert set(app.session.loaded.skipped) == {"clip/mean"}
    note = next(pane for pane in app.__panel__().objects if "clip/mean" in str(getattr(pane, "object", "")))
    assert note.visible and str(damaged) in note.object


def test_a_partition_damaged_while_shown_gives_a_message_on_switch(warehouse: Path, tmp_path: Path) -> None:
    from dashboards.app import AttentionExplorer, create_app

    damaged = _damaged_copy(warehouse, tmp_path / "warehouse")
    app = create_app(damaged)
    assert isinstance(app, AttentionExplorer)
    session = app.session
    assert session.problem == ""
    (damaged / "attention_maps/model=dinov2/method=rollout/shard=0/data.parquet").write_bytes(b"garbage" * 100)
    session.method = "rollout"  # the view switch reads the damaged file
    assert session.selection.method == "rollout"
    assert "dinov2/rollout" in session.problem and str(damaged) in session.problem and "\n" not in session.problem
    assert "unavailable" in heads_tab(app).overlays.fused.figure.title.text
    assert isinstance(app.tabs["overview"].pane(session.shape_key, "overview"), pn.pane.Alert)
    assert app.controls.csv_download.callback().getvalue().startswith(b"Could not export")
    assert app.controls.csv_download.filename == "export_failed.txt"
    session.method = "cls"
    assert session.problem == ""


def test_unexpected_errors_become_messages(explorer: AttentionExplorer, warehouse: Path, monkeypatch) -> None:
    """Whatever the query layer raises (not only QueryError), the user gets a message."""
    from dashboards import app as app_module
    from dashboards import data
    from dashboards.pages import WarehouseProblem

    session = explorer.session

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("a reader bug")

    monkeypatch.setattr(data, "head_grid", broken)
    session.head = 1
    assert "KeyError: 'a reader bug'" in session.problem
    monkeypatch.setattr(data, "load_index", broken)
    problem = app_module.create_app(warehouse)
    assert isinstance(problem, WarehouseProblem) and problem.error == "KeyError: 'a reader bug'"


def _expected_tile(values: np.ndarray, top: float, cmap: str, width: int) -> np.ndarray:
    """A head grid tile computed from the raw map: values / top binned into the 256 colours of Bokeh's palette
    as Bokeh's LinearColorMapper bins them (floor(x * 256), the top value in the last bin), cells upscaled to
    ``width``."""
    from bokeh import palettes

    colours = np.array([[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in getattr(palettes, f"{cmap.title()}256")])
    colours = colours.astype(np.uint8)[np.clip(np.floor(values / top * 256), 0, 255).astype(int)]
    grid_h, grid_w = values.shape
    height = round(width * grid_h / grid_w)
    rows = np.floor((np.arange(height) + 0.5) * grid_h / height).astype(int)
    cols = np.floor((np.arange(width) + 0.5) * grid_w / width).astype(int)
    return colours[rows][:, cols]


def _contains(canvas: np.ndarray, tile: np.ndarray) -> bool:
    height, width = tile.shape[:2]
    ys, xs = np.nonzero(np.all(canvas == tile[0, 0], axis=-1))
    return any(np.array_equal(canvas[y : y + height, x : x + width], tile) for y, x in zip(ys, xs, strict=True))


def test_png_head_grid_is_scaled_as_on_screen(explorer: AttentionExplorer, warehouse: Path) -> None:
    """The exported head grid follows the colour scale and colormap chosen on screen: shared = every tile over
    the layer's maximum, independent = each tile over its own; the screen's grid holds the same scaled maps."""
    from PIL import Image

    from dashboards.export import GRID_CELL_PX

    session = explorer.session
    image = image_id_of(warehouse, "chelsea.jpg")
    maps = [expected_map(warehouse, "dinov2", "cls", image, 1, head) for head in (None, 0, 1, 2, 3)]
    layer_top = max(float(m.max()) for m in maps)
    assert any(float(m.max()) < layer_top for m in maps)  # else shared and independent would look the same
    for scale in ("shared", "independent"):
        query = {"image": "chelsea.jpg", "model": "dinov2", "method": "cls", "layer": 1, "head": 2}
        session.apply_query({**query, "cmap": "magma", "scale": scale, "opacity": 0.3})
        canvas = np.asarray(Image.open(explorer.controls.png_download.callback()).convert("RGB"))
        screen = np.flipud(heads_tab(explorer).grid_strip.maps.data["image"][0])  # the mosaic on screen, numpy rows
        grid_h, grid_w = maps[0].shape
        for k, values in enumerate(maps):
            top = layer_top if scale == "shared" else float(values.max())
            np.testing.assert_allclose(screen[:grid_h, k * grid_w : (k + 1) * grid_w], values / top, rtol=1e-6)
            assert _contains(canvas, _expected_tile(values, top, "magma", GRID_CELL_PX)), (scale, k)
            other = float(values.max()) if scale == "shared" else layer_top
            if other != top:  # the other scale's tile is not in this export
                assert not _contains(canvas, _expected_tile(values, other, "magma", GRID_CELL_PX)), (scale, k)


def test_url_sync_follows_back_and_forward(explorer: AttentionExplorer, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the browser reports (page up, Back, Forward) is shown; a view change pushes a history entry; a URL
    the server completes replaces its entry (a pushed normalisation would trap Back)."""
    from urllib.parse import parse_qsl

    from dashboards.url_sync import sync_url

    session = explorer.session
    written: list[tuple[dict[str, str], bool]] = []
    searches: list[tuple[str, str]] = []  # (base, search): each write names the URL it replaces or follows

    def write(search: str, push: bool, base: str) -> None:
        written.append((dict(parse_qsl(search[1:])), push))
        searches.append((base, search))

    browser = session.browser_url
    monkeypatch.setattr(browser, "write", write)
    sync_url(session, browser, {"model": "clip", "head": 1}, session.url_watched())
    assert (session.selection.model, session.selection.head) == ("clip", 1)
    assert written == []  # nothing is written before the browser reports its URL

    browser._handle_msg("?model=clip&head=1")  # the page is up, with the link's (partial) query
    assert len(written) == 1 and written[0][1] is False  # completed in place
    assert searches[0][0] == "?model=clip&head=1"
    first = written[0][0]
    assert first == session.query() and (first["model"], first["head"]) == ("clip", "1")

    session.head = 3
    assert written[-1] == ({**first, "head": "3"}, True)  # a new history entry
    session.scale = "independent"
    second = written[-1][0]
    assert second["scale"] == "independent" and second["head"] == "3" and written[-1][1] is True
    assert [base for base, _ in searches[1:]] == [search for _, search in searches[:-1]]
    count = len(written)

    browser._handle_msg("?" + "&".join(f"{k}={v}" for k, v in first.items()))  # Back
    assert (session.selection.head, session.scale) == (1, "shared")
    assert len(written) == count  # the URL already shows the view: nothing written, Forward stays possible
    browser._handle_msg("?" + "&".join(f"{k}={v}" for k, v in second.items()))  # Forward
    assert (session.selection.head, session.scale) == (3, "independent")
    assert len(written) == count


# --- a new tab is one module and one line in TABS --------------------------------------------------------------


def _notes_tab() -> type:
    """A tab as a new module would write it: a key, a label, a parameter kept in the URL, a layout on the
    session's selection."""
    import param

    from dashboards.tabs import Tab

    class NotesTab(Tab):
        key = "notes"
        label = "Notes"
        url_keys = {"note": "text"}  # noqa: RUF012 (a class-level declaration, as the real tabs write it)
        text = param.String(default="hello")

        def __panel__(self) -> pn.viewable.Viewable:
            def note(text: str, selection: Any) -> str:
                return f"{text}: {selection.model}/{selection.method}"

            return pn.pane.Markdown(pn.bind(note, self.param.text, self.session.param.selection))

    return NotesTab


def test_a_tab_added_to_TABS_appears_with_its_url_keys(warehouse: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dashboards import app as app_module

    notes_tab = _notes_tab()
    monkeypatch.setattr(app_module, "TABS", [*app_module.TABS, notes_tab])
    app = app_module.create_app(warehouse)
    assert isinstance(app, app_module.AttentionExplorer)
    session = app.session
    assert list(app.tabs) == ["heads", "overview", "statistics", "alignment", "compare", "glossary", "notes"]
    assert isinstance(app.tabs["notes"], notes_tab) and app.tabs["notes"].session is session
    tabs = next(iter(app.__panel__().select(pn.Tabs)))
    assert tabs._names[-1] == "Notes" and tabs.active == 0

    query = session.query()
    assert query["note"] == "hello" and query["tab"] == "heads"
    session.apply_query({"tab": "notes", "note": "seen", "model": "clip", "method": "mean"})
    assert tabs.active == 6 and app.tabs["notes"].text == "seen"
    assert session.query()["note"] == "seen" and session.query()["tab"] == "notes"
    shown = tabs.objects[-1].object
    assert shown.startswith("seen: clip/mean")  # the tab's own layout, on the session's selection
    tabs.active = 0  # a click on the first tab
    assert session.tab == "heads"
    owners = {type(owner).__name__: names for owner, names in session.url_watched()}
    assert owners["NotesTab"] == ["text"]  # the URL follows the tab's parameter too


def test_tabs_cannot_take_each_others_url_keys(warehouse: Path) -> None:
    from dashboards import data
    from dashboards.app import TABS, AttentionExplorer

    class ClashingTab(_notes_tab()):  # type: ignore[misc]
        key = "clash"
        url_keys = {"cmap": "text"}  # noqa: RUF012

    loaded = data.load_index(warehouse)
    with pytest.raises(ValueError, match=r"URL key\(s\) cmap of ClashingTab are taken"):
        AttentionExplorer(loaded, [*TABS, ClashingTab])
    with pytest.raises(ValueError, match="tab keys must be unique"):
        AttentionExplorer(loaded, [*TABS, TABS[0]])


def test_compare_groups_are_the_roles_present(explorer: AttentionExplorer) -> None:
    """One group per role of the warehouse's methods, each naming the methods the models use for it; an older
    link's method name stands for its role; each card shows its model's method of that role."""
    session, compare = explorer.session, explorer.tabs["compare"]
    assert compare.param.role.objects == {  # the six registry models: ViTs with cls/mean/rollout, SigLIP, ResNet
        "CLS-like (cls · probe · gradcam)": "cls",
        "Mean attention (mean · gradcam)": "mean",
        "Attention flow (rollout · gradcam)": "flow",
        "Saliency (cls · probe · gradcam)": "saliency",
    }
    assert compare.role == "cls"
    session.apply_query({"compare": "rollout", "tab": "compare"})
    assert compare.role == "flow" and session.query()["compare"] == "flow"
    session.apply_query({"compare": "nonsense"})
    assert compare.role == "flow"  # invalid: kept
    view = compare.view(session.selection.image, 1.0, "flow", "viridis", 0.6, "compare")
    methods = {c.objects[0].object.split("**")[1]: c.objects[0].object.split(" · ")[1] for c in view.objects[0].objects}
    assert methods == {m: "gradcam" if m == "resnet50" else "rollout" for m in MODELS}


# --- non-square grids: every view keeps a 2 x 3 (and 3 x 2) grid the right way up and round ----------------


@pytest.fixture(scope="module")
def wide(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory, make_tiny_checkpoint: Any) -> Path:
    from tests.dashboard_fixtures import wide_warehouse

    return wide_warehouse(sample_dir, tmp_path_factory.mktemp("wide_app"), make_tiny_checkpoint)


@pytest.mark.parametrize("file_name", ["coffee.jpg", "coffee_tall.jpg"])
def test_non_square_grids_in_every_view(wide: Path, file_name: str) -> None:
    from PIL import Image

    from dashboards import data
    from dashboards.app import create_app
    from tests.dashboard_fixtures import WIDE_IMAGES

    grid_h, grid_w = WIDE_IMAGES[file_name]
    image = image_id_of(wide, file_name)
    app = create_app(wide)
    session = app.session
    session.apply_query({"image": file_name, "model": "dinov2", "method": "cls", "layer": 1, "head": 2})
    assert session.notice == ""
    stored = {h: expected_map(wide, "dinov2", "cls", image, 1, h) for h in (None, 0, 1, 2, 3)}
    heads = heads_tab(app)
    # overlays: the stored rows, spanning the input's frame (x in [0, 1], y in [0, h / w]) with square cells
    for overlay, head in ((heads.overlays.fused, None), (heads.overlays.head, 2)):
        np.testing.assert_array_equal(shown(overlay), stored[head])
        assert overlay.heat.data["dh"][0] == pytest.approx(grid_h / grid_w)
        assert overlay.figure.frame_height / overlay.figure.frame_width == pytest.approx(grid_h / grid_w, rel=0.01)
    # head grid: one row of (grid_h x grid_w) tiles, fused first
    mosaic = np.flipud(heads.grid_strip.maps.data["image"][0])
    assert mosaic.shape == (grid_h, 5 * grid_w)
    top = max(float(m.max()) for m in stored.values())  # shared scale
    for k, head in enumerate((None, 0, 1, 2, 3)):
        np.testing.assert_allclose(mosaic[:, k * grid_w : (k + 1) * grid_w], stored[head] / top, rtol=1e-6)
    # overview: layers (rows) x (fused + heads), each tile grid_h x grid_w, first layer on top
    overview = app.tabs["overview"].plot((session.selection, "viridis", "shared", "zero"))
    cells = np.flipud(overview.dimension_values(2, flat=False))  # hv gives rows bottom-up: back to top-down
    assert cells.shape == (2 * grid_h, 5 * grid_w)
    layer_top = max(
        float(expected_map(wide, "dinov2", "cls", image, layer, h).max()) for layer in (0, 1) for h in stored
    )
    np.testing.assert_allclose(cells[grid_h:, 3 * grid_w : 4 * grid_w], stored[2] / layer_top, rtol=1e-6)
    # CSV export: row and col index the grid as stored
    table = pacsv.read_csv(io.BytesIO(app.controls.csv_download.callback().getvalue())).to_pylist()
    for row in (r for r in table if r["head"] == 2):
        assert row["value"] == pytest.approx(float(stored[2][row["row"], row["col"]]), rel=1e-6)
    assert {(r["row"], r["col"]) for r in table} == {(r, c) for r in range(grid_h) for c in range(grid_w)}
    # PNG export: each panel is the map at the input's aspect (longer side PANEL_PX), its hot cell in place
    from dashboards import export

    png = Image.open(io.BytesIO(app.controls.png_download.callback().getvalue()))
    assert png.width > 0
    rgb = data.input_rgb(str(wide), image, "dinov2")
    assert rgb.shape[:2] == (grid_h * 16, grid_w * 16)  # what the model saw: no crop, 16-px patches
    panel = np.asarray(export._panel(rgb, stored[None], 1.0, (0.0, float(stored[None].max())), "gray", "x"))
    map_h = panel.shape[0] - export.CAPTION_PX
    map_w = round(map_h * grid_w / grid_h)
    assert max(map_h, map_w) == export.PANEL_PX
    hot_r, hot_c = np.unravel_index(stored[None].argmax(), stored[None].shape)
    centre = panel[export.CAPTION_PX + round((hot_r + 0.5) * map_h / grid_h), round((hot_c + 0.5) * map_w / grid_w)]
    assert centre.min() >= 250  # white: the top of the grey scale, at the stored row and column
    # compare: the card is the overlay at the input's size (rows and columns as the model saw them)
    compare = app.tabs["compare"].view(image, 1.0, "cls", "gray", 1.0, "compare")
    card = compare.objects[0].objects[0]
    drawn = np.asarray(Image.open(io.BytesIO(card.objects[1].objects[0].object)).convert("RGB"))
    assert drawn.shape[:2] == rgb.shape[:2]
    cell = drawn[hot_r * 16 : (hot_r + 1) * 16, hot_c * 16 : (hot_c + 1) * 16]
    assert cell.min() >= 250  # the hottest cell is white in the grey colormap, at its stored row and column
