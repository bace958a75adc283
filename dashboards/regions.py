"""The annotated regions on the Heads tab's maps, and each map's alignment scores beside it: plain functions from
the query layer's results (``RegionsInView``, ``Warehouse.image_scores``) to what the figures draw and the HTML
shown. No Panel, no queries here (tests/test_dashboard_regions.py).

The overlays span the model's input: x runs over [0, 1] across its width, y upwards over [0, aspect] (aspect =
height / width), so a region at input pixels (x0, y0, x1, y1), y downwards, is drawn at x0 / input_w ... and
aspect * (1 - y1 / input_h) ... . Regions are drawn clipped to the input frame (the part the model saw); a
region the crop left wholly outside is not drawn, and the note says so.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from bokeh.palettes import Category10_10

from ssl_attention.query.alignment import RegionsInView

FEATURE_ALL = "all"  # every region of the image (the alignment table's "all")
SHOWN_METRICS = {  # alignment column -> (label, what it means), shown beside each map
    "iou_90": ("IoU@90", "IoU of the map's top 10% cells with the regions (1 = the same cells)"),
    "coverage": ("coverage", "share of the map's mass inside the regions"),
    "pointing_hit": ("pointing", "hit: the map's highest cell lies at least half inside the regions"),
}
BASELINE_LABELS = {"uniform": "uniform", "centre_gaussian": "centre Gaussian"}  # alignment map_kind -> label
CELL_STYLE = "padding:1px 8px"
LABEL_RIGHT = 0.55  # a box starting right of this fraction of the width has its label at its right edge
ADD_ANNOTATIONS = (
    "add them with <code>ssl-attention run --annotations FILE</code> (COCO instances JSON or WikiChurches "
    "<code>building_parts.json</code>; a sample: <code>data/samples/annotations.json</code>)"
)


def feature_colours(features: Sequence[str]) -> dict[str, str]:
    """A colour per feature (Category10, in the order given, cycling), the same on every image."""
    named = [f for f in features if f != FEATURE_ALL]
    return {feature: Category10_10[k % len(Category10_10)] for k, feature in enumerate(named)}


def outline_data(view: RegionsInView, aspect: float, colours: Mapping[str, str]) -> dict[str, list[Any]]:
    """The figures' region columns (``figures.REGION_COLUMNS``) for the visible regions of ``view``: boxes clipped
    to the input, in plot units; labels at their top-left corners (top-right for a box in the right part of the
    frame, so that the label stays in it), "(cut)" after a region the crop cut."""
    width, height = view.transform.input_w, view.transform.input_h
    shown = np.flatnonzero(view.visible)
    boxes = view.clipped[shown]
    left, right = (boxes[:, 0] / width).tolist(), (boxes[:, 2] / width).tolist()
    top = (aspect * (1 - boxes[:, 1] / height)).tolist()
    bottom = (aspect * (1 - boxes[:, 3] / height)).tolist()
    features = [view.features[k] for k in shown]
    texts = [f"{f} (cut)" if view.cut[k] else f for f, k in zip(features, shown, strict=True)]
    return {
        "left": left,
        "right": right,
        "bottom": bottom,
        "top": top,
        "colour": [colours.get(f, Category10_10[0]) for f in features],
        "label_x": [b[2] if b[0] > LABEL_RIGHT else b[0] for b in (boxes / width).tolist()],
        "label_y": top,
        "text": texts,
        "align": ["right" if b[0] / width > LABEL_RIGHT else "left" for b in boxes.tolist()],
    }


def status(annotated: Mapping[str, Sequence[str]], image: str, file_name: str, total_images: int) -> tuple[bool, str]:
    """(the toggle can be used, why not) for an image: the warehouse holds no annotations, or none of this image."""
    if not annotated:
        return False, f"<b>No annotations</b> in this warehouse: {ADD_ANNOTATIONS}."
    if image not in annotated:
        return False, (
            f"<b>No annotated regions</b> on {html.escape(file_name)} "
            f"({len(annotated)} of the {total_images} images have some)."
        )
    return True, ""


def regions_note(view: RegionsInView, feature: str, file_name: str, features_here: Sequence[str]) -> str:
    """What the overlay shows of ``feature``'s regions (``view`` already of that feature): how many, which the crop
    cut or left outside, or that the image has none of it."""
    name = html.escape(file_name)
    if not view.features:
        listed = html.escape(", ".join(features_here))
        return f"No <b>{html.escape(feature)}</b> regions on {name} (its features: {listed})."
    count = len(view.features)
    what = "region" if count == 1 else "regions"
    which = "" if feature == FEATURE_ALL else f" of <b>{html.escape(feature)}</b>"
    parts = [f"{count} {what}{which} on {name}"]
    outside, cut = int((~view.visible).sum()), int(view.cut.sum())
    if cut:
        parts.append(f"{cut} cut by the model's crop (drawn clipped)")
    if outside:
        parts.append(f"{outside} wholly outside the model's view (not drawn)")
    return "; ".join(parts) + "."


def _cell(metric: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        shown, raw = "—", ""
    elif metric == "pointing_hit":
        shown, raw = ("hit" if value else "miss"), str(int(bool(value)))
    else:
        shown, raw = f"{value:.3f}", repr(float(value))
    return f'<td data-metric="{metric}" data-value="{raw}" style="{CELL_STYLE}">{shown}</td>'


def scores_html(scores: pa.Table, head: int | None, feature: str, map_label: str) -> str:
    """A small table of ``SHOWN_METRICS`` for the map ``head`` (None: the fused map) and the two baselines of the
    same image, layer and feature, from ``Warehouse.image_scores`` rows; ``map_label`` names the map's row."""
    rows = scores.select(["map_kind", "head", *SHOWN_METRICS]).to_pylist()
    mine = next((r for r in rows if r["map_kind"] == "map" and r["head"] == head), None)
    if mine is None:
        return f"<small>No scores of this map for {html.escape(feature)}.</small>"
    entries = [("map", html.escape(map_label), mine)]
    entries += [(kind, label, r) for kind, label in BASELINE_LABELS.items() for r in rows if r["map_kind"] == kind]
    header = "".join(
        f'<th title="{html.escape(tip)}" style="{CELL_STYLE}">{label}</th>' for label, tip in SHOWN_METRICS.values()
    )
    body = "".join(
        f'<tr data-entry="{kind}"><th scope="row" style="{CELL_STYLE}">{label}</th>'
        + "".join(_cell(metric, row[metric]) for metric in SHOWN_METRICS)
        + "</tr>"
        for kind, label, row in entries
    )
    unscored = all(mine[m] is None for m in SHOWN_METRICS)
    after = "<br><small>Every region lies outside the model's view: not scored.</small>" if unscored else ""
    return (
        f'<table class="region-scores" data-feature="{html.escape(feature)}" data-map="{html.escape(map_label)}" '
        'style="font-size:12px;'
        'border-collapse:collapse;text-align:right">'
        f'<caption style="text-align:left;font-size:12px">Alignment with <b>{html.escape(feature)}</b></caption>'
        f"<tr><th></th>{header}</tr>{body}</table>{after}"
    )
