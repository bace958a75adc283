"""What the warehouse holds, read from its small files and footers: model rows, the layers/heads/grids of a
map partition, the image catalog. ``Warehouse`` caches each per file version (``reads.VersionCache``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssl_attention.query.reads import read_dicts
from ssl_attention.query.results import ImageInfo, ModelInfo, StoredProvenance
from ssl_attention.registry import MODELS

_FACTS_SQL = """
SELECT layer, any_value(layer_name) AS layer_name, min(grid_h) AS grid_h, min(grid_w) AS grid_w,
    max(grid_h) <> min(grid_h) OR max(grid_w) <> min(grid_w) AS mixed_grid,
    list(DISTINCT head ORDER BY head) FILTER (WHERE head IS NOT NULL) AS heads,
    bool_or(raw_scale IS NOT NULL OR target_class IS NOT NULL) AS gradcam
FROM read_parquet($path)
GROUP BY layer
ORDER BY layer
"""

_PROVENANCE_SQL = """
SELECT DISTINCT weights_mode AS mode, weights_source AS source, weights_revision AS revision,
    weights_seed AS seed, weights_id
FROM read_parquet($path)
"""

_MODEL_SQL = """
SELECT label, family, num_layers, num_heads, num_registers, has_cls, patch_size, input_h, input_w,
    methods, per_head_methods, layer_names,
    weights_mode, weights_source, weights_revision, weights_seed, weights_id
FROM read_parquet($path)
LIMIT 1
"""

_IMAGES_SQL = """
SELECT image_id, file_name, width, height, format, thumbnail
FROM read_parquet($path)
ORDER BY file_name, image_id
"""


@dataclass(frozen=True)
class PartitionFacts:
    """What one attention_maps partition holds, independent of the image."""

    layers: tuple[int, ...]
    layer_names: dict[int, str | None]
    grids: dict[int, tuple[int, int]]
    heads: tuple[int, ...]  # head indices present (empty for fused-only methods)
    provenances: dict[str, StoredProvenance]  # weights_id -> provenance (one entry in a consistent partition)
    has_gradcam_columns: bool = False  # raw_scale / target_class hold values (Grad-CAM)

    @property
    def single_provenance(self) -> StoredProvenance | None:
        return next(iter(self.provenances.values())) if len(self.provenances) == 1 else None


def read_facts(path: Path) -> PartitionFacts:
    """The facts of one attention_maps file (two small aggregate queries)."""
    rows = read_dicts(path, _FACTS_SQL)
    provenances = [StoredProvenance(**row) for row in read_dicts(path, _PROVENANCE_SQL)]
    heads = sorted({h for r in rows for h in (r["heads"] or [])})
    return PartitionFacts(
        layers=tuple(int(r["layer"]) for r in rows),
        layer_names={int(r["layer"]): r["layer_name"] for r in rows},
        grids={int(r["layer"]): (int(r["grid_h"]), int(r["grid_w"])) for r in rows},
        heads=tuple(int(h) for h in heads),
        provenances={p.weights_id: p for p in provenances},
        has_gradcam_columns=any(bool(r["gradcam"]) for r in rows),
    )


def read_model_row(path: Path) -> dict[str, Any] | None:
    """The one row of a models file (None when it is empty)."""
    rows = read_dicts(path, _MODEL_SQL)
    return rows[0] if rows else None


def read_images(path: Path) -> list[ImageInfo]:
    """The image catalog, ordered by file name."""
    return [ImageInfo(**row) for row in read_dicts(path, _IMAGES_SQL)]


def model_info(slug: str, row: dict[str, Any], available: tuple[str, ...]) -> ModelInfo:
    """A models row as ``ModelInfo``; ``available``: the methods of the row that have a maps partition."""
    spec = MODELS.get(slug)
    return ModelInfo(
        slug=slug,
        label=row["label"],
        family=row["family"],
        num_layers=int(row["num_layers"]),
        num_heads=int(row["num_heads"]),
        num_registers=int(row["num_registers"]),
        has_cls=bool(row["has_cls"]),
        patch_size=row["patch_size"],
        input_h=int(row["input_h"]),
        input_w=int(row["input_w"]),
        methods=available,
        per_head_methods=tuple(m for m in row["per_head_methods"] if m in available),
        layer_names=tuple(row["layer_names"]),
        provenance=StoredProvenance(
            row["weights_mode"],
            row["weights_source"],
            row["weights_revision"],
            row["weights_seed"],
            row["weights_id"],
        ),
        default_weights=spec.default_weights if spec else None,
        notes=spec.notes if spec else None,
    )
