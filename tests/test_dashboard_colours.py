"""One palette source: the colours of the dashboard's plots (heads, head grid, layers × heads, statistics) and
of its PNG export are Bokeh's 256-entry palettes, and a value gets the same palette entry on screen (Bokeh's
LinearColorMapper) and in the exported PNG (ssl_attention.render)."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from bokeh import palettes

from tests.dashboard_fixtures import dashboard_warehouse, open_explorer

if TYPE_CHECKING:
    from dashboards.app import AttentionExplorer

# what each colormap offered on screen must be, written out from bokeh.palettes
EXPECTED = {
    "viridis": palettes.Viridis256,
    "magma": palettes.Magma256,
    "inferno": palettes.Inferno256,
    "cividis": palettes.Cividis256,
    "gray": palettes.Greys256,
}


def rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def bokeh_bin(values: np.ndarray, low: float, high: float, size: int = 256) -> np.ndarray:
    """Bokeh's LinearColorMapper: key = floor(((v - low) * (1 / (high - low))) / (1 / size)); v == high takes
    the last entry; keys outside [0, size) take the end entries (no low/high colours are set here)."""
    key = np.floor(((values.astype(np.float64) - low) * (1 / (high - low))) / (1 / size))
    key[values == high] = size - 1
    return np.clip(key, 0, size - 1).astype(int)


@pytest.fixture(scope="module")
def warehouse(tiny_warehouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dashboard_warehouse(tiny_warehouse, tmp_path_factory.mktemp("dashboard_colours") / "warehouse")


@pytest.fixture
def explorer(warehouse: Path) -> AttentionExplorer:
    return open_explorer(warehouse)


def test_the_offered_colormaps_are_bokehs_palettes() -> None:
    from ssl_attention.render import COLORMAPS, colormap_lut, palette

    assert set(COLORMAPS) == set(EXPECTED)
    for name, colours in EXPECTED.items():
        assert palette(name) == list(colours)
        assert [tuple(int(c) for c in row) for row in colormap_lut(name)] == [rgb(c) for c in colours]
    with pytest.raises(ValueError, match="unknown colormap 'jet'; valid: viridis"):
        palette("jet")


def test_every_tab_draws_with_the_same_palette(explorer: AttentionExplorer) -> None:
    """The colour mappers of the heads tab (overlays, head grid), the layers × heads mosaic and the statistics
    heatmap, as Bokeh receives them, hold the palette of the chosen colormap."""
    import holoviews as hv

    session = explorer.session
    heads, overview, statistics = (explorer.tabs[key] for key in ("heads", "overview", "statistics"))
    for name, colours in EXPECTED.items():
        session.apply_query({"model": "dinov2", "method": "cls", "layer": 1, "head": 2, "cmap": name})
        mappers: dict[str, Any] = {
            "fused overlay": heads.overlays.fused.mapper,
            "head overlay": heads.overlays.head.mapper,
            "head grid": heads.grid_strip.mapper,
        }
        mosaic = hv.render(overview.plot((session.selection, session.cmap, session.scale, session.contrast)))
        mappers["layers × heads"] = next(
            r.glyph.color_mapper for r in mosaic.renderers if hasattr(r.glyph, "color_mapper")
        )
        heat = hv.render(statistics.plot((session.selection, session.cmap), "entropy_norm", "all"))
        mappers["statistics"] = next(r.glyph.fill_color.transform for r in heat.renderers if hasattr(r, "glyph"))
        for where, mapper in mappers.items():
            assert list(mapper.palette) == list(colours), (name, where)


def test_exported_png_colours_equal_the_screen_palette_entries(
    explorer: AttentionExplorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Known values, one per palette entry, drawn as the fused map at opacity 1: each cell of the exported PNG
    has the colour Bokeh's mapper on screen gives that value (its palette entry by Bokeh's binning rule).
    Values near both edges of every bin, where rounding instead of Bokeh's floor would pick a neighbour."""
    from PIL import Image

    from dashboards import data
    from dashboards.export import CAPTION_PX, MARGIN_PX, PANEL_PX, TITLE_PX

    session = explorer.session
    heads = explorer.tabs["heads"]
    real = data.head_grid
    top = 0.37  # any scale: the mapper runs from 0 to the map's maximum
    keys = np.arange(256)
    shown: dict[str, np.ndarray] = {}

    def known_grid(*args: Any, **kwargs: Any) -> Any:
        return dataclasses.replace(real(*args, **kwargs), maps=shown["ramp"][None])

    monkeypatch.setattr(data, "head_grid", known_grid)
    for offset in (0.05, 0.5, 0.95):  # where in each bin: near its low edge, its middle, near its high edge
        values = ((keys + offset) / 256 * top).astype(np.float32)
        values[-1] = np.float32(top)  # the top value: Bokeh's last entry
        shown["ramp"] = ramp = values.reshape(16, 16)
        session.apply_query({"model": "dinov2", "method": "rollout", "layer": 1, "opacity": 1})  # one map, no grid
        heads.render()  # the ramp, whether or not the selection changed
        for name in EXPECTED:
            session.cmap = name
            mapper = heads.overlays.fused.mapper
            np.testing.assert_array_equal(np.flipud(heads.overlays.fused.heat.data["image"][0]), ramp)
            assert (mapper.low, mapper.high) == (0.0, float(np.float32(top)))
            bins = bokeh_bin(ramp, mapper.low, mapper.high)
            assert (bins.ravel() == keys).all()  # each value its own entry
            screen = np.array([rgb(c) for c in mapper.palette])[bins]

            png = Image.open(io.BytesIO(explorer.controls.png_download.callback().getvalue())).convert("RGB")
            canvas = np.asarray(png)
            input_h, input_w = session.rgb(session.selection.image, "dinov2").shape[:2]
            panel_h = round(PANEL_PX * input_h / input_w)
            rows, cols = ramp.shape
            ys = TITLE_PX + CAPTION_PX + ((np.arange(rows) + 0.5) * panel_h / rows).astype(int)
            xs = MARGIN_PX + ((np.arange(cols) + 0.5) * PANEL_PX / cols).astype(int)
            np.testing.assert_array_equal(canvas[np.ix_(ys, xs)], screen, err_msg=f"{name}, offset {offset}")
