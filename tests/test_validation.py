"""Each data-quality check passes on good data and fails on data broken in exactly its way."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ssl_attention.registry import MODELS
from ssl_attention.validation import CHECK_NAMES, check_method_partition, check_model, merge_outcomes


def _path(warehouse: Path, model: str, method: str) -> Path:
    return warehouse / "attention_maps" / f"model={model}" / f"method={method}" / "shard=0" / "data.parquet"


def _replace(table: pa.Table, name: str, values: list | pa.Array) -> pa.Table:
    field = table.schema.field(name)
    return table.set_column(table.schema.get_field_index(name), field, pa.array(values, field.type))


def _rows(table: pa.Table) -> list[dict]:
    return table.to_pylist()


def drop_one_head(table: pa.Table) -> pa.Table:
    rows = _rows(table)
    victim = next(i for i, r in enumerate(rows) if r["head"] == 1)
    return pa.Table.from_pylist(rows[:victim] + rows[victim + 1 :], schema=table.schema)


def value_above_one(table: pa.Table) -> pa.Table:
    rows = _rows(table)
    rows[3]["map_values"][0] = 1.5
    return pa.Table.from_pylist(rows, schema=table.schema)


def value_nan(table: pa.Table) -> pa.Table:
    rows = _rows(table)
    rows[2]["map_values"][1] = float("nan")
    return pa.Table.from_pylist(rows, schema=table.schema)


def halve_prefix_mass(table: pa.Table) -> pa.Table:
    return _replace(table, "prefix_mass", pc.multiply(table["prefix_mass"], 0.5).to_pylist())


def permute_fused(table: pa.Table) -> pa.Table:
    """Reverse the cells of one fused row: same mass and range, no longer the mean of its heads."""
    rows = _rows(table)
    fused = next(i for i, r in enumerate(rows) if r["head"] is None)
    rows[fused]["map_values"] = rows[fused]["map_values"][::-1]
    return pa.Table.from_pylist(rows, schema=table.schema)


def duplicate_a_row(table: pa.Table) -> pa.Table:
    return pa.concat_tables([table, table.slice(0, 1)])


def mix_weights(table: pa.Table) -> pa.Table:
    """The first image's rows claim random weights; the others keep the checkpoint's."""
    first = table["image_id"][0].as_py()
    ids = [
        "random:x:seed=0#0" if image == first else weights
        for image, weights in zip(table["image_id"].to_pylist(), table["weights_id"].to_pylist(), strict=True)
    ]
    return _replace(table, "weights_id", ids)


def reshape_grid(table: pa.Table) -> pa.Table:
    """grid 4x4 -> 2x8: the length still matches, the model's grid does not."""
    table = _replace(table, "grid_h", [2] * table.num_rows)
    return _replace(table, "grid_w", [8] * table.num_rows)


CORRUPTIONS: dict[str, list[Callable[[pa.Table], pa.Table]]] = {
    "complete": [drop_one_head],
    "values_in_range": [value_above_one, value_nan],
    "mass_sums_to_one": [halve_prefix_mass],
    "fused_is_head_mean": [permute_fused],
    "grid_matches_config": [reshape_grid],
    "unique_keys": [duplicate_a_row],
    "single_weights": [mix_weights],
}


def test_corruptions_cover_every_check():
    assert set(CORRUPTIONS) == set(CHECK_NAMES)


@pytest.mark.parametrize("model", list(MODELS))
def test_good_data_passes_every_check(tiny_warehouse, model):
    outcomes = merge_outcomes(check_model(tiny_warehouse, model))
    assert {o.name for o in outcomes} == set(CHECK_NAMES)
    assert all(o.passed for o in outcomes), [(o.name, o.examples) for o in outcomes if not o.passed]


@pytest.mark.parametrize(
    ("check", "corrupt"),
    [(name, fn) for name, fns in CORRUPTIONS.items() for fn in fns],
    ids=lambda x: getattr(x, "__name__", x),
)
def test_each_check_fails_on_its_corruption(tmp_path, tiny_warehouse, check, corrupt):
    warehouse = tmp_path / "wh"
    shutil.copytree(tiny_warehouse, warehouse)
    path = _path(warehouse, "dinov2", "cls")
    pq.write_table(corrupt(pq.read_table(path)), path)
    outcomes = {o.name: o for o in check_method_partition(warehouse, "dinov2", "cls")}
    assert not outcomes[check].passed, check
    assert outcomes[check].failures >= 1 and outcomes[check].examples


def test_missing_image_in_one_method_is_incomplete(tmp_path, tiny_warehouse):
    warehouse = tmp_path / "wh"
    shutil.copytree(tiny_warehouse, warehouse)
    path = _path(warehouse, "mae", "mean")
    table = pq.read_table(path)
    first = table["image_id"][0].as_py()
    pq.write_table(table.filter(pc.not_equal(table["image_id"], first)), path)
    outcomes = {o.name: o for o in check_method_partition(warehouse, "mae", "mean")}
    assert not outcomes["complete"].passed
    assert first in " ".join(outcomes["complete"].examples)


def test_mass_check_tolerance_is_1e_4(tmp_path, tiny_warehouse):
    """A deviation of 5e-5 passes, 5e-4 fails: the documented tolerance, not a looser one."""
    results = {}
    for delta in (5e-5, 5e-4):
        warehouse = tmp_path / f"wh{delta}"
        shutil.copytree(tiny_warehouse, warehouse)
        path = _path(warehouse, "siglip", "probe")
        table = pq.read_table(path)
        shifted = (np.asarray(table["prefix_mass"].to_pylist(), dtype=np.float64) + delta).tolist()
        pq.write_table(_replace(table, "prefix_mass", shifted), path)
        results[delta] = {o.name: o.passed for o in check_method_partition(warehouse, "siglip", "probe")}
    assert results[5e-5]["mass_sums_to_one"]
    assert not results[5e-4]["mass_sums_to_one"]
