"""What the alignment tab shows, shaped from the query layer's answers: plain numpy, pandas and Arrow, no Panel
and no queries here (unit-tested on their own in tests/test_dashboard_alignment.py).

- ``score_grid``: every layer (rows) x the heads, then the fused map and the two baselines (columns), of one
  metric and feature, from ``data.alignment_grid``'s rows;
- ``ranking_frame``: one layer's ranking as the table shows it (and exports it);
- ``matrix_grid``: the head x feature matrix as a grid of entries (rows) x features (columns);
- ``no_alignment_markdown``: what to do when the warehouse holds no alignment for the selection.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from ssl_attention.query.alignment import METRICS, HeadFeatureMatrix

METRIC_LABELS = {
    "iou_50": "IoU, top 50 % of cells",
    "iou_75": "IoU, top 25 % of cells",
    "iou_90": "IoU, top 10 % of cells",
    "iou_95": "IoU, top 5 % of cells",
    "coverage": "Coverage (mass inside the regions)",
    "pointing_hit": "Pointing game (hit rate)",
    "kl": "KL(target ‖ map), lower is better",
    "mse": "MSE to the soft target, lower is better",
}
METRIC_SHORT = {"pointing_hit": "hit rate", "coverage": "coverage", "kl": "KL", "mse": "MSE"}
FUSED = "fused"
BASELINES = ("uniform", "centre_gaussian")  # the ranking's reference maps, in its order
ENTRY_LABELS = {"centre_gaussian": "centre"}  # a short column label (the entry keeps its SQL name elsewhere)
SPACER = ""  # a column left blank between the heads and the reference maps
RANKING_COLUMNS = ("rank", "entry", "mean", "ci_low", "ci_high", "median", "n_images", "head_rank")
RANKING_TITLES = {
    "rank": "rank",
    "entry": "map",
    "mean": "mean",
    "ci_low": "CI low",
    "ci_high": "CI high",
    "median": "median",
    "n_images": "n",
    "head_rank": "head rank",
}
SAMPLE_ANNOTATIONS = "data/samples/annotations.json"


def metric_options() -> dict[str, str]:
    """The metric selector's options: label -> metric, in the query layer's order (a new metric shows under
    its column name until it gets a label here)."""
    return {METRIC_LABELS.get(m, m): m for m in METRICS}


def metric_short(metric: str) -> str:
    """The metric in a few characters, for colour-bar titles: "IoU@50", "coverage", "KL"."""
    if metric.startswith("iou_"):
        return f"IoU@{metric.removeprefix('iou_')}"
    return METRIC_SHORT.get(metric, metric)


def head_entry(head: int | None) -> str:
    """The ranking's name of a map: "head 3", or "fused" for the fused map."""
    return FUSED if head is None else f"head {head}"


def entry_head(entry: str) -> int | str | None:
    """The head an entry names (None for the fused map); the entry itself for a baseline, which has no map."""
    if entry == FUSED:
        return None
    if entry.startswith("head ") and entry[5:].isdigit():
        return int(entry[5:])
    return entry


@dataclass(frozen=True)
class ScoreGrid:
    """Mean score per layer (rows, first layer on top) x entry (columns: heads, spacer, fused, baselines)."""

    layers: tuple[int, ...]
    entries: tuple[str, ...]  # the ranking's entry names; SPACER for the blank column
    values: np.ndarray  # (len(layers), len(entries)) float64, NaN where not scored (and in the spacer)
    n_images: np.ndarray  # same shape, 0 where not scored

    def column(self, head: int | None) -> int | None:
        entry = head_entry(head)
        return self.entries.index(entry) if entry in self.entries else None


def grid_entries(num_heads: int, per_head: bool) -> tuple[str, ...]:
    """Columns of the layers x heads grid: every head, a blank column, then the fused map and the baselines;
    a method without heads has the fused map and the baselines only."""
    heads = (*(head_entry(h) for h in range(num_heads)), SPACER) if per_head and num_heads else ()
    return (*heads, FUSED, *BASELINES)


def score_grid(table: pa.Table, layers: Sequence[int], num_heads: int, per_head: bool) -> ScoreGrid:
    """``table``: rows with layer, entry, mean, n_images (``data.alignment_grid``). Layers and entries without
    a row stay NaN; rows of other layers or entries are ignored."""
    entries = grid_entries(num_heads, per_head)
    values = np.full((len(layers), len(entries)), np.nan)
    counts = np.zeros((len(layers), len(entries)), dtype=np.int64)
    row_of = {int(layer): i for i, layer in enumerate(layers)}
    col_of = {entry: k for k, entry in enumerate(entries) if entry != SPACER}
    for layer, entry, mean, n in zip(
        table["layer"].to_pylist(),
        table["entry"].to_pylist(),
        table["mean"].to_pylist(),
        table["n_images"].to_pylist(),
        strict=True,
    ):
        i, k = row_of.get(int(layer)), col_of.get(entry)
        if i is None or k is None:
            continue
        values[i, k] = np.nan if mean is None else float(mean)
        counts[i, k] = int(n or 0)
    return ScoreGrid(tuple(int(layer) for layer in layers), entries, values, counts)


def ranking_frame(table: pa.Table) -> pd.DataFrame:
    """One layer's ranking (``Warehouse.head_ranking``) as the table shows it: its rows in their order (best
    first), the columns of ``RANKING_COLUMNS``."""
    return pd.DataFrame({name: table[name].to_pylist() for name in RANKING_COLUMNS}).astype(
        {"mean": "float64", "ci_low": "float64", "ci_high": "float64", "median": "float64", "head_rank": "Int64"}
    )


def ranking_table(frame: pd.DataFrame, model: str, method: str, layer: int, metric: str, feature: str) -> pa.Table:
    """The ranking as exported: what the table shows, with what it is of in the first columns."""
    count = len(frame)
    context = {
        "model": pa.array([model] * count, pa.string()),
        "method": pa.array([method] * count, pa.string()),
        "layer": pa.array([layer] * count, pa.int16()),
        "metric": pa.array([metric] * count, pa.string()),
        "feature": pa.array([feature] * count, pa.string()),
    }
    columns = {
        "rank": pa.array(frame["rank"].tolist(), pa.int32()),
        "entry": pa.array(frame["entry"].tolist(), pa.string()),
        **{name: pa.array(frame[name].tolist(), pa.float64()) for name in ("mean", "ci_low", "ci_high", "median")},
        "n_images": pa.array(frame["n_images"].tolist(), pa.int32()),
        "head_rank": pa.array([None if pd.isna(v) else int(v) for v in frame["head_rank"]], pa.int32()),
    }
    return pa.table({**context, **columns})


def matrix_table(matrix: HeadFeatureMatrix) -> pa.Table:
    """The head x feature matrix as exported: one row per (entry, feature), entries and features in the
    matrix's order; ``mean`` null where the feature was never scored."""
    entries = [e for e in matrix.entries for _ in matrix.features]
    features = [f for _ in matrix.entries for f in matrix.features]
    means = [None if not np.isfinite(v) else float(v) for v in matrix.values.reshape(-1)]
    count = len(entries)
    return pa.table(
        {
            "model": pa.array([matrix.model] * count, pa.string()),
            "method": pa.array([matrix.method] * count, pa.string()),
            "layer": pa.array([matrix.layer] * count, pa.int16()),
            "metric": pa.array([matrix.metric] * count, pa.string()),
            "entry": pa.array(entries, pa.string()),
            "feature": pa.array(features, pa.string()),
            "mean": pa.array(means, pa.float64()),
        }
    )


def entry_label(entry: str, per_head: bool, method_label: str) -> str:
    """A column or row label: "3" for head 3, "fused" (the method's name for a method without heads),
    "uniform", "centre"."""
    if entry.startswith("head "):
        return entry[5:]
    if entry == FUSED and not per_head:
        return method_label
    return ENTRY_LABELS.get(entry, entry)


def no_alignment_markdown(model: str, method: str, root: str, reason: str) -> str:
    """Why the tab has nothing to show for (model, method), and how to add annotations."""
    where = html.escape(f"{model}/{method}")
    return f"""### Alignment of {where}: no annotations scored yet

{html.escape(reason)}

The Alignment tab scores every stored map against annotated regions (boxes of the parts of each image): which
heads look where the annotations are, next to the fused map and two baselines (uniform, centre Gaussian).
To add annotations, run the extraction again with an annotation file (maps already stored are reused):

```bash
ssl-attention run --images <your images> --warehouse {root} --annotations FILE
```

`FILE` is one of two formats, told apart by their content:

- **COCO instances JSON**: `images[]` (`id`, `file_name`, `width`, `height`), `annotations[]` (`image_id`,
  `category_id`, `bbox` = `[x, y, width, height]` in pixels, optional polygon `segmentation`) and
  `categories[]` (`id`, `name`, optional `supercategory`); the category names are the features.
- **WikiChurches `building_parts.json`**: `meta[]` (the feature types, `{{name, parents}}`) and
  `annotations{{<file name>: {{bbox_groups: [{{elements: [{{left, top, width, height, label}}]}}]}}}}`,
  coordinates as fractions of the image's width and height, `label` indexing `meta`.

Images are matched by file name. A sample file for the bundled images is `{SAMPLE_ANNOTATIONS}`:

```bash
ssl-attention run --images data/samples --warehouse {root} --annotations {SAMPLE_ANNOTATIONS}
```
"""
