"""What the Heads tab draws and says of the annotated regions (dashboards/regions.py), against values worked out
by hand: plot coordinates of clipped boxes, the toggle's state and notes, and the scores table."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from dashboards import regions
from ssl_attention.alignment.geometry import InputTransform
from ssl_attention.query.alignment import RegionsInView

# a 40 x 20 input (aspect 0.5): three regions, the second cut by the right edge, the third wholly outside
TRANSFORM = InputTransform(1.0, 1.0, 0, 0, input_w=40, input_h=20)
VIEW = RegionsInView(
    image_id="img",
    model="m",
    transform=TRANSFORM,
    region_ids=(0, 1, 2),
    features=("face", "eye", "eye"),
    boxes=np.array([[4.0, 2.0, 12.0, 10.0], [30.0, 5.0, 50.0, 15.0], [-9.0, 0.0, -1.0, 5.0]]),
    clipped=np.array([[4.0, 2.0, 12.0, 10.0], [30.0, 5.0, 40.0, 15.0], [0.0, 0.0, 0.0, 5.0]]),
    visible_fraction=np.array([1.0, 0.5, 0.0]),
)
COLOURS = {"eye": "#111111", "face": "#222222"}


def test_outlines_are_the_visible_boxes_clipped_in_plot_units() -> None:
    drawn = regions.outline_data(VIEW, 0.5, COLOURS)
    # x = px / 40; y = 0.5 * (1 - py / 20): the face's top y=2 -> 0.45, bottom y=10 -> 0.25
    assert drawn["left"] == [0.1, 0.75] and drawn["right"] == [0.3, 1.0]
    assert drawn["top"] == pytest.approx([0.45, 0.375]) and drawn["bottom"] == pytest.approx([0.25, 0.125])
    assert drawn["text"] == ["face", "eye (cut)"]  # the region outside the view is not drawn
    assert drawn["colour"] == ["#222222", "#111111"]
    # the eye starts at 0.75 > LABEL_RIGHT of the width: its label sits at its right edge, right-aligned
    assert drawn["label_x"] == [0.1, 1.0] and drawn["align"] == ["left", "right"]
    assert drawn["label_y"] == drawn["top"]
    eye = regions.outline_data(VIEW.of_feature("eye"), 0.5, COLOURS)
    assert eye["text"] == ["eye (cut)"]


def test_feature_colours_are_stable_and_skip_all() -> None:
    colours = regions.feature_colours(["all", "a", "b"])
    assert list(colours) == ["a", "b"] and colours["a"] != colours["b"]
    assert regions.feature_colours(["a", "b"]) == colours  # the same feature, the same colour


def test_the_toggle_says_why_it_cannot_be_used() -> None:
    usable, why = regions.status({}, "img", "cat.jpg", 5)
    assert not usable and "No annotations" in why and "--annotations FILE" in why
    usable, why = regions.status({"other": ("eye",)}, "img", "cat.jpg", 5)
    assert not usable and "No annotated regions</b> on cat.jpg (1 of the 5 images have some)" in why
    assert regions.status({"img": ("eye",)}, "img", "cat.jpg", 5) == (True, "")


def test_the_note_counts_cut_and_outside_regions() -> None:
    note = regions.regions_note(VIEW, "all", "cat.jpg", ("eye", "face"))
    assert note == (
        "3 regions on cat.jpg; 1 cut by the model's crop (drawn clipped); "
        "1 wholly outside the model's view (not drawn)."
    )
    assert regions.regions_note(VIEW.of_feature("face"), "face", "cat.jpg", ("eye", "face")) == (
        "1 region of <b>face</b> on cat.jpg."
    )
    assert regions.regions_note(VIEW.of_feature("nose"), "nose", "cat.jpg", ("eye", "face")) == (
        "No <b>nose</b> regions on cat.jpg (its features: eye, face)."
    )


def _scores(**metrics: list[object]) -> pa.Table:
    return pa.table(
        {
            "map_kind": ["map", "map", "map", "uniform", "centre_gaussian"],
            "head": pa.array([None, 0, 1, None, None], pa.int16()),
            **metrics,
        }
    )


def test_scores_table_holds_the_map_then_the_baselines() -> None:
    scores = _scores(
        iou_90=[0.5, 0.25, 0.125, 0.1, 0.2],
        coverage=[0.6, 0.7, 0.8, 0.3, 0.4],
        pointing_hit=[True, False, True, False, True],
    )
    table = regions.scores_html(scores, 1, "eye", "head 1")
    rows = table.split("<tr")[2:]  # after the header row
    assert [r.split('data-entry="')[1].split('"')[0] for r in rows] == ["map", "uniform", "centre_gaussian"]
    assert 'data-metric="iou_90" data-value="0.125"' in rows[0] and ">0.125<" in rows[0]
    assert 'data-metric="pointing_hit" data-value="1"' in rows[0] and ">hit<" in rows[0]
    assert 'data-metric="coverage" data-value="0.3"' in rows[1] and ">miss<" in rows[1]
    assert 'data-metric="iou_90" data-value="0.2"' in rows[2]
    assert 'data-map="head 1"' in table and "head 1</th>" in rows[0]
    assert "No scores" in regions.scores_html(scores, 7, "eye", "head 7")


def test_unscored_regions_show_dashes_and_say_why() -> None:
    nothing = [None] * 5
    table = regions.scores_html(_scores(iou_90=nothing, coverage=nothing, pointing_hit=nothing), None, "eye", "fused")
    assert table.count(">—<") == 9 and "outside the model's view: not scored" in table
