"""Helpers for the dashboard's tests: a warehouse to show (with one model marked as random weights), the maps
it holds, and the app served on a free port.

Used by tests/test_dashboard_app.py and tests/test_dashboard_browser.py (not a conftest: nothing here is
collected or auto-used). Launching Chromium and reading what Bokeh plotted live in ``bench.browser``, shared
with the latency benchmark.
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

REQUIRE_BROWSER_ENV = "SSL_ATTENTION_REQUIRE_BROWSER"
RANDOM_MODEL = "mae"  # dashboard_warehouse() marks this model's rows as random weights (banner tests)
RANDOM_SEED = 0
WEIGHTS_TABLES = ("models", "attention_maps", "inputs")  # per-model tables whose rows say where weights came from


def dashboard_warehouse(tiny_warehouse: Path, destination: Path) -> Path:
    """A copy of the tiny warehouse with ``RANDOM_MODEL``'s rows marked as random weights (the tiny checkpoints
    are local ones; the real random mode builds base-size models, too slow here), and head statistics."""
    import shutil

    from ssl_attention.stats import write_head_stats

    shutil.copytree(tiny_warehouse, destination)
    for table in WEIGHTS_TABLES:
        for path in sorted((destination / table / f"model={RANDOM_MODEL}").rglob("*.parquet")):
            _mark_random(path, RANDOM_MODEL)
    for model_dir in sorted((destination / "attention_maps").glob("model=*")):  # after: stats copy the weights
        write_head_stats(destination, model_dir.name.split("=", 1)[1])
    return destination


def random_provenance(slug: str) -> Any:
    """What ``--weights random`` records for ``slug``: the hub model's architecture, seed 0, and the fingerprint
    of the bundled config it is built from (as ``ssl_attention.models.loading`` computes it)."""
    from ssl_attention.models.weights import CONFIG_DIR, Provenance, file_fingerprint
    from ssl_attention.registry import MODELS

    configs = sorted((CONFIG_DIR / slug).glob("*.json"))
    fingerprint = file_fingerprint(*configs)
    return Provenance(mode="random", source=MODELS[slug].default_weights, seed=RANDOM_SEED, fingerprint=fingerprint)


def _mark_random(path: Path, slug: str) -> None:
    """Rewrite every weights column of a Parquet file as random weights would have written it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    provenance = random_provenance(slug)
    values = {
        "weights_mode": provenance.mode,
        "weights_source": provenance.source,
        "weights_revision": provenance.revision,  # None: a random model has no hub revision
        "weights_seed": provenance.seed,
        "weights_id": provenance.weights_id,  # random:<hub id>:seed=0#<fingerprint>
    }
    table = pq.read_table(path)
    for name, value in values.items():
        index = table.schema.get_field_index(name)
        if index >= 0:
            field = table.schema.field(index)
            table = table.set_column(index, field, pa.array([value] * table.num_rows, field.type))
    pq.write_table(table, path)


def expected_map(warehouse: Path, model: str, method: str, image_id: str, layer: int, head: int | None) -> Any:
    """One map straight from the Parquet partition, (grid_h, grid_w) float32 — the reference for the views."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(
        warehouse / "attention_maps" / f"model={model}" / f"method={method}" / "shard=0" / "data.parquet"
    )
    mask = pc.and_(pc.equal(table["image_id"], image_id), pc.equal(table["layer"], layer))
    mask = pc.and_(mask, pc.is_null(table["head"]) if head is None else pc.equal(table["head"], head))
    rows = table.filter(mask)
    assert rows.num_rows == 1, (model, method, image_id, layer, head)
    grid_h, grid_w = rows["grid_h"][0].as_py(), rows["grid_w"][0].as_py()
    return np.asarray(rows["map_values"][0].as_py(), dtype=np.float32).reshape(grid_h, grid_w)


def stored_layers(warehouse: Path, model: str, method: str) -> list[int]:
    """The layers a model/method partition holds, ascending, straight from its Parquet file."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = warehouse / "attention_maps" / f"model={model}" / f"method={method}" / "shard=0" / "data.parquet"
    return sorted(pc.unique(pq.read_table(path, columns=["layer"])["layer"]).to_pylist())


def image_id_of(warehouse: Path, file_name: str) -> str:
    import pyarrow.parquet as pq

    images = pq.read_table(warehouse / "images" / "data.parquet").to_pylist()
    return next(row["image_id"] for row in images if row["file_name"] == file_name)


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


WIDE_RESOLUTION = 32  # shorter side in px: with 16-px patches a 3:2 image is a 2 x 3 grid, a 2:3 one 3 x 2
WIDE_IMAGES = {"coffee.jpg": (2, 3), "coffee_tall.jpg": (3, 2)}  # file -> (grid_h, grid_w) expected


def wide_warehouse(sample_dir: Path, destination: Path, make_checkpoint: Callable[..., Path]) -> Path:
    """A warehouse of non-square grids: coffee.jpg (600 x 400) and the same photo turned upright (400 x 600)
    through a tiny DINOv2 with 16-px patches at resolution 32 (no crop): 2 x 3 and 3 x 2 grids."""
    from PIL import Image

    from ssl_attention.extraction import catalog_images, extract_model
    from ssl_attention.models.loading import LoadRequest, load_model

    folder = destination / "images"
    folder.mkdir(parents=True)
    photo = Image.open(sample_dir / "coffee.jpg")
    photo.save(folder / "coffee.jpg", quality=95)
    photo.transpose(Image.Transpose.ROTATE_90).save(folder / "coffee_tall.jpg", quality=95)
    checkpoint = make_checkpoint("dinov2", destination / "checkpoint", seed=3, patch_size=16, image_size=64)
    adapter = load_model("dinov2", LoadRequest(checkpoint=checkpoint, device="cpu", resolution=WIDE_RESOLUTION))
    warehouse = destination / "warehouse"
    records = catalog_images(folder, warehouse).catalog.records
    report = extract_model(adapter, records, warehouse)
    assert report.images_extracted == len(WIDE_IMAGES), report
    return warehouse


def open_explorer(warehouse: Path) -> Any:
    """The dashboard's explorer over ``warehouse``, as ``create_app`` builds it for a browser session."""
    from dashboards.app import AttentionExplorer, create_app

    app = create_app(warehouse)
    assert isinstance(app, AttentionExplorer)
    return app


SAMPLE_ANNOTATIONS = Path(__file__).resolve().parents[1] / "data" / "samples" / "annotations.json"


def aligned_dashboard_warehouse(tiny_warehouse: Path, destination: Path, models: tuple[str, ...] = ()) -> Path:
    """``dashboard_warehouse`` plus the sample annotations and alignment (scores and head rankings) for
    ``models`` (all when empty)."""
    from ssl_attention.alignment.compute import write_alignment
    from ssl_attention.alignment.store import write_annotations

    warehouse = dashboard_warehouse(tiny_warehouse, destination)
    write_annotations(warehouse, SAMPLE_ANNOTATIONS)
    for model_dir in sorted((warehouse / "attention_maps").glob("model=*")):
        slug = model_dir.name.split("=", 1)[1]
        if not models or slug in models:
            write_alignment(warehouse, slug)
    return warehouse
