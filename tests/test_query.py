"""The query layer against a warehouse built from tiny checkpoints: results equal the Parquet rows,
validation names valid values, damaged files give one-line errors, the SQL views and catalog work, and readers
survive concurrent rewrites."""

from __future__ import annotations

import os
import random
import shutil
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ssl_attention import registry
from ssl_attention.models.weights import Provenance
from ssl_attention.query import (
    EmptyWarehouseError,
    MissingDataError,
    QueryError,
    StoredProvenance,
    UnknownNameError,
    UnreadableFileError,
    connection,
    cursor,
    layer_at_depth,
    open_warehouse,
    write_catalog,
)
from ssl_attention.query.connection import views_cursor
from ssl_attention.query.views import TABLES, create_views
from ssl_attention.warehouse import schema
from ssl_attention.warehouse.atomic import PartitionWriter
from ssl_attention.warehouse.paths import iter_partitions
from tests.sql_helpers import build_sql_warehouse, fused_first, grid_of, read_partition, select

VIEWS = (*TABLES, "methods", "attention_cells", "head_feature_matrix", "exemplars")


@pytest.fixture(scope="module")
def warehouse(tiny_warehouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sql_warehouse(tiny_warehouse, tmp_path_factory.mktemp("query") / "wh")


@pytest.fixture(scope="module")
def wh(warehouse: Path):
    return open_warehouse(warehouse)


@pytest.fixture(scope="module")
def image_ids(wh) -> list[str]:
    return [image.image_id for image in wh.images()]


# --- listing ---------------------------------------------------------------------------------------------


def test_models_carry_heads_layers_grid_and_methods(wh):
    models = {m.slug: m for m in wh.models()}
    assert list(models) == list(registry.MODELS)  # registry order
    dino = models["dinov2"]
    assert (dino.num_heads, dino.num_layers, dino.grid, dino.num_registers) == (4, 2, (4, 4), 4)
    assert dino.methods == ("cls", "mean", "rollout") and dino.per_head_methods == ("cls", "mean")
    assert dino.has_heads("cls") and not dino.has_heads("rollout")
    assert models["siglip"].methods == ("mean", "probe", "rollout") and models["siglip"].default_method == "probe"
    cnn = models["resnet50"]
    assert (cnn.num_heads, cnn.num_layers, cnn.grid, cnn.per_head_methods) == (0, 4, None, ())
    assert cnn.default_method == "gradcam" and not cnn.has_heads("gradcam")
    assert dino.provenance.mode == "local" and not dino.provenance.is_random
    assert dino.provenance.describe() == f"local checkpoint {dino.provenance.source}"
    assert wh.methods("mae") == ("cls", "mean", "rollout")
    assert wh.layers("siglip", "probe") == (2,)  # the pooling head sits after the last block
    assert wh.layers("resnet50", "gradcam") == (0, 1, 2, 3)
    assert wh.heads("clip", "mean") == (0, 1, 2, 3)
    assert wh.heads("clip", "rollout") == () and wh.heads("resnet50", "gradcam") == ()


def test_images_have_names_and_thumbnails(wh, sample_dir: Path):
    images = wh.images()
    assert sorted(i.file_name for i in images) == sorted(p.name for p in sample_dir.glob("*.jpg"))
    assert all(i.thumbnail and i.thumbnail[:2] == b"\xff\xd8" for i in images)  # JPEG
    assert wh.input_image(images[0].image_id, "clip")[:2] == b"\xff\xd8"


# --- maps equal the Parquet rows -------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "method"), [("dinov2", "cls"), ("siglip", "probe"), ("mae", "mean")])
def test_head_grid_equals_the_parquet_rows_and_fused_is_the_head_mean(wh, warehouse, image_ids, model, method):
    table = read_partition(warehouse, "attention_maps", model, method)
    for image_id in image_ids:
        for layer in wh.layers(model, method):
            grid = wh.head_grid(image_id, model, method, layer)
            rows = select(table, image_id=image_id, layer=layer)
            rows = fused_first(rows)
            assert grid.heads == (None, 0, 1, 2, 3) == tuple(rows["head"].to_pylist())
            assert grid.maps.dtype == np.float32 and grid.maps.shape == (5, 4, 4)
            np.testing.assert_array_equal(grid.maps, grid_of(rows))
            np.testing.assert_allclose(grid.maps[0], grid.maps[1:].mean(axis=0), atol=1e-6)
            np.testing.assert_array_equal(grid.prefix_mass, rows["prefix_mass"].to_numpy())
            one = wh.map(image_id, model, method, layer, 2)
            np.testing.assert_array_equal(one.values, grid.maps[3])
            assert one.head == 2 and one.provenance == grid.provenance


def test_fused_only_methods_and_grad_cam(wh, warehouse, image_ids):
    image_id = image_ids[0]
    rollout = wh.head_grid(image_id, "clip", "rollout", 1)
    assert rollout.heads == (None,) and rollout.maps.shape == (1, 4, 4)
    table = read_partition(warehouse, "attention_maps", "resnet50", "gradcam")
    stages = wh.layer_head_maps(image_id, "resnet50", "gradcam")
    assert stages.layers == (0, 1, 2, 3) and stages.heads == (None,)
    assert [m.shape for m in stages.per_layer] == [(1, 16, 16), (1, 8, 8), (1, 4, 4), (1, 2, 2)]
    for layer, maps in zip(stages.layers, stages.per_layer, strict=True):
        np.testing.assert_array_equal(maps, grid_of(select(table, image_id=image_id, layer=layer)))
    with pytest.raises(QueryError, match="different grid per layer"):
        _ = stages.maps
    cam = wh.map(image_id, "resnet50", "gradcam", 3)
    assert cam.target_class is not None and cam.raw_scale is not None and cam.layer_name == "layer4"


def test_layers_by_heads_stacks_the_head_grids(wh, image_ids):
    image_id = image_ids[1]
    everything = wh.layer_head_maps(image_id, "dinov3", "cls")
    assert everything.maps.shape == (2, 5, 4, 4) and everything.heads == (None, 0, 1, 2, 3)
    for index, layer in enumerate(everything.layers):
        np.testing.assert_array_equal(everything.maps[index], wh.head_grid(image_id, "dinov3", "cls", layer).maps)
    assert everything.layer_names == ("block 0", "block 1")


def test_compare_models_picks_layer_by_relative_depth_and_default_method(wh, image_ids):
    assert [layer_at_depth((0, 1, 2, 3), d) for d in (0.0, 0.3, 0.5, 0.9, 1.0)] == [0, 1, 2, 3, 3]
    comparison = wh.compare_models(image_ids[0], depth=0.0)
    picked = {e.model: (e.method, e.layer) for e in comparison.entries}
    assert picked == {
        "dinov2": ("cls", 0),
        "dinov3": ("cls", 0),
        "mae": ("cls", 0),
        "clip": ("cls", 0),
        "siglip": ("probe", 2),
        "siglip2": ("probe", 2),
        "siglip2_naflex": ("probe", 2),
        "resnet50": ("gradcam", 0),
    }
    assert comparison.missing == {}
    last = wh.compare_models(image_ids[0], depth=1.0, methods={"dinov2": "rollout"})
    by_model = {e.model: e for e in last.entries}
    assert (by_model["dinov2"].method, by_model["dinov2"].layer, by_model["resnet50"].layer) == ("rollout", 1, 3)
    np.testing.assert_array_equal(by_model["clip"].map.values, wh.map(image_ids[0], "clip", "cls", 1).values)
    with pytest.raises(QueryError, match="depth"):
        wh.compare_models(image_ids[0], depth=1.5)


# --- statistics ------------------------------------------------------------------------------------------


def test_stat_grid_of_one_image_and_over_all_images(wh, warehouse, image_ids):
    stats = read_partition(warehouse, "head_stats", "dinov2", "cls")
    one = wh.stat_grid("dinov2", "cls", "entropy", image_ids[2])
    assert one.layers == (0, 1) and one.heads == (None, 0, 1, 2, 3) and one.values.shape == (2, 5)
    every = wh.stat_grid("dinov2", "cls", "entropy")
    for i, layer in enumerate(one.layers):
        for j, head in enumerate(one.heads):
            rows = select(stats, layer=layer, head=head)
            mine = select(rows, image_id=image_ids[2])
            assert one.values[i, j] == pytest.approx(mine["entropy"][0].as_py())
            assert every.values[i, j] == pytest.approx(np.mean(rows["entropy"].to_numpy()))
            assert every.counts[i, j] == len(image_ids)
    assert wh.stat_grid("clip", "rollout", "pearson_fused").values.tolist() == [[1.0], [1.0]]
    stats_row = wh.head_statistics(image_ids[2], "dinov2", "cls", 1, 3)
    assert stats_row["entropy"] == pytest.approx(one.values[1, 4])
    assert set(stats_row) >= {"entropy_norm", "mean_dist_px", "area60_frac", "pearson_fused", "jsd_fused"}


# --- validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda wh, i: wh.map(i, "dinov9", "cls", 0), UnknownNameError, "valid models: dinov2, dinov3, mae, clip"),
        (lambda wh, i: wh.map(i, "dinov2", "probe", 0), UnknownNameError, "valid methods: cls, mean, rollout"),
        (lambda wh, i: wh.map(i, "resnet50", "cls", 0), UnknownNameError, "valid methods: gradcam"),
        (lambda wh, i: wh.map(i, "dinov2", "cls", 7), UnknownNameError, "valid layers: 0, 1"),
        (lambda wh, i: wh.head_grid(i, "siglip", "probe", 0), UnknownNameError, "valid layers: 2"),
        (lambda wh, i: wh.map(i, "dinov2", "cls", 0, 4), UnknownNameError, "valid heads: 0..3"),
        (lambda wh, i: wh.map(i, "dinov2", "cls", 0, -1), UnknownNameError, "valid heads: 0..3"),
        (lambda wh, i: wh.map(i, "dinov2", "rollout", 0, 1), QueryError, "rollout is a fused-only method"),
        (lambda wh, i: wh.map(i, "resnet50", "gradcam", 0, 0), QueryError, "resnet50 is a CNN without attention"),
        (lambda wh, i: wh.map("deadbeef", "dinov2", "cls", 0), UnknownNameError, r"valid images: .*\(astronaut.jpg\)"),
        (lambda wh, i: wh.map(i, "dinov2", "cls", 1.0), QueryError, "layer must be an integer"),
        (lambda wh, i: wh.map(i, "dinov2", "cls", 0, True), QueryError, "head must be an integer"),
        (lambda wh, i: wh.stat_grid("dinov2", "cls", "bogus"), UnknownNameError, "valid statistics: entropy,"),
        (lambda wh, i: wh.heads("clip", "nope"), UnknownNameError, "valid methods"),
        (lambda wh, i: wh.map(i, None, "cls", 0), QueryError, "model must be a non-empty string"),
        # every query goes through the same checks, in the same order (model, method, head, layer)
        (lambda wh, i: wh.model("dinov9"), UnknownNameError, "valid models: dinov2, dinov3, mae, clip"),
        (lambda wh, i: wh.facts("clip", "probe"), UnknownNameError, "valid methods: cls, mean, rollout"),
        (lambda wh, i: wh.layer_head_maps(i, "siglip", "cls"), UnknownNameError, "valid methods: mean, probe"),
        (lambda wh, i: wh.stat_grid("mae", "gradcam", "entropy"), UnknownNameError, "valid methods: cls, mean"),
        (lambda wh, i: wh.head_statistics(i, "dinov2", "cls", 9, 0), UnknownNameError, "valid layers: 0, 1"),
        (lambda wh, i: wh.head_statistics(i, "dinov2", "cls", 9, 9), UnknownNameError, "valid heads: 0..3"),
        (lambda wh, i: wh.head_statistics(i, "clip", "rollout", 0, 0), QueryError, "rollout is a fused-only"),
        (lambda wh, i: wh.input_image(i, "dinov9"), UnknownNameError, "valid models"),
        (lambda wh, i: wh.compare_models(i, methods={"clip": "probe"}), UnknownNameError, "valid methods: cls"),
        (lambda wh, i: wh.head_grid(i, "dinov2", "cls", None), QueryError, "layer must be an integer, got None"),
    ],
)
def test_invalid_requests_name_the_valid_values(wh, image_ids, call, error, message):
    with pytest.raises(error, match=message) as info:
        call(wh, image_ids[0])
    assert isinstance(info.value, ValueError)
    if isinstance(info.value, UnknownNameError):
        assert isinstance(info.value, registry.UnknownNameError)


def test_numpy_integers_are_accepted(wh, image_ids):
    assert wh.map(image_ids[0], "dinov2", "cls", np.int64(1), np.int16(2)).head == 2


def test_one_model_and_the_facts_of_its_partition(wh, warehouse):
    assert wh.model("siglip") == {m.slug: m for m in wh.models()}["siglip"]
    table = read_partition(warehouse, "attention_maps", "resnet50", "gradcam")
    facts = wh.facts("resnet50", "gradcam")
    assert facts.layers == tuple(sorted(set(table["layer"].to_pylist()))) == wh.layers("resnet50", "gradcam")
    assert facts.grids == {0: (16, 16), 1: (8, 8), 2: (4, 4), 3: (2, 2)} and facts.heads == ()
    assert facts.has_gradcam_columns and not wh.facts("clip", "cls").has_gradcam_columns
    clip_heads = read_partition(warehouse, "attention_maps", "clip", "cls")["head"].drop_null().to_pylist()
    assert wh.facts("clip", "cls").heads == tuple(sorted(set(clip_heads))) == (0, 1, 2, 3)


def test_missing_head_stats_and_unextracted_images(tmp_path, warehouse, image_ids):
    copy = tmp_path / "partial"
    shutil.copytree(warehouse, copy)
    shutil.rmtree(copy / "head_stats" / "model=clip")
    partial = open_warehouse(copy)
    with pytest.raises(MissingDataError, match="head_stats"):
        partial.stat_grid("clip", "cls", "entropy")
    table = read_partition(copy, "attention_maps", "mae", "cls")
    keep = pc.invert(pc.equal(table["image_id"], image_ids[0]))
    pq.write_table(
        table.filter(keep), copy / "attention_maps" / "model=mae" / "method=cls" / "shard=0" / "data.parquet"
    )
    with pytest.raises(MissingDataError, match="has no mae/cls data yet"):
        partial.map(image_ids[0], "mae", "cls", 0)
    comparison = partial.compare_models(image_ids[0], 0.5)
    assert "mae" in comparison.missing and len(comparison.entries) == len(registry.MODELS) - 1


def test_missing_or_empty_warehouse_gives_empty_answers_and_typed_views(tmp_path):
    for root in (tmp_path / "does-not-exist", tmp_path / "empty"):
        if root.name == "empty":
            (root / "attention_maps").mkdir(parents=True)
        empty = open_warehouse(root)
        assert empty.images() == [] and empty.models() == [] and empty.is_empty()
        with pytest.raises(EmptyWarehouseError, match="ssl-attention run --images DIR --warehouse"):
            empty.head_grid("x", "dinov2", "cls", 0)
        con = duckdb.connect()
        assert not any(create_views(con, root).values())
        for view in VIEWS:
            assert con.execute(f"SELECT count(*) FROM {view}").fetchall() == [(5 if view == "methods" else 0,)]
        columns = {row[0]: row[1] for row in con.execute("DESCRIBE attention_maps").fetchall()}
        assert columns["model"] == "VARCHAR" and columns["map_values"] == "FLOAT[]" and columns["head"] == "SMALLINT"


def test_a_warehouse_filled_after_opening_is_seen(tmp_path, warehouse):
    root = tmp_path / "later"
    late = open_warehouse(root)
    assert late.images() == [] and late.is_empty()
    shutil.copytree(warehouse, root)
    assert len(late.images()) == 5
    assert [m.slug for m in late.models()][:1] == ["dinov2"]


# --- damaged files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_file_gives_a_one_line_query_error_naming_it(tmp_path, warehouse, image_ids, damage):
    root = tmp_path / "damaged"
    shutil.copytree(warehouse, root)
    maps = root / "attention_maps" / "model=dinov2" / "method=cls" / "shard=0" / "data.parquet"
    model_row = root / "models" / "model=clip" / "data.parquet"
    for path in (maps, model_row):
        if damage == "garbage":
            path.write_bytes(b"this is not parquet " * 64)
        else:  # the magic bytes at both ends, the middle cut away
            data = path.read_bytes()
            path.write_bytes(data[:64] + data[-8:])
    damaged = open_warehouse(root)
    calls = [
        (maps, lambda: damaged.head_grid(image_ids[0], "dinov2", "cls", 1)),
        (maps, lambda: damaged.map(image_ids[0], "dinov2", "cls", 0, 1)),
        (maps, lambda: damaged.layers("dinov2", "cls")),
        (model_row, lambda: damaged.models()),
        (model_row, lambda: damaged.head_grid(image_ids[0], "clip", "cls", 1)),
    ]
    for path, call in calls:
        with pytest.raises(UnreadableFileError) as info:
            call()
        error = info.value
        assert isinstance(error, QueryError) and not isinstance(error, duckdb.Error)
        message = str(error)
        assert message.startswith(f"cannot read {path}: ") and "\n" not in message, message
    np.testing.assert_array_equal(  # the other partitions still answer
        damaged.head_grid(image_ids[0], "mae", "cls", 1).maps,
        open_warehouse(warehouse).head_grid(image_ids[0], "mae", "cls", 1).maps,
    )


# --- provenance --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        ("pretrained", "facebook/dinov2-with-registers-base", "main", None),
        ("pretrained", "facebook/dinov2-with-registers-base", None, None),
        ("local", "/checkpoints/dino", None, None),
        ("random", "openai/clip-vit-base-patch16", None, 3),
    ],
)
def test_stored_provenance_speaks_the_library_vocabulary(fields):
    stored = StoredProvenance(*fields, weights_id="as-stored")
    library = Provenance(*fields)
    assert stored.describe() == library.describe() and stored.is_random == library.is_random
    assert stored.weights_id == "as-stored"  # the stored id is kept, never recomputed


# --- the SQL views, pruning, catalog -----------------------------------------------------------------------


def test_views_have_hive_types_and_prune_partitions(warehouse):
    con = duckdb.connect()
    create_views(con, warehouse)
    described = {r[0]: r[1] for r in con.execute("DESCRIBE head_stats").fetchall()}
    assert described["model"] == "VARCHAR" and described["method"] == "VARCHAR" and described["entropy"] == "DOUBLE"
    plan = con.execute(
        "EXPLAIN ANALYZE SELECT sum(layer) FROM attention_maps WHERE model = $m AND method = $x",
        {"m": "clip", "x": "cls"},
    )
    text = plan.fetchall()[0][1]
    assert "Total Files Read: 1" in text  # 16 partitions on disk, one scanned


def test_catalog_file_opens_in_any_duckdb_client(warehouse, image_ids):
    catalog = write_catalog(warehouse)
    assert catalog == warehouse / "attention.duckdb"
    assert not [p for p in warehouse.iterdir() if p.name.startswith(".attention.duckdb")]  # no temp left
    con = duckdb.connect(str(catalog), read_only=True, config={"file_search_path": str(warehouse)})
    try:
        kinds = dict(con.execute("SELECT table_name, table_type FROM information_schema.tables").fetchall())
        assert set(kinds) == {*VIEWS, "catalog_info"} and set(kinds.values()) == {"VIEW"}
        counts = dict(con.execute("SELECT model, count(*) FROM attention_maps GROUP BY model").fetchall())
        files = [p.path for p in iter_partitions(warehouse, "attention_maps", model="dinov2")]
        assert len(files) == 3 and counts["dinov2"] == sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        cells = con.execute(
            "SELECT \"row\", col, value FROM map_cells('clip', 'cls', ?, 1, 2)", [image_ids[0]]
        ).fetchall()
        expected = open_warehouse(warehouse).map(image_ids[0], "clip", "cls", 1, 2).values
        assert [(r, c) for r, c, _ in cells] == [(r, c) for r in range(4) for c in range(4)]
        np.testing.assert_array_equal(np.array([v for _, _, v in cells], np.float32).reshape(4, 4), expected)
        fused = con.execute("SELECT count(*) FROM map_cells('clip', 'cls', ?, 1)", [image_ids[0]]).fetchall()
        assert fused == [(16,)]
        assert con.execute("SELECT count(*) FROM models WHERE num_heads = 0").fetchall() == [(1,)]
    finally:
        con.close()


# --- the writer's clustered layout -------------------------------------------------------------------------


def test_partition_writer_clusters_by_image_without_splitting_one(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"{i:04x}" for i in rng.permutation(60)]
    rows_per_image = 7
    with PartitionWriter(tmp_path / "p", schema.INPUTS, cluster_by="image_id", target_group_bytes=4000) as writer:
        for image_id in ids[:30]:
            writer.write(_inputs(image_id, rows_per_image))
        writer.write(pa.concat_tables([_inputs(i, rows_per_image) for i in ids[30:]]))  # several images at once
    parquet = pq.ParquetFile(tmp_path / "p" / "data.parquet")
    table = parquet.read()
    assert table["image_id"].to_pylist() == sorted(table["image_id"].to_pylist())
    assert table.num_rows == 60 * rows_per_image
    assert 1 < parquet.num_row_groups < 60
    seen: set[str] = set()
    for index in range(parquet.num_row_groups):
        group = set(parquet.read_row_group(index, columns=["image_id"])["image_id"].to_pylist())
        assert not group & seen  # an image never spans two row groups
        seen |= group
    first = _inputs(ids[0], rows_per_image)
    mine = table.filter(pc.equal(table["image_id"], ids[0]))
    assert mine["input_h"].to_pylist() == first["input_h"].to_pylist()  # row order within an image kept


def _inputs(image_id: str, rows: int) -> pa.Table:
    return pa.table(
        {
            "image_id": [image_id] * rows,
            "input_h": pa.array(range(rows), pa.int16()),
            "input_w": pa.array([1] * rows, pa.int16()),
            "jpeg": [b"x" * 200] * rows,
            "weights_id": ["w"] * rows,
            **{
                name: pa.nulls(rows, schema.INPUTS.field(name).type)
                for name in ("scale_x", "scale_y", "crop_left", "crop_top")
            },
        },
        schema=schema.INPUTS,
    )


# --- caches and concurrency --------------------------------------------------------------------------------


def _scaled(table: pa.Table, factor: float) -> pa.Table:
    values = table["map_values"].combine_chunks()
    scaled = pa.ListArray.from_arrays(values.offsets, pc.multiply(values.values, pa.scalar(factor, pa.float32())))
    return table.set_column(table.schema.get_field_index("map_values"), "map_values", scaled)


def test_metadata_cache_sees_a_replaced_file_even_with_the_same_mtime(tmp_path, warehouse, image_ids):
    root = tmp_path / "replace"
    shutil.copytree(warehouse, root)
    path = root / "attention_maps" / "model=dinov2" / "method=cls" / "shard=0" / "data.parquet"
    old = pq.read_table(path)
    stamp = time.time() - 120  # older than DuckDB's 10 s "recently modified" window
    os.utime(path, (stamp, stamp))
    handle = open_warehouse(root)
    before = handle.head_grid(image_ids[0], "dinov2", "cls", 1).maps  # footer now cached
    for factor in (0.5, 0.25):
        with PartitionWriter(path.parent, schema.ATTENTION_MAPS, cluster_by="image_id") as writer:
            writer.write(_scaled(old, factor))
        os.utime(path, (stamp, stamp))  # same mtime as the cached footer
        after = handle.head_grid(image_ids[0], "dinov2", "cls", 1).maps
        np.testing.assert_array_equal(after, (before * np.float32(factor)).astype(np.float32))
    setting = connection().execute("SELECT current_setting('parquet_metadata_cache')").fetchall()
    assert setting == [(True,)]


def test_sixteen_threads_read_whole_versions_while_a_partition_is_rewritten(tmp_path, warehouse, image_ids):
    root = tmp_path / "concurrent"
    shutil.copytree(warehouse, root)
    directory = root / "attention_maps" / "model=dinov2" / "method=cls" / "shard=0"
    versions = [pq.read_table(directory / "data.parquet")]
    versions.append(_scaled(versions[0], 0.5))
    handle = open_warehouse(root)
    layers = handle.layers("dinov2", "cls")
    expected = {}  # (image, layer) -> the grid of each version
    for image_id in image_ids:
        for layer in layers:
            grids = []
            for version in versions:
                rows = select(version, image_id=image_id, layer=layer)
                grids.append(grid_of(fused_first(rows)))
            expected[(image_id, layer)] = grids

    stop = threading.Event()
    errors: list[BaseException] = []
    counts = {"rewrites": 0, "queries": 0, "old": 0, "new": 0}
    lock = threading.Lock()

    def rewrite() -> None:
        try:
            while not stop.is_set():
                table = versions[(counts["rewrites"] + 1) % 2]
                with PartitionWriter(directory, schema.ATTENTION_MAPS, cluster_by="image_id") as writer:
                    for image_id in image_ids:  # one image per write, as the extraction does
                        writer.write(select(table, image_id=image_id))
                counts["rewrites"] += 1
        except BaseException as exc:
            errors.append(exc)

    def read(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                image_id, layer = rng.choice(image_ids), rng.choice(layers)
                maps = handle.head_grid(image_id, "dinov2", "cls", layer).maps
                old, new = expected[(image_id, layer)]
                which = "old" if np.array_equal(maps, old) else "new" if np.array_equal(maps, new) else None
                if which is None:
                    raise AssertionError(f"mixed or partial result for {image_id} layer {layer}")
                with lock:
                    counts[which] += 1
                    counts["queries"] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rewrite)] + [threading.Thread(target=read, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and not errors:
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors[:3]
    assert counts["rewrites"] >= 3 and counts["queries"] >= 50, counts
    assert counts["old"] > 0 and counts["new"] > 0, counts  # both versions were really served


def test_one_connection_per_process_and_a_cursor_per_thread():
    first = cursor()
    assert cursor() is first
    other: list[object] = []
    thread = threading.Thread(target=lambda: other.append(cursor()))
    thread.start()
    thread.join()
    assert other[0] is not first
    assert connection() is connection()


def test_views_can_be_created_on_any_connection(warehouse):
    con = duckdb.connect()
    present = create_views(con, warehouse)
    assert all(present.values())
    assert con.execute("SELECT count(DISTINCT model) FROM head_stats").fetchall() == [(len(registry.MODELS),)]


# --- ad-hoc SQL from Python: the process connection's views -----------------------------------------------


def test_sql_over_the_process_connections_views(wh, warehouse, image_ids):
    """``Warehouse.sql`` answers from views on the process connection, parameters bound, equal to the rows
    read straight from the Parquet files."""
    counts = wh.sql(
        "SELECT model, count(*) AS n FROM attention_maps WHERE method = $method GROUP BY model ORDER BY model",
        {"method": "rollout"},
    ).to_pylist()
    expected = sorted(
        (model, read_partition(warehouse, "attention_maps", model, "rollout").num_rows)
        for model, spec in registry.MODELS.items()
        if "rollout" in spec.methods
    )
    assert [(r["model"], r["n"]) for r in counts] == expected
    cells = wh.sql("SELECT value FROM map_cells('clip', 'cls', ?, 1, 2)", [image_ids[0]])["value"].to_numpy()
    np.testing.assert_array_equal(cells, wh.map(image_ids[0], "clip", "cls", 1, 2).values.ravel())
    assert wh.sql("SELECT current_setting('threads') AS t").num_rows == 1
    with pytest.raises(QueryError, match="SQL failed: Parser Error"):
        wh.sql("SELEC 1")
    hive_types = wh.sql("SELECT typeof(model) AS t FROM attention_maps LIMIT 1").to_pylist()
    assert hive_types == [{"t": "VARCHAR"}]


def test_sql_views_follow_the_disk_and_stay_per_warehouse(tmp_path, warehouse, wh):
    """A warehouse filled after its views were made is seen; two warehouses in one process keep their
    own views; each thread has its own cursor."""
    late = open_warehouse(tmp_path / "later")
    assert late.sql("SELECT count(*) AS n FROM attention_maps").to_pylist() == [{"n": 0}]
    shutil.copytree(warehouse, tmp_path / "later")
    total = sum(
        read_partition(warehouse, "attention_maps", m, method).num_rows
        for m, s in registry.MODELS.items()
        for method in s.methods
    )
    assert late.sql("SELECT count(*) AS n FROM attention_maps").to_pylist() == [{"n": total}]
    assert wh.sql("SELECT count(*) AS n FROM attention_maps").to_pylist() == [{"n": total}]
    shutil.rmtree(tmp_path / "later" / "attention_maps")
    assert late.sql("SELECT count(*) AS n FROM attention_maps").to_pylist() == [{"n": 0}]
    assert wh.sql("SELECT count(*) AS n FROM attention_maps").to_pylist() == [{"n": total}]
    results: list[tuple[int, object]] = []

    def count_images() -> None:
        results.append((wh.sql("SELECT count(*) AS n FROM images")["n"][0].as_py(), views_cursor(wh.root)))

    threads = [threading.Thread(target=count_images) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [n for n, _ in results] == [5] * 4
    assert len({id(cur) for _, cur in results}) == 4  # a cursor per thread
    assert views_cursor(wh.root) is views_cursor(wh.root)  # and kept in the thread


def _exit_code_of_fork(body) -> int:
    """Run ``body() -> bool`` in a forked child: 0 if it returned True, 1 if False, 2 if it raised."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 2
        try:
            code = 0 if body() else 1
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() of a process with threads (DuckDB's)
def test_sql_views_of_forked_children_follow_their_own_disk(tmp_path, warehouse):
    """A forked child (and its child) gets a connection and views of its own: the parent's views, made while
    the warehouse was empty, must not answer there."""
    root = tmp_path / "forked"
    late = open_warehouse(root)
    assert late.sql("SELECT count(*) AS n FROM images")["n"][0].as_py() == 0
    parents_cursor = views_cursor(late.root)

    def count() -> int:
        return late.sql("SELECT count(*) AS n FROM images")["n"][0].as_py()

    def grandchild() -> bool:
        shutil.copytree(warehouse, root)
        return count() == 5

    def child() -> bool:
        fresh = views_cursor(late.root) is not parents_cursor
        return fresh and count() == 0 and _exit_code_of_fork(grandchild) == 0

    assert _exit_code_of_fork(child) == 0
    assert count() == 5  # the parent's views see the files the grandchild copied


def test_sql_of_a_warehouse_whose_path_has_glob_characters_is_a_query_error(tmp_path, warehouse):
    """The map API reads named files and works; the views need a glob of the path, so SQL says why not."""
    root = tmp_path / "run[1]" / "wh"
    shutil.copytree(warehouse, root)
    odd = open_warehouse(root)
    assert len(odd.images()) == 5
    for _ in range(2):  # and again: nothing half-built is left behind
        with pytest.raises(QueryError, match="glob characters"):
            odd.sql("SELECT count(*) FROM images")
