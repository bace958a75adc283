"""The head ranking on synthetic alignment rows (no models): every stored statistic against an independent
route (numpy per group, the Poisson weights drawn again, a normal sample's textbook interval), the spilled and
sharded paths against the in-memory one, NaN handling, ties, and memory that does not grow with the images."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ssl_attention.alignment import ranking
from ssl_attention.alignment.metrics import METRIC_COLUMNS
from ssl_attention.alignment.ranking import head_ranking_table, poisson_weights, write_head_ranking
from ssl_attention.warehouse import schema

COLUMNS = ["image_id", "layer", "head", "map_kind", "feature", *METRIC_COLUMNS]
STATS = ["n_images", "mean", "median", "ci_low", "ci_high", "rank", "head_rank"]
_SCHEMA = pa.schema([schema.ALIGNMENT.field(c) for c in COLUMNS])
ENTRIES = [("map", 0), ("map", 1), ("map", 2), ("map", None), ("uniform", None)]


def _alignment(n_images: int, seed: int = 0, layers: int = 2, entries=ENTRIES) -> pa.Table:
    """Rows of n images x layers x entries x features; "door" only on two images in three; some NULLs."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {c: [] for c in COLUMNS}
    for i in range(n_images):
        for layer in range(layers):
            for kind, head in entries:
                for feature in ("all", "door") if i % 3 else ("all",):
                    rows["image_id"].append(f"img-{i:05d}")
                    rows["layer"].append(layer)
                    rows["head"].append(head)
                    rows["map_kind"].append(kind)
                    rows["feature"].append(feature)
                    missing = rng.random() < 0.1  # a NULL score (e.g. every region outside the view)
                    for m in METRIC_COLUMNS:
                        value = rng.random() + (head or 0) * 0.1
                        rows[m].append(None if missing else (value > 0.5 if m == "pointing_hit" else value))
    return pa.table(rows, schema=_SCHEMA)


def _key(row: dict) -> tuple:
    return row["layer"], row["metric"], row["feature"], row["entry"]


def _expected(table: pa.Table) -> dict[tuple, dict]:
    """Per group by a direct loop: numpy's mean and median, and the CI from the same Poisson weights drawn
    for the group's images alone: mean_b = sum w x / sum w, 2.5th and 97.5th percentile over the resamples."""
    rows = table.to_pylist()
    groups: dict[tuple, list[tuple[str, float]]] = {}
    for r in rows:
        entry = r["map_kind"] if r["map_kind"] != "map" else ("fused" if r["head"] is None else f"head {r['head']}")
        for m in METRIC_COLUMNS:
            scores = groups.setdefault((r["layer"], m, r["feature"], entry), [])
            if r[m] is not None:
                scores.append((r["image_id"], float(r[m])))
    out = {}
    for key, scored in groups.items():
        if not scored:
            out[key] = {"n_images": 0, "mean": None, "median": None, "ci_low": None, "ci_high": None}
            continue
        images, x = [s[0] for s in scored], np.array([s[1] for s in scored])
        w = poisson_weights(images)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = (w @ x) / w.sum(axis=1)
        low, high = np.nanpercentile(means, [2.5, 97.5])
        out[key] = {"n_images": len(x), "mean": x.mean(), "median": float(np.median(x)), "ci_low": low, "ci_high": high}
    return out


def _by_key(table: pa.Table) -> dict[tuple, dict]:
    return {_key(r): r for r in table.to_pylist()}


def _assert_close(got: dict[tuple, dict], expected: dict[tuple, dict]) -> None:
    assert set(got) == set(expected)
    for key, e in expected.items():
        g = got[key]
        assert g["n_images"] == e["n_images"], key
        for name in ("mean", "median", "ci_low", "ci_high"):
            if e[name] is None:
                assert g[name] is None, (key, name)
            else:
                assert g[name] == pytest.approx(e[name], rel=1e-12, abs=1e-12), (key, name)


@pytest.mark.parametrize("budget", [ranking.MEMORY_BUDGET_BYTES, 2**16])  # one slice in memory; many, spilled
def test_statistics_equal_a_direct_recomputation_per_group(budget, tmp_path):
    table = _alignment(60)
    got = head_ranking_table(table, memory_budget=budget, spill_dir=tmp_path)
    _assert_close(_by_key(got), _expected(table))
    assert list(tmp_path.iterdir()) == []  # the spill files are gone


def test_a_large_normal_sample_gets_the_textbook_interval():
    """n = 4000 draws of N(5, 2): the percentile CI of the mean brackets the sample mean, is centred on it and
    is 2 x 1.96 sigma / sqrt(n) wide (to the bootstrap's own noise: ~5 % with 1000 resamples)."""
    rng = np.random.default_rng(11)
    n, sigma = 4000, 2.0
    x = rng.normal(5.0, sigma, n)
    table = pa.table(
        {
            "image_id": [f"i{i}" for i in range(n)],
            "layer": pa.array(np.zeros(n, np.int16)),
            "head": pa.array([None] * n, pa.int16()),
            "map_kind": ["map"] * n,
            "feature": ["all"] * n,
            **{
                m: pa.array(x if m != "pointing_hit" else x > 5, schema.ALIGNMENT.field(m).type) for m in METRIC_COLUMNS
            },
        }
    )
    (row,) = [r for r in head_ranking_table(table).to_pylist() if r["metric"] == "coverage"]
    assert row["ci_low"] < x.mean() < row["ci_high"]
    width = row["ci_high"] - row["ci_low"]
    assert width == pytest.approx(2 * 1.96 * x.std(ddof=1) / math.sqrt(n), rel=0.08)
    assert (row["ci_low"] + row["ci_high"]) / 2 == pytest.approx(x.mean(), abs=0.1 * width)


def test_the_weights_are_poisson_one_and_depend_on_the_image_alone():
    ids = [f"image-{i}" for i in range(3000)]
    w = poisson_weights(ids)
    assert w.shape == (ranking.BOOTSTRAP_RESAMPLES, len(ids))
    assert w.mean() == pytest.approx(1.0, abs=0.005) and w.var() == pytest.approx(1.0, abs=0.01)
    for k in range(4):  # P(X = k) = e^-1 / k!, each within 5 standard errors
        p = math.exp(-1) / math.factorial(k)
        assert (w == k).mean() == pytest.approx(p, abs=5 * math.sqrt(p * (1 - p) / w.size))
    # the same image draws the same weights wherever it appears; resamples and images are not aligned
    np.testing.assert_array_equal(poisson_weights(ids[::-1][:5])[:, ::-1], w[:, -5:])
    assert abs(np.corrcoef(w[:, 0], w[:, 1])[0, 1]) < 0.15 and abs(np.corrcoef(w[0], w[1])[0, 1]) < 0.1


def test_reruns_row_orders_and_shards_give_the_same_ranking(tmp_path):
    table = _alignment(45, seed=2)
    first, second = head_ranking_table(table), head_ranking_table(table)
    for name in STATS:
        assert first[name].equals(second[name]), name  # a rerun: identical
    files = []
    for s, part in enumerate((table.slice(0, 1000), table.slice(1000))):  # two shards, the second reversed
        path = tmp_path / f"shard={s}" / "data.parquet"
        path.parent.mkdir()
        pq.write_table(part if s == 0 else part.take(np.arange(part.num_rows)[::-1]), path, row_group_size=300)
        files.append(path)
    target = tmp_path / "head_ranking"
    write_head_ranking([*files, tmp_path / "missing" / "data.parquet"], target)
    sharded = _by_key(pq.read_table(target / "data.parquet"))
    for key, row in _by_key(first).items():  # means, counts and ranks exact; intervals to rounding
        assert {k: sharded[key][k] for k in ("n_images", "rank", "head_rank")} == {
            k: row[k] for k in ("n_images", "rank", "head_rank")
        }
        for name in ("mean", "median", "ci_low", "ci_high"):
            assert (sharded[key][name] is None) == (row[name] is None)
            if row[name] is not None:
                assert sharded[key][name] == pytest.approx(row[name], rel=1e-12, abs=1e-13)
    single = tmp_path / "single.parquet"
    pq.write_table(table, single)
    by_batches = head_ranking_table(lambda: pq.ParquetFile(single).iter_batches(batch_size=777))
    assert head_ranking_table(single)["ci_low"].equals(by_batches["ci_low"])


def test_groups_without_a_score_get_nulls_and_one_image_a_point_interval():
    table = _alignment(6, layers=1, entries=[("map", 0), ("map", 1)])
    values = {m: table[m].to_pylist() for m in METRIC_COLUMNS}
    for i, head in enumerate(table["head"].to_pylist()):
        for m in METRIC_COLUMNS:
            if head == 1:
                values[m][i] = None  # head 1: no score at all
            elif values[m][i] is None:
                values[m][i] = 0.3 if m != "pointing_hit" else False  # head 0: every image scored
    feature = table["feature"].to_pylist()
    only = next(i for i, f in enumerate(feature) if f == "door")
    for i, f in enumerate(feature):
        if f == "door" and i != only:
            for m in METRIC_COLUMNS:
                values[m][i] = None  # door: one image with a score
    for m in METRIC_COLUMNS:
        table = table.set_column(table.schema.get_field_index(m), m, pa.array(values[m], table.schema.field(m).type))
    rows = _by_key(head_ranking_table(table))
    empty = rows[(0, "iou_50", "all", "head 1")]
    assert empty["n_images"] == 0 and empty["mean"] is None and empty["median"] is None
    assert empty["ci_low"] is None and empty["ci_high"] is None and empty["rank"] is None
    assert rows[(0, "iou_50", "all", "head 0")]["rank"] == 1 and rows[(0, "iou_50", "all", "head 0")]["head_rank"] == 1
    one = rows[(0, "coverage", "door", "head 0")]
    assert one["n_images"] == 1 and one["ci_low"] == one["ci_high"] == one["mean"] == one["median"]


def test_equal_means_share_the_lower_rank_and_lower_is_better_for_kl():
    n = 8
    scores = {0: 0.5, 1: 0.5, 2: 0.7, None: 0.2}  # head 0 and head 1 tie
    rows: dict[str, list] = {c: [] for c in COLUMNS}
    for i in range(n):
        for head, score in scores.items():
            for name, value in (("image_id", f"i{i}"), ("layer", 3), ("head", head), ("map_kind", "map"),
                                ("feature", "all")):  # fmt: skip
                rows[name].append(value)
            for m in METRIC_COLUMNS:
                rows[m].append(score > 0.4 if m == "pointing_hit" else score + (1e-14 if head == 1 else 0.0))
    got = _by_key(head_ranking_table(pa.table(rows, schema=_SCHEMA)))
    iou = {e: (got[(3, "iou_50", "all", e)]["rank"], got[(3, "iou_50", "all", e)]["head_rank"]) for e in
           ("head 0", "head 1", "head 2", "fused")}  # fmt: skip
    assert iou == {"head 2": (1, 1), "head 0": (2, 2), "head 1": (2, 2), "fused": (4, None)}  # 1e-14 apart: a tie
    kl = {e: got[(3, "kl", "all", e)]["rank"] for e in ("head 0", "head 1", "head 2", "fused")}
    assert kl == {"fused": 1, "head 0": 2, "head 1": 2, "head 2": 4}
    assert got[(3, "kl", "all", "fused")]["higher_is_better"] is False


def test_an_image_twice_in_one_group_is_an_error():
    table = _alignment(3, layers=1)
    with pytest.raises(ValueError, match="image twice"):
        head_ranking_table(pa.concat_tables([table, table.slice(0, 1)]))


def test_no_rows_give_an_empty_table(tmp_path):
    assert head_ranking_table(tmp_path / "absent.parquet").num_rows == 0
    assert head_ranking_table(_alignment(0)).schema.equals(schema.HEAD_RANKING)


def test_peak_memory_does_not_grow_with_the_images(monkeypatch):
    """numpy's allocations (tracemalloc) while ranking 4x the images stay within the same bound: no (B, n)
    array (4000 images: 32 MB), the rows held one slice at a time (here at most one group's)."""
    monkeypatch.setattr(ranking, "_BATCH_ROWS", 4096)  # like Parquet row groups: batches do not grow with n

    def peak(n: int) -> int:
        table = _alignment(n, layers=3, entries=[("map", 0), ("map", None)])
        tracemalloc.start()
        head_ranking_table(table, memory_budget=2**21)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(1000), peak(4000)
    assert large < 1.5 * small + 2**20, (small, large)


def test_a_cap_on_the_spill_files_widens_the_slices_and_keeps_the_numbers(monkeypatch, tmp_path):
    monkeypatch.setattr(ranking, "_MAX_SLICES", 3)
    table = _alignment(30, seed=5)
    _assert_close(_by_key(head_ranking_table(table, memory_budget=2**16, spill_dir=tmp_path)), _expected(table))


def test_sources_lists_of_tables_and_bad_input():
    table = _alignment(12, seed=4)
    whole = head_ranking_table(table)
    half = table.num_rows // 2
    parts = head_ranking_table([table.slice(0, half), table.slice(half).combine_chunks().to_batches()[0]])
    for name in STATS:
        assert whole[name].equals(parts[name]), name
    with pytest.raises(TypeError, match="read twice"):
        head_ranking_table(iter([table]))
    with pytest.raises(TypeError, match="expected a path, a table or a record batch"):
        head_ranking_table([42])
    bad = table.set_column(1, "layer", pa.array(np.full(table.num_rows, -3, np.int16)))
    with pytest.raises(ValueError, match="layers >= 0"):
        head_ranking_table(bad)
