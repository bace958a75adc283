"""Helpers for the dashboard's browser tests and benchmark: serve the app on a free port, launch Chromium,
read what Bokeh actually plotted.

Used by tests/test_dashboard_browser.py and bench/dashboard_latency.py (not a conftest: nothing here is
collected or auto-used).
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
REQUIRE_BROWSER_ENV = "SSL_ATTENTION_REQUIRE_BROWSER"
RANDOM_MODEL = "mae"  # dashboard_warehouse() marks this model's rows as random weights (banner tests)


def dashboard_warehouse(tiny_warehouse: Path, destination: Path) -> Path:
    """A copy of the tiny warehouse with head statistics, and ``RANDOM_MODEL``'s rows marked as random weights
    (the tiny checkpoints are local ones; the real random mode builds base-size models, too slow here)."""
    import shutil

    from ssl_attention.stats import write_head_stats

    shutil.copytree(tiny_warehouse, destination)
    for model_dir in sorted((destination / "attention_maps").glob("model=*")):
        write_head_stats(destination, model_dir.name.split("=", 1)[1])
    paths = [destination / "models" / f"model={RANDOM_MODEL}" / "data.parquet"]
    paths += (destination / "attention_maps" / f"model={RANDOM_MODEL}").glob("method=*/data.parquet")
    for path in paths:
        _mark_random(path)
    return destination


def _mark_random(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    index = table.schema.get_field_index("weights_mode")
    table = table.set_column(index, table.schema.field(index), pa.array(["random"] * table.num_rows, pa.string()))
    pq.write_table(table, path)


def expected_map(warehouse: Path, model: str, method: str, image_id: str, layer: int, head: int | None) -> Any:
    """One map straight from the Parquet partition, (grid_h, grid_w) float32 — the reference for the views."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(warehouse / "attention_maps" / f"model={model}" / f"method={method}" / "data.parquet")
    mask = pc.and_(pc.equal(table["image_id"], image_id), pc.equal(table["layer"], layer))
    mask = pc.and_(mask, pc.is_null(table["head"]) if head is None else pc.equal(table["head"], head))
    rows = table.filter(mask)
    assert rows.num_rows == 1, (model, method, image_id, layer, head)
    grid_h, grid_w = rows["grid_h"][0].as_py(), rows["grid_w"][0].as_py()
    return np.asarray(rows["map_values"][0].as_py(), dtype=np.float32).reshape(grid_h, grid_w)


def image_id_of(warehouse: Path, file_name: str) -> str:
    import pyarrow.parquet as pq

    images = pq.read_table(warehouse / "images" / "data.parquet").to_pylist()
    return next(row["image_id"] for row in images if row["file_name"] == file_name)


def browser_missing_reason() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} not found (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    return None


def browser_required() -> bool:
    return os.environ.get(REQUIRE_BROWSER_ENV, "") == "1"


@contextlib.contextmanager
def serve_threaded(app: Callable[[], Any], timeout: float = 30.0) -> Iterator[int]:
    """Serve ``app`` (called once per browser session) on a free port in a thread; yields the port."""
    import panel as pn
    from panel.io.state import state

    server_id = uuid.uuid4().hex
    thread = pn.serve(
        app, port=0, threaded=True, show=False, liveness=True, server_id=server_id, verbose=False, title="test"
    )
    try:
        deadline = time.monotonic() + timeout
        while server_id not in state._servers:
            if time.monotonic() > deadline:
                raise TimeoutError("the Panel server did not start")
            time.sleep(0.05)
        port = state._servers[server_id][0].port
        while True:
            try:
                if requests.get(f"http://localhost:{port}/liveness", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the Panel server is not live")
            time.sleep(0.05)
        yield port
    finally:
        thread.stop()
        thread.join(10)


# --- reading the Bokeh document from the page ---------------------------------------------------------------

# All plotted float images (hv.Image -> bokeh Image glyph) with the title of their figure; rows are flipped
# with respect to the numpy array (bokeh's origin is bottom-left).
PLOTTED_IMAGES_JS = """() => {
  const doc = window.Bokeh?.documents?.[0];
  if (!doc) return [];
  const models = [...doc.all_models];
  const out = [];
  for (const fig of models.filter(m => m.type === 'Plot' || m.type === 'Figure')) {
    for (const r of fig.renderers) {
      if (r.type !== 'GlyphRenderer' || r.glyph.type !== 'Image') continue;
      const a = r.data_source.data.image?.[0];
      if (!a) continue;
      out.push({title: fig.title?.text ?? '', shape: a.shape, values: Array.from(a)});
    }
  }
  return out;
}"""

WIDGET_VALUE_JS = """([type, title]) => {
  const doc = window.Bokeh?.documents?.[0];
  const m = doc && [...doc.all_models].find(m => m.type === type && m.title === title);
  return m ? {value: m.value, visible: m.visible} : null;
}"""

DOC_READY_JS = """() => {
  const doc = window.Bokeh?.documents?.[0];
  return !!doc && [...doc.all_models].some(m => m.type === 'GlyphRenderer' && m.glyph?.type === 'Image'
    && m.data_source.data.image?.[0]?.length > 1);
}"""


def plotted_images(page: Any) -> list[dict[str, Any]]:
    return page.evaluate(PLOTTED_IMAGES_JS)


def plotted_by_title(page: Any, prefix: str) -> dict[str, Any] | None:
    """The first plotted image whose figure title starts with ``prefix``."""
    return next((p for p in plotted_images(page) if p["title"].startswith(prefix)), None)


def launch_chromium(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
