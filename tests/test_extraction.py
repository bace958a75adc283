"""End-to-end extraction into the warehouse: completeness, config-driven shapes, incremental runs, determinism."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from ssl_attention.extraction import catalog_images, extract_model, read_catalog_records
from ssl_attention.images import load_image
from ssl_attention.models.loading import LoadRequest, load_model
from ssl_attention.registry import METHODS, MODELS
from ssl_attention.warehouse.paths import DATA_FILE, TABLES, partition_file
from ssl_attention.warehouse.shards import LAYOUT_FILE

MAP_KEY = ("image_id", "layer", "head")


def read(warehouse: Path, table: str, **keys: str) -> list[dict]:
    return pq.read_table(
        partition_file(warehouse, table, **{**({"shard": "0"} if "shard" in TABLES[table] else {}), **keys})
    ).to_pylist()


def maps(warehouse: Path, slug: str, method: str) -> list[dict]:
    return read(warehouse, "attention_maps", model=slug, method=method)


def keyed(rows: list[dict]) -> dict[tuple, dict]:
    result = {tuple(r[k] for k in MAP_KEY): r for r in rows}
    assert len(result) == len(rows), "duplicate (image_id, layer, head) rows"
    return result


def expected_rows(images: int, layers: int, heads: int, method: str) -> int:
    if method == "probe":
        return images * (heads + 1)
    if METHODS[method].per_head:
        return images * layers * (heads + 1)
    return images * layers


def naflex_sizes(processor, images: list[dict], folder: Path) -> dict[str, tuple[int, int]]:
    """image id -> (H, W) from the NaFlex processor's own spatial_shapes for the catalogued file."""
    sizes = {}
    for row in images:
        out = processor(images=[load_image(folder / row["file_name"])[0]], return_tensors="pt")
        grid_h, grid_w = (int(v) for v in out["spatial_shapes"][0])
        sizes[row["image_id"]] = (grid_h * processor.patch_size, grid_w * processor.patch_size)
    return sizes


def load_tiny(slug: str, directory: Path):
    return load_model(slug, LoadRequest(checkpoint=directory, device="cpu"))


def two_images(tmp_path: Path, sample_dir: Path) -> tuple[Path, Path]:
    """(folder with a.jpg = chelsea and b.jpg = rocket, an empty warehouse path)."""
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(sample_dir / "chelsea.jpg", folder / "a.jpg")
    shutil.copy(sample_dir / "rocket.jpg", folder / "b.jpg")
    return folder, tmp_path / "wh"


# --- the full warehouse of the six tiny models ----------------------------------------------------------


def test_every_partition_is_complete(tiny_warehouse, tiny_adapters, sample_dir):
    images = read(tiny_warehouse, "images")
    samples = sorted(sample_dir.glob("*.jpg"))
    assert sorted(r["file_name"] for r in images) == [p.name for p in samples]
    for row, path in zip(sorted(images, key=lambda r: r["file_name"]), samples, strict=True):
        assert (row["width"], row["height"]) == ImageOps.exif_transpose(Image.open(path)).size
        assert row["num_bytes"] == path.stat().st_size
        assert max(Image.open(io.BytesIO(row["thumbnail"])).size) == 128
    ids = {r["image_id"] for r in images}
    assert read(tiny_warehouse, "errors", source="catalog") == []

    for slug, adapter in tiny_adapters.items():
        spec = MODELS[slug]
        layers, heads = adapter.num_layers, adapter.num_heads
        for method in spec.methods:
            rows = maps(tiny_warehouse, slug, method)
            keyed(rows)
            assert len(rows) == expected_rows(len(ids), layers, heads, method), (slug, method)
            assert {r["image_id"] for r in rows} == ids
            assert {r["num_heads"] for r in rows} == {heads} and {r["num_layers"] for r in rows} == {layers}
            if METHODS[method].per_head:
                assert {r["head"] for r in rows} == {None, *range(heads)}
            else:
                assert {r["head"] for r in rows} == {None}
            expected_layers = {layers} if method == "probe" else set(range(layers))
            assert {r["layer"] for r in rows} == expected_layers
        (model_row,) = read(tiny_warehouse, "models", model=slug)
        assert (model_row["num_layers"], model_row["num_heads"]) == (layers, heads)
        assert model_row["num_registers"] == {"dinov2": 4, "dinov3": 2}.get(slug, 0)
        assert model_row["has_cls"] == spec.has_cls and model_row["methods"] == list(spec.methods)
        assert model_row["patch_size"] == (None if slug == "resnet50" else 8)
        size = 64 if slug == "resnet50" else 32
        inputs = read(tiny_warehouse, "inputs", model=slug)
        assert {r["image_id"] for r in inputs} == ids
        if spec.pixel_layout == "naflex":  # each image at its own aspect ratio: the processor's own patch grid
            own = naflex_sizes(adapter.preprocess, images, sample_dir)
            for row in inputs:
                assert Image.open(io.BytesIO(row["jpeg"])).size == (row["input_w"], row["input_h"])
                assert (row["input_h"], row["input_w"]) == own[row["image_id"]]
            assert (model_row["input_h"], model_row["input_w"]) in set(own.values())
        else:
            assert (model_row["input_h"], model_row["input_w"]) == (size, size)
            for row in inputs:
                assert Image.open(io.BytesIO(row["jpeg"])).size == (row["input_w"], row["input_h"]) == (size, size)
        assert read(tiny_warehouse, "errors", source=slug) == []


def test_no_stray_files_in_partitions(tiny_warehouse):
    for path in tiny_warehouse.rglob("*"):
        if path.is_file():
            assert path.name == DATA_FILE or path == tiny_warehouse / LAYOUT_FILE, path


# --- heads and layers come from the checkpoint's config -------------------------------------------------


def test_heads_and_layers_follow_the_config(tmp_path, make_tiny_checkpoint, images_copy):
    six_heads = make_tiny_checkpoint("clip", tmp_path / "clip6", num_heads=6, hidden=48)
    three_layers = make_tiny_checkpoint("siglip", tmp_path / "siglip3", num_layers=3)
    dinov2_wide = make_tiny_checkpoint("dinov2", tmp_path / "dinov2", num_layers=3, num_heads=2, hidden=16)
    sixteen_heads = make_tiny_checkpoint("mae", tmp_path / "mae16", num_heads=16, hidden=64)
    deep = make_tiny_checkpoint("dinov3", tmp_path / "dinov3deep", num_layers=24)
    folder = images_copy(2)
    warehouse = tmp_path / "wh"
    records = catalog_images(folder, warehouse).catalog.records
    cases = {
        "clip": (six_heads, 2, 6),
        "siglip": (three_layers, 3, 4),
        "dinov2": (dinov2_wide, 3, 2),
        "mae": (sixteen_heads, 2, 16),
        "dinov3": (deep, 24, 4),
    }
    for slug, (directory, layers, heads) in cases.items():
        adapter = load_tiny(slug, directory)
        assert (adapter.num_layers, adapter.num_heads) == (layers, heads)
        extract_model(adapter, records, warehouse)
        for method in MODELS[slug].methods:
            rows = maps(warehouse, slug, method)
            assert {r["num_heads"] for r in rows} == {heads}
            assert {r["num_layers"] for r in rows} == {layers}
            assert len(rows) == expected_rows(2, layers, heads, method)
            if METHODS[method].per_head:
                assert {r["head"] for r in rows} == {None, *range(heads)}
            assert {r["layer"] for r in rows} == ({layers} if method == "probe" else set(range(layers)))
    probe_names = {r["layer_name"] for r in maps(warehouse, "siglip", "probe")}
    assert probe_names == {"pooling head"}


def test_one_forward_pass_per_batch(tmp_path, tiny_checkpoints, images_copy):
    folder = images_copy(5)
    warehouse = tmp_path / "wh"
    records = catalog_images(folder, warehouse).catalog.records
    for slug in ("siglip", "resnet50"):
        adapter = load_tiny(slug, tiny_checkpoints[slug])
        calls: list[int] = []
        adapter.module.register_forward_hook(lambda _m, inputs, _out, calls=calls: calls.append(len(inputs)))
        report = extract_model(adapter, records, warehouse, batch_size=2)
        assert report.images_extracted == 5
        assert len(calls) == 3, (slug, calls)  # batches of 2, 2, 1; every method from the same pass


def test_batch_size_does_not_change_the_maps(tmp_path, tiny_checkpoints, images_copy):
    folder = images_copy(3)
    adapter = load_tiny("dinov3", tiny_checkpoints["dinov3"])
    results = {}
    for batch_size in (1, 3):
        warehouse = tmp_path / f"wh{batch_size}"
        extract_model(adapter, catalog_images(folder, warehouse).catalog.records, warehouse, batch_size=batch_size)
        results[batch_size] = keyed(maps(warehouse, "dinov3", "cls"))
    assert results[1].keys() == results[3].keys()
    for key, row in results[1].items():
        np.testing.assert_allclose(row["map_values"], results[3][key]["map_values"], atol=1e-5)


def test_invalid_batch_size(tmp_path, tiny_adapters):
    with pytest.raises(ValueError, match="batch size"):
        extract_model(tiny_adapters["mae"], [], tmp_path, batch_size=0)


# --- incremental ----------------------------------------------------------------------------------------


def test_incremental_runs(tmp_path, sample_dir, tiny_checkpoints, make_tiny_checkpoint):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("astronaut.jpg", "chelsea.jpg"):
        shutil.copy(sample_dir / name, folder / name)
    warehouse = tmp_path / "wh"
    adapter = load_tiny("mae", tiny_checkpoints["mae"])
    partitions = [
        partition_file(warehouse, "attention_maps", model="mae", method=m, shard="0") for m in MODELS["mae"].methods
    ]

    first = extract_model(adapter, catalog_images(folder, warehouse).catalog.records, warehouse)
    assert (first.images_extracted, first.images_up_to_date) == (2, 0)
    before = {p: p.read_bytes() for p in partitions}
    rows_before = {p: keyed(pq.read_table(p).to_pylist()) for p in partitions}

    # same images, same weights: nothing computed, nothing rewritten
    second = extract_model(adapter, catalog_images(folder, warehouse).catalog.records, warehouse)
    assert (second.images_extracted, second.images_up_to_date, second.rows_extracted) == (0, 2, 0)
    assert {p: p.read_bytes() for p in partitions} == before

    # a renamed file has the same content id: still nothing to do
    (folder / "chelsea.jpg").rename(folder / "cat.jpg")
    renamed = extract_model(adapter, catalog_images(folder, warehouse).catalog.records, warehouse)
    assert (renamed.images_extracted, renamed.images_up_to_date) == (0, 2)

    # one new image: just that one is computed; the others' rows are carried over unchanged
    shutil.copy(sample_dir / "rocket.jpg", folder / "rocket.jpg")
    records = catalog_images(folder, warehouse).catalog.records
    third = extract_model(adapter, records, warehouse)
    assert (third.images_extracted, third.images_up_to_date) == (1, 2)
    new_id = next(r.image_id for r in records if r.file_name == "rocket.jpg")
    for path in partitions:
        after = keyed(pq.read_table(path).to_pylist())
        assert {k[0] for k in after} == {k[0] for k in rows_before[path]} | {new_id}
        for key, row in rows_before[path].items():
            assert after[key] == row  # values, masses and extracted_at all unchanged
    assert len(read(warehouse, "inputs", model="mae")) == 3

    # other weights: the partitions are rebuilt, never mixed
    other = load_tiny("mae", make_tiny_checkpoint("mae", tmp_path / "other-mae", seed=42))
    assert other.provenance.weights_id != adapter.provenance.weights_id
    fourth = extract_model(other, records, warehouse)
    assert fourth.weights_changed and (fourth.images_extracted, fourth.images_up_to_date) == (3, 0)
    for path in partitions:
        rows = pq.read_table(path).to_pylist()
        assert {r["weights_id"] for r in rows} == {other.provenance.weights_id}
        assert {r["image_id"] for r in rows} == {r.image_id for r in records}
        keyed(rows)
    inputs = read(warehouse, "inputs", model="mae")
    assert {r["weights_id"] for r in inputs} == {other.provenance.weights_id} and len(inputs) == 3
    (model_row,) = read(warehouse, "models", model="mae")
    assert model_row["weights_id"] == other.provenance.weights_id


def test_changed_file_then_recompute_writes_no_duplicate_rows(tmp_path, sample_dir, tiny_checkpoints):
    """A file whose content changed keeps a stale catalog entry (old id, same file name); a later full
    recompute must still write each image's maps once."""
    folder, warehouse = two_images(tmp_path, sample_dir)
    adapter = load_tiny("mae", tiny_checkpoints["mae"])
    catalog_images(folder, warehouse)
    extract_model(adapter, read_catalog_records(warehouse, folder), warehouse)

    shutil.copy(sample_dir / "coffee.jpg", folder / "a.jpg")  # same name, new content
    catalog_images(folder, warehouse)
    records = read_catalog_records(warehouse, folder)
    changed = extract_model(adapter, records, warehouse)
    assert changed.images_extracted == 1
    keyed(maps(warehouse, "mae", "rollout"))

    extract_model(adapter, records, warehouse, recompute=True)
    current = {r.image_id for r in records}
    for method in MODELS["mae"].methods:
        rows = maps(warehouse, "mae", method)
        keyed(rows)
        assert {r["image_id"] for r in rows} == current  # the old content's maps are gone, not orphaned


def test_superseded_content_is_dropped_even_when_nothing_is_recomputed(tmp_path, sample_dir, tiny_checkpoints):
    """After a.jpg changes, an extraction run only computes the new content; the old content's rows
    leave every partition (they would otherwise skew averages over all images)."""
    folder, warehouse = two_images(tmp_path, sample_dir)
    adapter = load_tiny("clip", tiny_checkpoints["clip"])
    old_id = {r.file_name: r.image_id for r in catalog_images(folder, warehouse).catalog.records}["a.jpg"]
    extract_model(adapter, read_catalog_records(warehouse, folder), warehouse)
    shutil.copy(sample_dir / "coffee.jpg", folder / "a.jpg")
    records = catalog_images(folder, warehouse).catalog.records
    report = extract_model(adapter, records, warehouse)
    assert report.images_extracted == 1 and report.images_up_to_date == 1
    for method in MODELS["clip"].methods:
        assert old_id not in {r["image_id"] for r in maps(warehouse, "clip", method)}
    assert old_id not in {r["image_id"] for r in read(warehouse, "inputs", model="clip")}


def test_file_that_becomes_a_copy_of_another_replaces_its_catalog_row(tmp_path, sample_dir, tiny_checkpoints):
    """b.jpg is overwritten with a.jpg's content: its old content leaves the catalog and every partition,
    and b.jpg is listed as a duplicate of a.jpg's image."""
    folder, warehouse = two_images(tmp_path, sample_dir)
    adapter = load_tiny("mae", tiny_checkpoints["mae"])
    ids = {r.file_name: r.image_id for r in catalog_images(folder, warehouse).catalog.records}
    extract_model(adapter, read_catalog_records(warehouse, folder), warehouse)
    shutil.copy(folder / "a.jpg", folder / "b.jpg")
    records = catalog_images(folder, warehouse).catalog.records
    rows = read(warehouse, "images")
    assert [(r["image_id"], r["file_name"], r["duplicate_files"]) for r in rows] == [(ids["a.jpg"], "a.jpg", ["b.jpg"])]
    report = extract_model(adapter, records, warehouse)
    assert report.images_extracted == 0 and report.images_up_to_date == 1
    for method in MODELS["mae"].methods:
        assert {r["image_id"] for r in maps(warehouse, "mae", method)} == {ids["a.jpg"]}


def test_auto_fallback_never_replaces_real_maps_with_random_ones(tmp_path, images_copy, tiny_checkpoints):
    import dataclasses

    from ssl_attention.extraction import WeightsDowngradeError

    folder = images_copy(2)
    warehouse = tmp_path / "wh"
    records = catalog_images(folder, warehouse).catalog.records
    real = load_tiny("mae", tiny_checkpoints["mae"])
    extract_model(real, records, warehouse)
    before = maps(warehouse, "mae", "cls")
    # the same tiny architecture, but with provenance as `auto` reports it after falling back to random
    fallback = load_tiny("mae", tiny_checkpoints["mae"])
    fallback.provenance = dataclasses.replace(
        fallback.provenance, mode="random", source=MODELS["mae"].default_weights, seed=0, fallback=True
    )
    with pytest.raises(WeightsDowngradeError, match="--weights random"):
        extract_model(fallback, records, warehouse)
    assert maps(warehouse, "mae", "cls") == before
    # chosen on purpose (not a fallback), random weights do replace them
    fallback.provenance = dataclasses.replace(fallback.provenance, fallback=False)
    report = extract_model(fallback, records, warehouse)
    assert report.weights_changed
    assert {r["weights_mode"] for r in maps(warehouse, "mae", "cls")} == {"random"}


def test_no_images_writes_nothing(tmp_path, tiny_checkpoints):
    warehouse = tmp_path / "wh"
    report = extract_model(load_tiny("dinov2", tiny_checkpoints["dinov2"]), [], warehouse)
    assert report.images_extracted == 0
    assert not (warehouse / "attention_maps").exists()


def test_file_changed_after_cataloguing_is_skipped_with_a_reason(tmp_path, sample_dir, tiny_checkpoints):
    """The catalog is a run's source of truth: a file whose content changed between the scan and the
    extraction is skipped with a recorded reason (never stored under an id the catalog does not know),
    the other images are extracted, and repeating the run adds no rows."""
    folder, warehouse = two_images(tmp_path, sample_dir)
    adapter = load_tiny("mae", tiny_checkpoints["mae"])
    records = catalog_images(folder, warehouse).catalog.records
    catalogued = {r.file_name: r.image_id for r in records}
    shutil.copy(sample_dir / "coffee.jpg", folder / "a.jpg")  # changed between scan and extraction
    for _ in range(2):
        report = extract_model(adapter, records, warehouse)
        assert [i.file_name for i in report.issues] == ["a.jpg"]
        assert "changed since it was catalogued" in report.issues[0].reason
        rows = maps(warehouse, "mae", "cls")
        keyed(rows)
        assert {r["image_id"] for r in rows} == {catalogued["b.jpg"]}


# --- determinism and random provenance ------------------------------------------------------------------


@pytest.mark.slow
def test_two_random_runs_write_identical_maps(tmp_path, images_copy):
    folder = images_copy(2)
    results = []
    for run in range(2):
        warehouse = tmp_path / f"wh{run}"
        adapter = load_model("dinov2", LoadRequest(weights="random", seed=0, device="cpu"))
        records = catalog_images(folder, warehouse).catalog.records
        extract_model(adapter, records, warehouse)
        results.append({m: keyed(maps(warehouse, "dinov2", m)) for m in MODELS["dinov2"].methods})
        del adapter
    for method, rows in results[0].items():
        assert rows.keys() == results[1][method].keys()
        assert len(rows) == expected_rows(2, 12, 12, method)
        for key, row in rows.items():
            other = results[1][method][key]
            assert row["map_values"] == other["map_values"], (method, key)  # bit-identical
            assert row["prefix_mass"] == other["prefix_mass"]
            assert (row["weights_mode"], row["weights_seed"]) == ("random", 0)
            assert row["weights_source"] == MODELS["dinov2"].default_weights
            assert row["grid_h"] * row["grid_w"] == len(row["map_values"]) == 16 * 16  # 224 / 14, no registers


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("slug", ["dinov2", "siglip", "resnet50"])
def test_cuda_maps_match_cpu_maps_to_1e_3(tmp_path, tiny_checkpoints, images_copy, slug):
    """The CUDA path (float32, TF32 off while attention is computed) agrees with the CPU to 1e-3."""
    folder = images_copy(3)
    stored = {}
    for device in ("cpu", "cuda"):
        warehouse = tmp_path / device
        records = catalog_images(folder, warehouse).catalog.records
        adapter = load_model(slug, LoadRequest(checkpoint=tiny_checkpoints[slug], device=device))
        assert next(adapter.module.parameters()).device.type == device
        extract_model(adapter, records, warehouse)
        stored[device] = {m: keyed(maps(warehouse, slug, m)) for m in MODELS[slug].methods}
    for method, cpu_rows in stored["cpu"].items():
        cuda_rows = stored["cuda"][method]
        assert cuda_rows.keys() == cpu_rows.keys()
        for key, row in cpu_rows.items():
            np.testing.assert_allclose(cuda_rows[key]["map_values"], row["map_values"], atol=1e-3, rtol=0)
