"""Data-quality checks of one model's warehouse partitions (run by the pipeline's asset checks).

Each check reads the partition files row group by row group (a few images per group, never a split image)
and vectorises within each image, so memory stays at one row group whatever the number of images.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ssl_attention.registry import METHODS, MODELS, get_method
from ssl_attention.warehouse.paths import partition_file
from ssl_attention.warehouse.shards import readable_shards, shard_names, shard_of

MASS_TOLERANCE = 1e-4
FUSED_TOLERANCE = 1e-5
MAX_EXAMPLES = 5


@dataclass
class CheckOutcome:
    name: str
    passed: bool
    description: str
    failures: int = 0
    examples: list[str] = field(default_factory=list)

    def fail(self, example: str) -> None:
        self.passed = False
        self.failures += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(example)


CHECK_NAMES = {
    "complete": "every (image, layer, head) present, fused included",
    "values_in_range": "map values finite and in [0, 1]",
    "mass_sums_to_one": f"patch mass + prefix mass = 1 ± {MASS_TOLERANCE:g} (methods whose rows are "
    "softmax rows, their means or products)",
    "fused_is_head_mean": f"fused map = mean of the head maps ± {FUSED_TOLERANCE:g}",
    "grid_matches_config": "grid_h × grid_w = map length, and every image's grid is its own input size / "
    "patch size (input size as recorded per image in the inputs table)",
    "unique_keys": "no duplicate (image, layer, head)",
    "single_weights": "one weights provenance per partition (no random rows mixed with pretrained)",
}


@dataclass(frozen=True)
class ModelFacts:
    """What the checks expect, from the models table row written with the data."""

    num_layers: int
    num_heads: int
    patch_size: int | None
    input_h: int
    input_w: int

    @classmethod
    def read(cls, warehouse: Path, model: str) -> ModelFacts | None:
        path = partition_file(warehouse, "models", model=model)
        if not path.is_file():
            return None
        row = pq.read_table(path).to_pylist()[0]
        return cls(row["num_layers"], row["num_heads"], row["patch_size"], row["input_h"], row["input_w"])


def expected_layers(method: str, facts: ModelFacts) -> list[int]:
    return get_method(method).stored_layers(facts.num_layers)


def _row_groups(path: Path) -> Iterator[pa.Table]:
    parquet = pq.ParquetFile(path)
    for index in range(parquet.num_row_groups):
        yield parquet.read_row_group(
            index,
            columns=["image_id", "layer", "head", "grid_h", "grid_w", "map_values", "prefix_mass", "weights_id"],
        )


def check_method_partition(warehouse: Path, model: str, method: str, shard: str = "0") -> list[CheckOutcome]:
    """All checks for ``attention_maps/model=<model>/method=<method>/shard=<shard>``."""
    outcomes = {name: CheckOutcome(name, True, text) for name, text in CHECK_NAMES.items()}
    path = partition_file(warehouse, "attention_maps", model=model, method=method, shard=shard)
    facts = ModelFacts.read(warehouse, model)
    inputs = partition_file(warehouse, "inputs", model=model, shard=shard)
    if not path.is_file() and not inputs.is_file() and not _catalogued_in(warehouse, shard):
        return list(outcomes.values())  # no catalogued image falls in this shard: nothing to check
    if not path.is_file() or facts is None:
        for outcome in outcomes.values():
            outcome.fail(f"partition {path} or its models row is missing")
        return list(outcomes.values())
    per_head = METHODS[method].per_head
    heads = [None, *range(facts.num_heads)] if per_head else [None]
    layers = expected_layers(method, facts)
    expected_keys = {(layer, head) for layer in layers for head in heads}
    input_sizes = _input_sizes(inputs)
    weights_ids: set[str] = set()
    seen_images: set[str] = set()

    for group in _row_groups(path):
        if group.num_rows == 0:
            continue
        weights_ids.update(pc.unique(group["weights_id"]).to_pylist())
        for image_id in pc.unique(group["image_id"]).to_pylist():
            rows = group.filter(pc.equal(group["image_id"], image_id))
            if image_id in seen_images:
                outcomes["unique_keys"].fail(f"image {image_id} appears in more than one row group")
            seen_images.add(image_id)
            size = input_sizes.get(image_id, (facts.input_h, facts.input_w))
            _check_image(model, method, image_id, rows, facts, size, expected_keys, outcomes)

    if input_sizes:  # every image the model saw must have its rows in every method
        for image_id in sorted(set(input_sizes) - seen_images)[:MAX_EXAMPLES]:
            outcomes["complete"].fail(f"image {image_id} was extracted (inputs table) but has no rows here")
    if len(weights_ids) > 1:
        outcomes["single_weights"].fail(f"{len(weights_ids)} weights in one partition: {sorted(weights_ids)}")
    return list(outcomes.values())


def _catalogued_in(warehouse: Path, shard: str) -> bool:
    """Whether any catalogued image falls in ``shard`` (without a catalog: none does)."""
    path = partition_file(warehouse, "images")
    if not path.is_file():
        return False
    shards = readable_shards(warehouse)
    return any(shard_of(i, shards) == shard for i in pq.read_table(path, columns=["image_id"])["image_id"].to_pylist())


def _input_sizes(path: Path) -> dict[str, tuple[int, int]]:
    """image id -> (input_h, input_w) from the model's inputs partition (empty when it has none)."""
    if not path.is_file():
        return {}
    table = pq.read_table(path, columns=["image_id", "input_h", "input_w"])
    ids, heights, widths = (table[name].to_pylist() for name in ("image_id", "input_h", "input_w"))
    return {image_id: (int(h), int(w)) for image_id, h, w in zip(ids, heights, widths, strict=True)}


def _check_image(
    model: str,
    method: str,
    image_id: str,
    rows: pa.Table,
    facts: ModelFacts,
    input_size: tuple[int, int],
    expected_keys: set[tuple[int, int | None]],
    outcomes: dict[str, CheckOutcome],
) -> None:
    layers = rows["layer"].to_numpy()
    heads = rows["head"].to_pylist()
    keys = list(zip(layers.tolist(), heads, strict=True))
    if len(set(keys)) != len(keys):
        outcomes["unique_keys"].fail(f"image {image_id}: {len(keys) - len(set(keys))} duplicate (layer, head) rows")
    missing = expected_keys - set(keys)
    extra = set(keys) - expected_keys
    if missing or extra:
        outcomes["complete"].fail(
            f"image {image_id}: missing {sorted(missing, key=str)[:4]} extra {sorted(extra, key=str)[:4]}"
        )

    grid_h, grid_w = rows["grid_h"].to_numpy(), rows["grid_w"].to_numpy()
    lengths = pc.list_value_length(rows["map_values"]).to_numpy()
    if np.any(lengths != grid_h.astype(np.int64) * grid_w):
        outcomes["grid_matches_config"].fail(f"image {image_id}: map length != grid_h * grid_w")
        return  # values cannot be reshaped reliably
    if facts.patch_size and MODELS[model].family == "vit":
        want = (input_size[0] // facts.patch_size, input_size[1] // facts.patch_size)
        if np.any(grid_h != want[0]) or np.any(grid_w != want[1]):
            outcomes["grid_matches_config"].fail(
                f"image {image_id}: grid {int(grid_h[0])}x{int(grid_w[0])} != {want[0]}x{want[1]} from its input "
                f"size {input_size[0]}x{input_size[1]} and patch size {facts.patch_size}"
            )

    flat = pc.list_flatten(rows["map_values"]).to_numpy(zero_copy_only=False)
    if not np.all(np.isfinite(flat)) or flat.min(initial=0) < 0 or flat.max(initial=0) > 1:
        outcomes["values_in_range"].fail(
            f"image {image_id}: values outside [0, 1] or not finite (min {np.nanmin(flat):.3g}, "
            f"max {np.nanmax(flat):.3g})"
        )
    if get_method(method).mass_sums_to_one:
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        sums = np.add.reduceat(flat.astype(np.float64), offsets[:-1]) if len(flat) else np.zeros(0)
        total = sums + rows["prefix_mass"].to_numpy()
        worst = float(np.max(np.abs(total - 1))) if len(total) else 0.0
        if worst > MASS_TOLERANCE:
            outcomes["mass_sums_to_one"].fail(f"image {image_id}: |patch + prefix - 1| up to {worst:.2e}")
    if METHODS[method].per_head and len(set(lengths.tolist())) == 1:
        values = flat.reshape(len(lengths), -1).astype(np.float64)
        for layer in np.unique(layers):
            in_layer = layers == layer
            fused = [i for i in np.flatnonzero(in_layer) if heads[i] is None]
            head_rows = [i for i in np.flatnonzero(in_layer) if heads[i] is not None]
            if len(fused) != 1 or not head_rows:
                continue  # reported by "complete"
            error = float(np.max(np.abs(values[fused[0]] - values[head_rows].mean(axis=0))))
            if error > FUSED_TOLERANCE:
                outcomes["fused_is_head_mean"].fail(f"image {image_id}, layer {layer}: |fused - mean| = {error:.2e}")


def check_model(warehouse: Path, model: str, shard: str | None = None) -> dict[str, list[CheckOutcome]]:
    """Per method of ``model``: the check outcomes of its partition in one image shard, or (None) in every shard
    of the warehouse (failures prefixed with the shard)."""
    if shard is not None:
        return {method: check_method_partition(warehouse, model, method, shard) for method in MODELS[model].methods}
    shards = shard_names(readable_shards(warehouse))
    per_method = {}
    for method in MODELS[model].methods:
        by_shard = {f"shard {s}": check_method_partition(warehouse, model, method, s) for s in shards}
        per_method[method] = by_shard[f"shard {shards[0]}"] if len(shards) == 1 else merge_outcomes(by_shard)
    return per_method


def merge_outcomes(per_method: dict[str, list[CheckOutcome]]) -> list[CheckOutcome]:
    """One outcome per check over all methods of a model (failures prefixed with the method)."""
    merged: dict[str, CheckOutcome] = {}
    for method, outcomes in per_method.items():
        for outcome in outcomes:
            target = merged.setdefault(outcome.name, CheckOutcome(outcome.name, True, outcome.description))
            for example in outcome.examples:
                target.fail(f"{method}: {example}")
            extra = outcome.failures - len(outcome.examples)
            if extra > 0:
                target.passed = False
                target.failures += extra
    return list(merged.values())
