"""Turning map blocks and catalogue records into Arrow tables, and reading partition state back."""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from ssl_attention.alignment.geometry import InputTransform
from ssl_attention.images import Catalog, ImageIssue
from ssl_attention.methods.blocks import MapBlock
from ssl_attention.models.weights import Provenance
from ssl_attention.warehouse import schema


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def provenance_columns(provenance: Provenance, rows: int) -> dict[str, pa.Array]:
    return {
        "weights_mode": pa.array([provenance.mode] * rows, pa.string()),
        "weights_source": pa.array([provenance.source] * rows, pa.string()),
        "weights_revision": pa.array([provenance.revision] * rows, pa.string()),
        "weights_seed": pa.array([provenance.seed] * rows, pa.int32()),
        "weights_id": pa.array([provenance.weights_id] * rows, pa.string()),
    }


def map_rows(
    blocks: Sequence[MapBlock],
    batch_index: int,
    image_id: str,
    num_heads: int,
    num_layers: int,
    provenance: Provenance,
    extracted_at: dt.datetime,
) -> pa.Table:
    """All rows of one image for one method: per layer, the fused map (head NULL) then heads 0..H-1."""
    layer, layer_name, head, grid_h, grid_w = [], [], [], [], []
    values, prefix, registers, raw_scale = [], [], [], []
    target_class: list[int | None] = []
    for block in blocks:
        per_layer = block.values[batch_index].detach().float().cpu().numpy()  # (L, K, N)
        n_layers, n_maps, n_cells = per_layer.shape
        values.append(per_layer.reshape(n_layers * n_maps, n_cells))
        prefix.append(block.prefix_mass[batch_index].float().cpu().numpy().reshape(-1))
        registers.append(block.register_mass[batch_index].float().cpu().numpy().reshape(-1))
        scale = (
            block.raw_scale[batch_index].float().cpu().numpy().reshape(-1)
            if block.raw_scale is not None
            else np.full(n_layers * n_maps, np.nan, dtype=np.float32)
        )
        raw_scale.append(scale)
        cls_index = int(block.target_class[batch_index]) if block.target_class is not None else None
        names = block.layer_names or [None] * n_layers
        for li in range(n_layers):
            for k in range(n_maps):
                layer.append(block.layers[li])
                layer_name.append(names[li])
                # index 0 of a per-head block is the fused map; heads follow
                head.append((k - 1 if k > 0 else None) if block.per_head else None)
                grid_h.append(block.grid_h)
                grid_w.append(block.grid_w)
                target_class.append(cls_index)
    rows = len(layer)
    lengths = np.array([v.shape[1] for v in values for _ in range(v.shape[0])], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate([v.reshape(-1) for v in values]).astype(np.float32, copy=False)
    scales = np.concatenate(raw_scale).astype(np.float32)
    columns = {
        "image_id": pa.array([image_id] * rows, pa.string()),
        "layer": pa.array(layer, pa.int16()),
        "layer_name": pa.array(layer_name, pa.string()),
        "head": pa.array(head, pa.int16()),
        "grid_h": pa.array(grid_h, pa.int16()),
        "grid_w": pa.array(grid_w, pa.int16()),
        "map_values": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float32())),
        "prefix_mass": pa.array(np.concatenate(prefix).astype(np.float32)),
        "register_mass": pa.array(np.concatenate(registers).astype(np.float32)),
        "raw_scale": pa.array(scales, pa.float32(), mask=np.isnan(scales)),
        "target_class": pa.array(target_class, pa.int32()),
        "num_heads": pa.array([num_heads] * rows, pa.int16()),
        "num_layers": pa.array([num_layers] * rows, pa.int16()),
        **provenance_columns(provenance, rows),
        "extracted_at": pa.array([extracted_at] * rows, schema.TIMESTAMP),
    }
    return pa.table(columns, schema=schema.ATTENTION_MAPS)


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def input_rows(
    image_ids: Sequence[str], display: np.ndarray, weights_id: str, transforms: Sequence[InputTransform] = ()
) -> pa.Table:
    """display: (B, H, W, 3) uint8, what the model saw; ``transforms``: each image's geometry (NULL if not given)."""
    batch, height, width, _ = display.shape
    given = list(transforms) or [None] * batch
    return pa.table(
        {
            "image_id": pa.array(list(image_ids), pa.string()),
            "input_h": pa.array([height] * batch, pa.int16()),
            "input_w": pa.array([width] * batch, pa.int16()),
            "jpeg": pa.array([encode_jpeg(img) for img in display], pa.binary()),
            "weights_id": pa.array([weights_id] * batch, pa.string()),
            **{
                name: pa.array([getattr(t, name) if t is not None else None for t in given], kind)
                for name, kind in (
                    ("scale_x", pa.float64()),
                    ("scale_y", pa.float64()),
                    ("crop_left", pa.int32()),
                    ("crop_top", pa.int32()),
                )
            },
        },
        schema=schema.INPUTS,
    )


def catalog_table(catalog: Catalog, catalogued_at: dt.datetime) -> pa.Table:
    records = catalog.records
    return pa.table(
        {
            "image_id": [r.image_id for r in records],
            "file_name": [r.file_name for r in records],
            "width": [r.width for r in records],
            "height": [r.height for r in records],
            "format": [r.format for r in records],
            "mode": [r.mode for r in records],
            "num_bytes": [r.num_bytes for r in records],
            "mtime_ns": [r.mtime_ns or None for r in records],
            "duplicate_files": [catalog.duplicates.get(r.image_id, []) for r in records],
            "thumbnail": [catalog.thumbnails.get(r.image_id) for r in records],
            "catalogued_at": [catalogued_at] * len(records),
        },
        schema=schema.IMAGES,
    )


def errors_table(
    issues: Sequence[ImageIssue], recorded_at: dt.datetime, image_ids: Sequence[str | None] = ()
) -> pa.Table:
    ids = list(image_ids) or [None] * len(issues)
    return pa.table(
        {
            "file_name": [i.file_name for i in issues],
            "image_id": ids,
            "reason": [i.reason for i in issues],
            "recorded_at": [recorded_at] * len(issues),
        },
        schema=schema.ERRORS,
    )


def image_ids_by_weights(path: Path) -> dict[str, set[str]]:
    """weights_id -> image ids present in one partition file ({} when the file does not exist)."""
    if not path.is_file():
        return {}
    table = pq.read_table(path, columns=["image_id", "weights_id"])
    result: dict[str, set[str]] = {}
    for weights_id in pc.unique(table["weights_id"]).to_pylist():
        mask = pc.equal(table["weights_id"], weights_id)
        result[weights_id] = set(pc.unique(table.filter(mask)["image_id"]).to_pylist())
    return result


def copy_rows_except(path: Path, drop_ids: set[str], write: Callable[[pa.Table], None]) -> int:
    """Stream an existing partition's row groups into ``write``, leaving out ``drop_ids``. Returns rows kept."""
    if not path.is_file():
        return 0
    kept = 0
    parquet = pq.ParquetFile(path)
    drop = pa.array(sorted(drop_ids), pa.string())
    for index in range(parquet.num_row_groups):
        group = parquet.read_row_group(index)
        if drop_ids:
            group = group.filter(pc.invert(pc.is_in(group["image_id"], value_set=drop)))
        if group.num_rows:
            write(group)
            kept += group.num_rows
    return kept


def flat_map_values(maps: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``attention_maps`` rows -> (flat values of every map, end to end; offsets (R + 1,) where row i's map is
    ``flat[offsets[i]:offsets[i + 1]]``; lengths (R,)). Raises when a map's length is not grid_h * grid_w."""
    values = maps["map_values"].combine_chunks()
    lengths = pc.list_value_length(values).to_numpy()
    cells = maps["grid_h"].to_numpy().astype(np.int64) * maps["grid_w"].to_numpy().astype(np.int64)
    if np.any(lengths != cells):
        raise ValueError("attention_maps rows whose map length is not grid_h * grid_w")
    flat = pc.list_flatten(values).to_numpy(zero_copy_only=False)
    return flat, np.concatenate([[0], np.cumsum(lengths)]), lengths
