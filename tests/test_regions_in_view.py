"""``Warehouse.regions_in_view``, ``annotated_images`` and ``image_scores``: regions carried into a model's input
frame against boxes computed by hand for a known transform, and one image's scores against the alignment rows."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ssl_attention.alignment.compute import write_alignment
from ssl_attention.alignment.store import write_annotations
from ssl_attention.query import MissingDataError, QueryError, UnknownNameError, open_warehouse
from ssl_attention.warehouse import schema
from ssl_attention.warehouse.paths import partition_file
from tests.sql_helpers import SAMPLE_ANNOTATIONS, select

MODEL = "dinov2"
# The transform written for every dinov2 input: a point x lands at x * 0.5 - 10, a point y at y * 0.25 + 4
# (crop_top -4: the crop was taller than the resized image, padded at the top).
TRANSFORM = {"scale_x": 0.5, "scale_y": 0.25, "crop_left": 10, "crop_top": -4}
# (feature, box in original pixels) -> the box in the 32 x 32 input, by hand; clipped; visible fraction
REGIONS = [
    ("face", (30, 8, 50, 40), (5, 6, 15, 14), (5, 6, 15, 14), 1.0),  # wholly inside
    ("face", (60, 80, 100, 160), (20, 24, 40, 44), (20, 24, 32, 32), (12 * 8) / (20 * 20)),  # cut at right, bottom
    ("eye", (0, 0, 10, 20), (-10, 4, -5, 9), (0, 4, 0, 9), 0.0),  # wholly left of the view
]


def _image_ids(warehouse: Path) -> dict[str, str]:
    rows = pq.read_table(partition_file(warehouse, "images"), columns=["image_id", "file_name"]).to_pylist()
    return {r["file_name"]: r["image_id"] for r in rows}


def _rewrite_inputs(warehouse: Path, transform: dict[str, object]) -> None:
    path = partition_file(warehouse, "inputs", model=MODEL, shard="0")
    table = pq.read_table(path)
    for name, value in transform.items():
        index = table.schema.get_field_index(name)
        field = table.schema.field(index)
        table = table.set_column(index, field, pa.array([value] * table.num_rows, field.type))
    pq.write_table(table, path)


def _write_regions(warehouse: Path, image_id: str, file_name: str) -> None:
    rows = [
        {
            "image_id": image_id,
            "file_name": file_name,
            "region_id": k,
            "feature": feature,
            "feature_id": k,
            "parent_features": [],
            "x0": float(box[0]),
            "y0": float(box[1]),
            "x1": float(box[2]),
            "y1": float(box[3]),
            "polygon": None,
            "source_file": "hand.json",
            "source_hash": "0" * 64,
            "format": "coco",
            "loaded_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        }
        for k, (feature, box, *_) in enumerate(REGIONS)
    ]
    path = partition_file(warehouse, "annotations")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.ANNOTATIONS), path)


@pytest.fixture(scope="module")
def hand(tiny_warehouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny warehouse with a known dinov2 transform and three hand-placed regions on chelsea.jpg."""
    warehouse = tmp_path_factory.mktemp("regions") / "wh"
    shutil.copytree(tiny_warehouse, warehouse)
    _rewrite_inputs(warehouse, TRANSFORM)
    _write_regions(warehouse, _image_ids(warehouse)["chelsea.jpg"], "chelsea.jpg")
    return warehouse


@pytest.fixture(scope="module")
def aligned(tiny_warehouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny warehouse with the sample annotations and dinov2's alignment."""
    warehouse = tmp_path_factory.mktemp("aligned") / "wh"
    shutil.copytree(tiny_warehouse, warehouse)
    write_annotations(warehouse, SAMPLE_ANNOTATIONS)
    write_alignment(warehouse, MODEL)
    return warehouse


def test_regions_land_where_the_transform_puts_them_clipped_to_the_input(hand: Path) -> None:
    wh = open_warehouse(hand)
    image = _image_ids(hand)["chelsea.jpg"]
    view = wh.regions_in_view(image, MODEL)
    assert (view.transform.input_w, view.transform.input_h) == (32, 32)  # the tiny dinov2's input
    assert (view.transform.scale_x, view.transform.crop_top) == (0.5, -4)
    assert view.features == ("face", "face", "eye") and view.region_ids == (0, 1, 2)
    np.testing.assert_allclose(view.boxes, [r[2] for r in REGIONS])
    np.testing.assert_allclose(view.clipped, [r[3] for r in REGIONS])
    np.testing.assert_allclose(view.visible_fraction, [r[4] for r in REGIONS])
    assert view.visible.tolist() == [True, True, False]
    assert view.cut.tolist() == [False, True, False]

    eye = view.of_feature("eye")
    assert eye.features == ("eye",) and eye.region_ids == (2,) and not eye.visible.any()
    assert view.of_feature("all") is view
    assert view.of_feature("nose").boxes.shape == (0, 4)


def test_an_image_without_regions_and_the_annotated_images(hand: Path) -> None:
    wh = open_warehouse(hand)
    ids = _image_ids(hand)
    assert wh.annotated_images() == {ids["chelsea.jpg"]: ("eye", "face")}
    empty = wh.regions_in_view(ids["coffee.jpg"], MODEL)
    assert empty.features == () and empty.boxes.shape == (0, 4) and empty.transform.scale_y == 0.25


def test_bad_requests_say_what_is_missing(hand: Path, tiny_warehouse: Path, tmp_path: Path) -> None:
    wh = open_warehouse(hand)
    image = _image_ids(hand)["chelsea.jpg"]
    with pytest.raises(UnknownNameError, match="unknown image"):
        wh.regions_in_view("x' OR 1=1 --", MODEL)  # a parameter, never SQL text
    with pytest.raises(UnknownNameError, match="valid models"):
        wh.regions_in_view(image, "nope")
    with pytest.raises(QueryError, match="non-empty string"):
        wh.regions_in_view("", MODEL)

    bare = open_warehouse(tiny_warehouse)  # no annotations table
    assert bare.annotated_images() == {}
    with pytest.raises(MissingDataError, match=r"holds no annotations.*--annotations FILE"):
        bare.regions_in_view(image, MODEL)

    old = tmp_path / "old"
    shutil.copytree(hand, old)
    _rewrite_inputs(old, dict.fromkeys(TRANSFORM))  # an extraction from before transforms were stored
    with pytest.raises(MissingDataError, match=r"without its transform.*--recompute"):
        open_warehouse(old).regions_in_view(image, MODEL)


def test_image_scores_are_the_alignment_rows_fused_heads_then_baselines(aligned: Path) -> None:
    wh = open_warehouse(aligned)
    image = _image_ids(aligned)["astronaut.jpg"]
    rows = pq.read_table(partition_file(aligned, "alignment", model=MODEL, method="cls", shard="0"))
    for feature in ("all", "face"):
        scores = wh.image_scores(image, MODEL, "cls", 1, feature)
        expected = select(rows, image_id=image, layer=1, feature=feature)
        assert scores.num_rows == expected.num_rows == 4 + 1 + 2  # 4 heads, fused, 2 baselines
        assert scores["map_kind"].to_pylist() == ["map"] * 5 + ["uniform", "centre_gaussian"]
        assert scores["head"].to_pylist() == [None, 0, 1, 2, 3, None, None]
        for kind, head in (("map", None), ("map", 2), ("uniform", None), ("centre_gaussian", None)):
            mine = select(scores, map_kind=kind, head=head)
            stored = select(expected, map_kind=kind, head=head)
            for column in ("iou_90", "coverage", "pointing_hit"):
                assert mine[column].to_pylist() == stored[column].to_pylist(), (feature, kind, head, column)
    chelsea = _image_ids(aligned)["chelsea.jpg"]
    assert wh.image_scores(chelsea, MODEL, "cls", 1, "helmet").num_rows == 0  # no helmet on the cat
    assert pc.all(pc.equal(wh.image_scores(chelsea, MODEL, "cls", 1, "eye")["num_regions"], 2)).as_py()
    with pytest.raises(UnknownNameError, match="valid features"):
        wh.image_scores(image, MODEL, "cls", 1, "wing")
    with pytest.raises(UnknownNameError, match="unknown image"):
        wh.image_scores("gone", MODEL, "cls", 1, "all")
