"""Generate a synthetic warehouse at realistic size, through the real schema and writer.

    python bench/make_synthetic_warehouse.py                    # 1,000 images x 6 models, bench/results/...
    python bench/make_synthetic_warehouse.py --images 100 --out /tmp/wh

Base-model shapes: 12 layers x 12 heads on a 14x14 patch grid (DINOv2 16x16 with 4 registers), SigLIP's
probe at layer 12, ResNet-50 Grad-CAM stages 56/28/14/7. Maps are Dirichlet-like (normalised gamma draws,
a different concentration per head so heads differ), fused = mean of the heads, prefix and register mass
drawn per row. Every partition goes through ``PartitionWriter`` (clustered by image, like the extraction),
then ``write_head_stats`` and ``write_catalog`` run on the result. Models are written in parallel processes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from ssl_attention.alignment.geometry import transform_from_processor
from ssl_attention.query import write_catalog
from ssl_attention.registry import MODELS
from ssl_attention.stats import write_head_stats
from ssl_attention.warehouse import schema
from ssl_attention.warehouse.atomic import PartitionWriter, write_table_atomic
from ssl_attention.warehouse.paths import partition_dir
from ssl_attention.warehouse.shards import ensure_shards

INPUT = 224
LAYERS = 12
HEADS = 12


@dataclass(frozen=True)
class Shape:
    grid: int
    registers: int
    patch: int | None


SHAPES = {
    "dinov2": Shape(16, 4, 14),
    "dinov3": Shape(14, 4, 16),
    "mae": Shape(14, 0, 16),
    "clip": Shape(14, 0, 16),
    "siglip": Shape(14, 0, 16),
    "siglip2": Shape(14, 0, 16),
    "siglip2_naflex": Shape(16, 0, 16),  # 256 patches; real NaFlex grids follow each image's aspect ratio
    "resnet50": Shape(0, 0, None),
}
STAGES = (56, 28, 14, 7)
IMAGE_W, IMAGE_H = 640, 480  # the synthetic catalog's image size
# how every synthetic input was made: shortest edge to 224, then a 224 x 224 centre crop (stored in `inputs`)
_TRANSFORM = transform_from_processor(
    {"do_resize": True, "size": {"shortest_edge": INPUT}, "do_center_crop": True,
     "crop_size": {"height": INPUT, "width": INPUT}},
    IMAGE_W,
    IMAGE_H,
)  # fmt: skip
TRANSFORM_COLUMNS = {
    "scale_x": [_TRANSFORM.scale_x],
    "scale_y": [_TRANSFORM.scale_y],
    "crop_left": pa.array([_TRANSFORM.crop_left], pa.int32()),
    "crop_top": pa.array([_TRANSFORM.crop_top], pa.int32()),
}


def image_ids(count: int) -> list[str]:
    return [hashlib.sha256(f"synthetic-{i}".encode()).hexdigest()[:32] for i in range(count)]


def jpeg(size: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * rng.uniform(1, 3))], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray((rgb * 255).astype(np.uint8)).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def provenance(model: str, rows: int) -> dict[str, pa.Array]:
    source = MODELS[model].default_weights
    return {
        "weights_mode": pa.array(["random"] * rows),
        "weights_source": pa.array([source] * rows),
        "weights_revision": pa.nulls(rows, pa.string()),
        "weights_seed": pa.array(np.zeros(rows, np.int32)),
        "weights_id": pa.array([f"random:{source}#0"] * rows),
    }


def dirichlet(rng: np.random.Generator, alpha: np.ndarray, cells: int) -> np.ndarray:
    """Rows of normalised gamma(alpha) draws; alpha (...,) -> (..., cells)."""
    draws = rng.standard_gamma(alpha[..., None] * np.ones(cells), dtype=np.float64)
    return draws / draws.sum(axis=-1, keepdims=True)


def rows_table(
    model: str,
    image_id: str,
    values: np.ndarray,  # (L, K, N)
    layers: list[int],
    per_head: bool,
    grid: tuple[int, int] | list[tuple[int, int]],
    prefix: np.ndarray,  # (L, K)
    registers: np.ndarray,
    stamp: dt.datetime,
    layer_names: list[str],
    raw_scale: np.ndarray | None = None,
    target_class: int | None = None,
) -> pa.Table:
    n_layers, n_maps = prefix.shape
    rows = n_layers * n_maps
    heads = np.tile(np.arange(n_maps) - 1, n_layers) if per_head else np.full(rows, -1)
    grids = grid if isinstance(grid, list) else [grid] * n_layers
    lengths = np.repeat([h * w for h, w in grids], n_maps)
    flat = values.reshape(-1) if not isinstance(grid, list) else np.concatenate([v.reshape(-1) for v in values])
    scales = raw_scale.reshape(-1) if raw_scale is not None else np.full(rows, np.nan, np.float32)
    return pa.table(
        {
            "image_id": pa.array([image_id] * rows),
            "layer": pa.array(np.repeat(layers, n_maps).astype(np.int16)),
            "layer_name": pa.array(np.repeat(layer_names, n_maps).tolist()),
            "head": pa.array(heads.astype(np.int16), mask=heads < 0),
            "grid_h": pa.array(np.repeat([h for h, _ in grids], n_maps).astype(np.int16)),
            "grid_w": pa.array(np.repeat([w for _, w in grids], n_maps).astype(np.int16)),
            "map_values": pa.ListArray.from_arrays(
                pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)),
                pa.array(flat.astype(np.float32)),
            ),
            "prefix_mass": pa.array(prefix.reshape(-1).astype(np.float32)),
            "register_mass": pa.array(registers.reshape(-1).astype(np.float32)),
            "raw_scale": pa.array(scales.astype(np.float32), mask=np.isnan(scales)),
            "target_class": pa.array([target_class] * rows, pa.int32()),
            "num_heads": pa.array(np.full(rows, 0 if model == "resnet50" else HEADS, np.int16)),
            "num_layers": pa.array(np.full(rows, len(STAGES) if model == "resnet50" else LAYERS, np.int16)),
            **provenance(model, rows),
            "extracted_at": pa.array([stamp] * rows, schema.TIMESTAMP),
        },
        schema=schema.ATTENTION_MAPS,
    )


def head_concentrations(rng: np.random.Generator) -> np.ndarray:
    """Per (layer, head) Dirichlet concentration, fixed for a model so that heads keep their character."""
    return np.exp(rng.uniform(np.log(0.03), np.log(1.0), size=(LAYERS + 1, HEADS)))


def vit_image(
    model: str, image_id: str, rng: np.random.Generator, stamp: dt.datetime, concentration: np.ndarray
) -> dict[str, pa.Table]:
    shape = SHAPES[model]
    cells = shape.grid * shape.grid
    grid = (shape.grid, shape.grid)
    names = [f"block {i}" for i in range(LAYERS)]
    out = {}
    for method in MODELS[model].methods:
        if method == "rollout":
            maps = dirichlet(rng, np.full((LAYERS, 1), 2.0) / np.arange(1, LAYERS + 1)[:, None], cells)
            prefix = np.zeros((LAYERS, 1))
            out[method] = rows_table(
                model, image_id, maps, list(range(LAYERS)), False, grid, prefix, prefix, stamp, names
            )
            continue
        layers = [LAYERS] if method == "probe" else list(range(LAYERS))
        alpha = concentration[layers] * rng.uniform(0.8, 1.25, size=(len(layers), HEADS))  # heads differ
        heads = dirichlet(rng, alpha, cells)  # (L, H, N)
        prefix_heads = rng.uniform(0.02, 0.6, size=(len(layers), HEADS)) if method == "cls" else np.zeros_like(alpha)
        heads *= (1.0 - prefix_heads)[..., None]
        registers = prefix_heads * (rng.uniform(0.3, 0.9, size=prefix_heads.shape) if shape.registers else 0.0)
        maps = np.concatenate([heads.mean(axis=1, keepdims=True), heads], axis=1)  # fused first
        prefix = np.concatenate([prefix_heads.mean(axis=1, keepdims=True), prefix_heads], axis=1)
        registers = np.concatenate([registers.mean(axis=1, keepdims=True), registers], axis=1)
        layer_names = ["pooling head"] if method == "probe" else names
        out[method] = rows_table(model, image_id, maps, layers, True, grid, prefix, registers, stamp, layer_names)
    return out


def cnn_image(image_id: str, rng: np.random.Generator, stamp: dt.datetime) -> dict[str, pa.Table]:
    maps = [dirichlet(rng, np.array([0.3]), g * g).reshape(1, g * g) for g in STAGES]
    zeros = np.zeros((len(STAGES), 1))
    scales = rng.uniform(1, 50, size=(len(STAGES), 1))
    table = rows_table(
        "resnet50",
        image_id,
        maps,  # type: ignore[arg-type]
        list(range(len(STAGES))),
        False,
        [(g, g) for g in STAGES],
        zeros,
        zeros,
        stamp,
        [f"layer{i + 1}" for i in range(len(STAGES))],
        raw_scale=scales,
        target_class=int(rng.integers(1000)),
    )
    return {"gradcam": table}


def write_model(out: Path, model: str, count: int, seed: int) -> tuple[str, float, int]:
    start = time.perf_counter()
    rng = np.random.default_rng([seed, list(MODELS).index(model)])
    stamp = dt.datetime.now(dt.UTC)
    methods = MODELS[model].methods
    writers = {
        m: PartitionWriter(
            partition_dir(out, "attention_maps", model=model, method=m, shard="0"),
            schema.ATTENTION_MAPS,
            cluster_by="image_id",
        )
        for m in methods
    }
    ensure_shards(out, 1)  # one image shard: the layout of a one-machine warehouse
    inputs = PartitionWriter(partition_dir(out, "inputs", model=model, shard="0"), schema.INPUTS, cluster_by="image_id")
    pictures = [jpeg(INPUT, k) for k in range(8)]
    concentration = head_concentrations(rng)
    rows = 0
    for index, image_id in enumerate(image_ids(count)):
        if model == "resnet50":
            tables = cnn_image(image_id, rng, stamp)
        else:
            tables = vit_image(model, image_id, rng, stamp, concentration)
        for method, table in tables.items():
            writers[method].write(table)
            rows += table.num_rows
        inputs.write(
            pa.table(
                {
                    "image_id": [image_id],
                    "input_h": pa.array([INPUT], pa.int16()),
                    "input_w": pa.array([INPUT], pa.int16()),
                    "jpeg": [pictures[index % len(pictures)]],
                    "weights_id": [f"random:{MODELS[model].default_weights}#0"],
                    **TRANSFORM_COLUMNS,
                },
                schema=schema.INPUTS,
            )
        )
    for writer in [*writers.values(), inputs]:
        writer.commit()
    spec, shape = MODELS[model], SHAPES[model]
    cnn = model == "resnet50"
    row = {
        "label": [spec.label],
        "family": [spec.family],
        "num_layers": pa.array([len(STAGES) if cnn else LAYERS], pa.int16()),
        "num_heads": pa.array([0 if cnn else HEADS], pa.int16()),
        "num_registers": pa.array([shape.registers], pa.int16()),
        "has_cls": [spec.has_cls],
        "patch_size": pa.array([shape.patch], pa.int16()),
        "input_h": pa.array([INPUT], pa.int16()),
        "input_w": pa.array([INPUT], pa.int16()),
        "methods": [list(methods)],
        "per_head_methods": [list(spec.per_head_methods)],
        "layer_names": [[f"layer{i + 1}" for i in range(4)] if cnn else [f"block {i}" for i in range(LAYERS)]],
        **provenance(model, 1),
        "extracted_at": pa.array([stamp], schema.TIMESTAMP),
    }
    write_table_atomic(partition_dir(out, "models", model=model), pa.table(row, schema=schema.MODELS), schema.MODELS)
    write_table_atomic(partition_dir(out, "errors", source=model), schema.ERRORS.empty_table(), schema.ERRORS)
    maps_seconds = time.perf_counter() - start
    write_head_stats(out, model)
    return model, maps_seconds, rows


def write_images(out: Path, count: int) -> None:
    stamp = dt.datetime.now(dt.UTC)
    thumbs = [jpeg(128, k) for k in range(8)]
    ids = image_ids(count)
    table = pa.table(
        {
            "image_id": ids,
            "file_name": [f"synthetic/{i:05d}.jpg" for i in range(count)],
            "width": pa.array([IMAGE_W] * count, pa.int32()),
            "height": pa.array([IMAGE_H] * count, pa.int32()),
            "format": ["JPEG"] * count,
            "mode": ["RGB"] * count,
            "num_bytes": pa.array([100_000] * count, pa.int64()),
            "mtime_ns": pa.nulls(count, pa.int64()),  # no files behind a synthetic catalog
            "duplicate_files": pa.array([[] for _ in range(count)], pa.list_(pa.string())),
            "thumbnail": [thumbs[i % len(thumbs)] for i in range(count)],
            "catalogued_at": pa.array([stamp] * count, schema.TIMESTAMP),
        },
        schema=schema.IMAGES,
    )
    write_table_atomic(partition_dir(out, "images"), table, schema.IMAGES)
    write_table_atomic(partition_dir(out, "errors", source="catalog"), schema.ERRORS.empty_table(), schema.ERRORS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("bench/results/synthetic_warehouse"))
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated slugs (default: all)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or args.images < 1:
        parser.error(f"unknown models {unknown}; valid: {', '.join(MODELS)}" if unknown else "--images must be >= 1")
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    write_images(out, args.images)
    order = sorted(models, key=lambda m: m == "resnet50")  # the small CNN last
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        futures = [pool.submit(write_model, out, m, args.images, args.seed) for m in order]
        for future in futures:
            model, seconds, rows = future.result()
            print(f"{model:9s} {rows:>9,d} map rows in {seconds:6.1f} s (+ head_stats)", flush=True)
    catalog = write_catalog(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    elapsed = time.perf_counter() - start
    print(f"{args.images} images x {len(models)} models -> {out} ({size / 1e9:.2f} GB) in {elapsed:.0f} s")
    print(f"catalog: {catalog}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
