"""Image shards: the shard function, the recorded layout, the same queries whatever the shard count, and the
migration of a warehouse written before shards (built here in the old layout)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ssl_attention.cli import main as cli_main
from ssl_attention.extraction import catalog_images, extract_model
from ssl_attention.query import open_warehouse
from ssl_attention.query.errors import WarehouseLayoutError
from ssl_attention.stats import write_head_stats
from ssl_attention.warehouse import migrate
from ssl_attention.warehouse.migrate import migrate_shards
from ssl_attention.warehouse.paths import DATA_FILE, iter_partitions
from ssl_attention.warehouse.shards import (
    LAYOUT_FILE,
    SHARDED_TABLES,
    LegacyLayoutError,
    ShardCountError,
    check_layout,
    ensure_shards,
    legacy_files,
    recorded_shards,
    shard_of,
)

MODELS = ("clip", "resnet50")  # a per-head ViT and the CNN (Grad-CAM columns)


def test_shard_of_is_the_first_eight_hex_digits_modulo_the_count():
    assert shard_of("0000000a" + "f" * 24, 4) == "2"  # 10 mod 4
    assert shard_of("ffffffff" + "0" * 24, 3) == "0"  # 4294967295 = 3 * 1431655765
    assert shard_of("00000007" + "1" * 24, 5) == "2"
    assert shard_of("00000007" + "e" * 24, 5) == "2"  # digits after the eighth do not matter
    assert shard_of("0123abcd", 1) == "0"
    with pytest.raises(ValueError, match="not a hex digest"):
        shard_of("not-hex!", 2)
    for bad in (0, -1, 4097, True, 2.0):
        with pytest.raises(ValueError, match=r"shard count must be an integer in 1\.\.4096"):
            shard_of("00000000", bad)


def test_the_count_is_recorded_once_and_another_one_is_refused(tmp_path):
    assert recorded_shards(tmp_path) is None
    check_layout(tmp_path, 3)  # nothing recorded: any count may start
    assert recorded_shards(tmp_path) is None
    assert ensure_shards(tmp_path, 3) == 3
    assert recorded_shards(tmp_path) == 3 and (tmp_path / LAYOUT_FILE).is_file()
    assert ensure_shards(tmp_path, 3) == 3
    for refuse in (ensure_shards, check_layout):
        with pytest.raises(ShardCountError) as info:
            refuse(tmp_path, 2)
        message = str(info.value)
        assert "laid out in 3 image shards" in message and "asks for 2" in message
        assert "--shards 3" in message and f"ssl-attention migrate-shards --warehouse {tmp_path} --shards 2" in message


def _extract(folder: Path, warehouse: Path, tiny_adapters, shards: int) -> Path:
    records = catalog_images(folder, warehouse).catalog.records
    for model in MODELS:
        report = extract_model(tiny_adapters[model], records, warehouse, shards=shards)
        assert report.images_extracted == len(records)
        write_head_stats(warehouse, model)
    return warehouse


@pytest.fixture(scope="module")
def warehouses(tmp_path_factory, tiny_adapters, sample_dir):
    """The bundled samples extracted by two tiny models into a 1-shard and a 3-shard warehouse."""
    root = tmp_path_factory.mktemp("shards")
    return {n: _extract(sample_dir, root / f"shards{n}", tiny_adapters, n) for n in (1, 3)}


def assert_close(ours: object, theirs: object, where: object = "") -> None:
    """Equal, floats to 1e-6 or 1e-5 relative (batches of another composition, sums in another order, may differ
    in the last bits)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        assert ours.keys() == theirs.keys(), where
        for key in ours:
            assert_close(ours[key], theirs[key], f"{where}/{key}")
    elif isinstance(ours, list | tuple) and isinstance(theirs, list | tuple):
        assert len(ours) == len(theirs), where
        for index, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_close(a, b, f"{where}[{index}]")
    elif isinstance(ours, float) and isinstance(theirs, float):
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6, nan_ok=True), where
    else:
        assert ours == theirs, where


def _rows(warehouse: Path, table: str, **keys: str) -> list[dict]:
    """Every row of a partition over all its shards, sorted (extraction stamps dropped)."""
    rows = []
    for partition in iter_partitions(warehouse, table, **keys):
        for row in pq.read_table(partition.path).to_pylist():
            for stamp in ("extracted_at", "computed_at", "maps_extracted_at"):
                row.pop(stamp, None)
            rows.append(row)
    return sorted(rows, key=lambda r: (r["image_id"], str(r.get("layer")), str(r.get("head")), str(r.get("jpeg"))))


def test_each_image_lives_in_its_own_shard_and_no_row_is_lost(warehouses):
    one, three = warehouses[1], warehouses[3]
    assert recorded_shards(three) == 3
    shards_used = set()
    for table in SHARDED_TABLES[:3]:  # attention_maps, head_stats, inputs
        for partition in iter_partitions(three, table):
            ids = set(pq.read_table(partition.path, columns=["image_id"])["image_id"].to_pylist())
            assert {shard_of(i, 3) for i in ids} == {partition.keys["shard"]}, partition.path
            shards_used.add(partition.keys["shard"])
    assert len(shards_used) >= 2  # the five samples fall in more than one shard
    for partition in iter_partitions(one, "attention_maps"):
        keys = {"model": partition.keys["model"], "method": partition.keys["method"]}
        assert_close(_rows(three, "attention_maps", **keys), _rows(one, "attention_maps", **keys), keys)
    for model in MODELS:
        assert _rows(three, "inputs", model=model) == _rows(one, "inputs", model=model)


def _answers(root: Path) -> dict[str, object]:
    """What the query API and the SQL views say about a warehouse, in plain values."""
    wh = open_warehouse(root)
    out: dict[str, object] = {"models": [(m.slug, m.methods, m.num_heads) for m in wh.models()]}
    images = [i.image_id for i in wh.images()]
    for info in wh.models():
        for method in info.methods:
            facts = wh.facts(info.slug, method)
            out[f"facts {info.slug} {method}"] = (facts.layers, facts.heads, facts.grids)
            out[f"stat {info.slug} {method}"] = wh.stat_grid(info.slug, method, "entropy").values.tolist()
            for image in images:
                grid = wh.layer_head_maps(image, info.slug, method)
                out[f"maps {image} {info.slug} {method}"] = [m.tolist() for m in grid.per_layer]
                out[f"stat {image} {info.slug} {method}"] = wh.stat_grid(
                    info.slug, method, "entropy", image
                ).values.tolist()
                out[f"input {image} {info.slug}"] = hashlib.sha256(wh.input_image(image, info.slug)).hexdigest()
    out["sql"] = wh.sql(
        "SELECT model, method, image_id, layer, head, map_values FROM attention_maps ORDER BY ALL"
    ).to_pylist()
    out["sql_columns"] = wh.sql("SELECT * FROM attention_maps LIMIT 0").column_names
    out["stats_sql"] = wh.sql(
        "SELECT model, method, count(*) AS n, round(sum(entropy), 6) AS s FROM head_stats GROUP BY ALL ORDER BY ALL"
    ).to_pylist()
    return out


def test_queries_and_views_answer_the_same_for_one_and_three_shards(warehouses):
    one, three = _answers(warehouses[1]), _answers(warehouses[3])
    assert_close(one, three)
    assert "shard" not in one["sql_columns"]  # a storage detail, not a column of the views


def _to_old_layout(source: Path, target: Path) -> Path:
    """A copy of a 1-shard warehouse as this version's predecessor wrote it: ``.../method=<x>/data.parquet``,
    no layout file."""
    shutil.copytree(source, target)
    (target / LAYOUT_FILE).unlink()
    for table in SHARDED_TABLES:
        for partition in list(iter_partitions(target, table)):
            shard_dir = partition.path.parent
            partition.path.rename(shard_dir.parent / DATA_FILE)
            shard_dir.rmdir()
    return target


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.parquet"))
        if not p.name.startswith(".")
    }


def test_an_old_warehouse_is_refused_until_migrated_then_reads_the_same(warehouses, tmp_path, monkeypatch):
    old = _to_old_layout(warehouses[1], tmp_path / "old")
    count = len(legacy_files(old))
    assert count == sum(1 for t in SHARDED_TABLES for _ in iter_partitions(warehouses[1], t)) > 0
    with pytest.raises(
        WarehouseLayoutError, match=f"migrate it once with: ssl-attention migrate-shards --warehouse {old}"
    ):
        open_warehouse(old)
    with pytest.raises(LegacyLayoutError, match="migrate-shards"):
        ensure_shards(old, 1)

    # killed after splitting one file, before the commit: the old files are whole and still the warehouse
    before = _digests(old)
    real_split = migrate._split
    calls = []

    def split_then_die(*args):
        real_split(*args)
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(migrate, "_split", split_then_die)
    with pytest.raises(KeyboardInterrupt):
        migrate_shards(old, 2)
    monkeypatch.undo()
    assert calls and recorded_shards(old) is None
    assert {k: v for k, v in _digests(old).items() if "shard=" not in k} == before
    with pytest.raises(WarehouseLayoutError):
        open_warehouse(old)

    report = migrate_shards(old, 2)  # finishes it
    assert (report.previous, report.shards) == (None, 2) and report.files_split == count
    assert recorded_shards(old) == 2 and legacy_files(old) == []
    for table in SHARDED_TABLES:
        for model in MODELS:
            assert _rows(old, table, model=model) == _rows(warehouses[1], table, model=model), (table, model)  # exact
    assert_close(_answers(old), _answers(warehouses[1]))  # aggregates: another summation order

    migrated = _digests(old)
    again = migrate_shards(old, 2)  # idempotent
    assert (again.files_split, again.leftovers_removed) == (0, 0) and _digests(old) == migrated


def test_the_cli_re_shards_and_a_run_with_another_count_is_refused(warehouses, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(warehouses[3], copy)
    assert cli_main(["migrate-shards", "--warehouse", str(copy), "--shards", "2"]) == 0
    assert "3 shards -> 2 shards" in capsys.readouterr().out
    assert recorded_shards(copy) == 2
    assert {p.keys["shard"] for p in iter_partitions(copy, "attention_maps")} <= {"0", "1"}
    assert_close(_answers(copy), _answers(warehouses[1]))
    assert cli_main(["migrate-shards", "--warehouse", str(copy), "--shards", "0"]) == 2
    assert "shard count must be an integer in 1..4096" in capsys.readouterr().err

    from pipelines.runner import run_extraction
    from tests.pipeline_helpers import tiny_settings

    outcome = run_extraction(tiny_settings(tmp_path, copy, {}, shards=5), ["clip"])
    assert not outcome.success and "laid out in 2 image shards" in outcome.images_error
    assert f"ssl-attention migrate-shards --warehouse {copy} --shards 5" in outcome.images_error


def test_each_shard_replaces_only_its_own_rows_of_the_models_errors(tmp_path):
    from ssl_attention.extraction import read_errors, write_model_errors
    from ssl_attention.images import ImageIssue

    even, odd = "00000000" + "a" * 24, "00000001" + "b" * 24  # shards 0 and 1 of 2
    write_model_errors(tmp_path, "clip", "0", 2, [ImageIssue("even.jpg", "truncated", even)])
    write_model_errors(tmp_path, "clip", "1", 2, [ImageIssue("odd.jpg", "corrupt", odd)])
    assert sorted((r["file_name"], r["reason"]) for r in read_errors(tmp_path)) == [
        ("even.jpg", "truncated"),
        ("odd.jpg", "corrupt"),
    ]
    write_model_errors(tmp_path, "clip", "0", 2, [])  # shard 0 now extracts cleanly: shard 1's error stays
    assert [(r["source"], r["file_name"]) for r in read_errors(tmp_path)] == [("clip", "odd.jpg")]


def test_a_run_in_two_shards_scores_and_ranks_heads_as_one_shard(tmp_path, tiny_checkpoints, images_copy):
    """`ssl-attention run`'s path (every shard of the model, then its head ranking over all shards): the same
    alignment rows and head ranking as one shard."""
    from pipelines.runner import run_extraction
    from tests.pipeline_helpers import tiny_settings
    from tests.sql_helpers import SAMPLE_ANNOTATIONS

    folder = images_copy(3)  # two images in shard 0 of 2, one in shard 1
    warehouses = {}
    for shards in (1, 2):
        warehouse = tmp_path / f"shards{shards}"
        settings = tiny_settings(
            folder, warehouse, {"clip": tiny_checkpoints["clip"]}, shards=shards, annotations=str(SAMPLE_ANNOTATIONS)
        )
        outcome = run_extraction(settings, ["clip"])
        assert outcome.success and outcome.models[0].alignment["maps_scored_this_run"] > 0
        warehouses[shards] = warehouse
    assert {p.keys["shard"] for p in iter_partitions(warehouses[2], "alignment")} == {"0", "1"}
    assert_close(_rows(warehouses[2], "alignment", model="clip"), _rows(warehouses[1], "alignment", model="clip"))
    for method in ("cls", "mean", "rollout"):
        ranked = {
            n: sorted(
                pq.read_table(w / "head_ranking" / "model=clip" / f"method={method}" / DATA_FILE)
                .drop_columns(["computed_at"])
                .to_pylist(),
                key=lambda r: (r["layer"], r["metric"], r["feature"], r["entry"]),
            )
            for n, w in warehouses.items()
        }
        assert ranked[1]
        assert_close(ranked[2], ranked[1], method)  # the bootstrap is keyed by image, not by file
