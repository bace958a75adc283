"""The dashboard's only door to the warehouse: the query layer (``ssl_attention.query``), cached per scalar key.

Each cached function is keyed on the warehouse root and the partition file's version (so a re-extraction is
picked up without a restart) plus the request's scalars. Results are shared between sessions: treat them as
read-only.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import panel as pn
import pyarrow as pa
from PIL import Image

from dashboards.state import ModelInfo, WarehouseIndex
from ssl_attention.query import (
    Comparison,
    HeadGrid,
    LayerHeadMaps,
    QueryError,
    StatGrid,
    Warehouse,
    open_warehouse,
)
from ssl_attention.query.alignment import HeadFeatureMatrix, RegionsInView, check_feature, check_metric

log = logging.getLogger(__name__)

THUMB_SIZE = 64  # px, tiles of the thumbnail picker
INDEX_TTL_S = 30  # how long sessions share the list of models and images
CACHE_ITEMS = 512  # per cached function; a head grid of a ViT-B is ~13 KB, an input image ~150 KB


@dataclass(frozen=True)
class Loaded:
    """The warehouse index for the selection logic, plus what the views need per model."""

    root: Path
    index: WarehouseIndex
    random_weights: dict[str, str]  # model -> "architecture of <hub id>, seed N", for models with random weights
    skipped: dict[str, str]  # "model/method" -> why its maps are not offered (an unreadable partition)


def warehouse(root: str) -> Warehouse:
    return open_warehouse(root)


def load_index(root: Path) -> Loaded:
    """Models and images present. Raises when the warehouse's list of models or images cannot be read (a
    ``QueryError``, or whatever a damaged file makes the reader raise); a model's partition that cannot be
    read only drops that method, noted in ``skipped``.

    Shared by the sessions opened within INDEX_TTL_S of each other (a new extraction shows up after that)."""
    return _load_index(str(root))


def one_line(exc: BaseException) -> str:
    """An error in one line, fit to show: a ``QueryError``'s own message (written for users), else the
    exception's type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if isinstance(exc, QueryError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@pn.cache(max_items=4, ttl=INDEX_TTL_S)
def _load_index(root: str) -> Loaded:
    wh = warehouse(root)
    models: dict[str, ModelInfo] = {}
    random_weights: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for info in wh.models():
        layers: dict[str, tuple[int, ...]] = {}
        names: dict[int, str] = {}
        for method in info.methods:
            try:
                facts = wh.facts(info.slug, method)  # the stored layers and their names ("pooling head", ...)
            except Exception as exc:  # a damaged partition must not take the other models down with it
                log.exception("skipping %s/%s in %s", info.slug, method, root)
                skipped[f"{info.slug}/{method}"] = one_line(exc)
                continue
            if facts.layers:
                layers[method] = tuple(facts.layers)
                names.update({k: v for k, v in facts.layer_names.items() if v})
        if not layers:
            continue
        models[info.slug] = ModelInfo(
            slug=info.slug,
            label=info.label,
            num_heads=info.num_heads,
            methods=tuple(layers),
            layers=layers,
            layer_names=names,
        )
        if info.provenance.mode == "random":
            random_weights[info.slug] = f"architecture of {info.provenance.source}, seed {info.provenance.seed}"
    return Loaded(Path(root), WarehouseIndex(models, tuple(wh.images())), random_weights, skipped)


def _version(root: str, table: str, **keys: str) -> str:
    """The identity (inode, mtime, size) of the partition's files, every image shard's, as a cache-key scalar."""
    return warehouse(root).version(table, **keys)


# --- cached queries (scalars in, numpy/dataclasses out) ----------------------------------------------------


@pn.cache(max_items=CACHE_ITEMS, policy="LRU")
def _head_grid(root: str, version: str, image: str, model: str, method: str, layer: int) -> HeadGrid:
    return warehouse(root).head_grid(image, model, method, layer)


def head_grid(root: str, image: str, model: str, method: str, layer: int) -> HeadGrid:
    """Fused + every head of one layer (fused first), cached per (image, model, method, layer)."""
    version = _version(root, "attention_maps", model=model, method=method)
    return _head_grid(root, version, image, model, method, int(layer))


@pn.cache(max_items=64, policy="LRU")
def _layer_head_maps(root: str, version: str, image: str, model: str, method: str) -> LayerHeadMaps:
    return warehouse(root).layer_head_maps(image, model, method)


def layer_head_maps(root: str, image: str, model: str, method: str) -> LayerHeadMaps:
    version = _version(root, "attention_maps", model=model, method=method)
    return _layer_head_maps(root, version, image, model, method)


@pn.cache(max_items=CACHE_ITEMS, policy="LRU")
def _input_rgb(root: str, version: str, image: str, model: str) -> np.ndarray:
    jpeg = warehouse(root).input_image(image, model)
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def input_rgb(root: str, image: str, model: str) -> np.ndarray:
    """What the model saw, (H, W, 3) uint8."""
    return _input_rgb(root, _version(root, "inputs", model=model), image, model)


@pn.cache(max_items=CACHE_ITEMS, policy="LRU")
def _stat_grid(root: str, version: str, model: str, method: str, stat: str, image: str | None) -> StatGrid:
    return warehouse(root).stat_grid(model, method, stat, image)


def stat_grid(root: str, model: str, method: str, stat: str, image: str | None) -> StatGrid:
    """One statistic over layers x (fused + heads); ``image=None`` averages over all images."""
    return _stat_grid(root, _version(root, "head_stats", model=model, method=method), model, method, stat, image)


@pn.cache(max_items=CACHE_ITEMS, policy="LRU")
def _head_statistics(
    root: str, version: str, image: str, model: str, method: str, layer: int, head: int | None
) -> dict[str, float | None]:
    return warehouse(root).head_statistics(image, model, method, layer, head)


def head_statistics(
    root: str, image: str, model: str, method: str, layer: int, head: int | None
) -> dict[str, float | None]:
    version = _version(root, "head_stats", model=model, method=method)
    return _head_statistics(root, version, image, model, method, int(layer), head)


def compare_models(root: str, image: str, depth: float, methods: dict[str, str]) -> Comparison:
    """One image in every model at a relative depth (not cached: it reads cached-size single maps)."""
    return warehouse(root).compare_models(image, depth, methods=methods)


# --- annotations and alignment (the regions on the maps, and their scores) ---------------------------------


@pn.cache(max_items=4, policy="LRU")
def _annotated_images(root: str, version: str) -> dict[str, tuple[str, ...]]:
    return warehouse(root).annotated_images()


def annotated_images(root: str) -> dict[str, tuple[str, ...]]:
    """image id -> the features of its regions; {} when the warehouse holds no annotations."""
    return _annotated_images(root, _version(root, "annotations"))


@pn.cache(max_items=CACHE_ITEMS, policy="LRU")
def _regions_in_view(root: str, version: str, image: str, model: str) -> RegionsInView:
    return warehouse(root).regions_in_view(image, model)


def regions_in_view(root: str, image: str, model: str) -> RegionsInView:
    """The image's regions in the model's input frame (``Warehouse.regions_in_view``)."""
    version = _version(root, "annotations") + _version(root, "inputs", model=model)
    return _regions_in_view(root, version, image, model)


@pn.cache(max_items=CACHE_ITEMS, policy="LRU")
def _image_scores(root: str, version: str, image: str, model: str, method: str, layer: int, feature: str) -> pa.Table:
    return warehouse(root).image_scores(image, model, method, layer, feature)


def image_scores(root: str, image: str, model: str, method: str, layer: int, feature: str) -> pa.Table:
    """One image's scores at a layer for ``feature``: fused, heads, baselines (``Warehouse.image_scores``)."""
    version = _version(root, "alignment", model=model, method=method)
    return _image_scores(root, version, image, model, method, int(layer), feature)


@pn.cache(max_items=4096, policy="LRU")
def _thumbnail(root: str, version: str, image: str) -> np.ndarray:
    """A (THUMB_SIZE, THUMB_SIZE, 3) tile: the catalog thumbnail letterboxed on white."""
    tile = Image.new("RGB", (THUMB_SIZE, THUMB_SIZE), "white")
    found = warehouse(root).image_index().get(image)
    if found is not None and found.thumbnail:
        try:
            thumb = Image.open(io.BytesIO(found.thumbnail)).convert("RGB")
            thumb.thumbnail((THUMB_SIZE, THUMB_SIZE))
            tile.paste(thumb, ((THUMB_SIZE - thumb.width) // 2, (THUMB_SIZE - thumb.height) // 2))
        except OSError:
            pass  # an unreadable thumbnail stays a blank tile
    return np.asarray(tile)


def thumbnail(root: str, image: str) -> np.ndarray:
    return _thumbnail(root, _version(root, "images"), image)


# --- alignment with annotations (cached per head_ranking / alignment partition version) --------------------

# Every layer's ranking entries of one (model, method, metric, feature): the alignment tab's layers x heads grid.
ALIGNMENT_GRID_SQL = """SELECT layer, entry, map_kind, head, n_images, mean, ci_low, ci_high, rank
FROM head_ranking
WHERE model = $model AND method = $method AND metric = $metric AND feature = $feature
ORDER BY layer, rank NULLS LAST, map_kind <> 'map', head NULLS FIRST"""


def _ranking_version(root: str, model: str, method: str) -> str:
    return _version(root, "head_ranking", model=model, method=method) + _version(
        root, "alignment", model=model, method=method
    )


@pn.cache(max_items=64, policy="LRU")
def _alignment_features(root: str, version: str, model: str, method: str) -> tuple[str, ...]:
    return warehouse(root).alignment_features(model, method)


def alignment_features(root: str, model: str, method: str) -> tuple[str, ...]:
    """``all`` and every annotated feature of (model, method); raises ``MissingDataError`` without alignment."""
    return _alignment_features(root, _ranking_version(root, model, method), model, method)


@pn.cache(max_items=CACHE_ITEMS, policy="LRU")
def _alignment_grid(root: str, version: str, model: str, method: str, metric: str, feature: str) -> pa.Table:
    return warehouse(root).sql(
        ALIGNMENT_GRID_SQL, {"model": model, "method": method, "metric": metric, "feature": feature}
    )


def alignment_grid(root: str, model: str, method: str, metric: str, feature: str) -> pa.Table:
    """Every layer's ranking entries (heads, fused, baselines) for one metric and feature, by layer then rank.
    The names are checked first (the same errors as ``head_ranking``)."""
    check_feature(feature, alignment_features(root, model, method), f"{model}/{method}")
    return _alignment_grid(root, _ranking_version(root, model, method), model, method, check_metric(metric), feature)


@pn.cache(max_items=CACHE_ITEMS, policy="LRU")
def _head_ranking(root: str, version: str, model: str, method: str, layer: int, metric: str, feature: str) -> pa.Table:
    return warehouse(root).head_ranking(model, method, layer, metric, feature)


def head_ranking(root: str, model: str, method: str, layer: int, metric: str, feature: str) -> pa.Table:
    """Heads, fused map and baselines of one layer ranked on ``metric`` for ``feature`` (best first)."""
    version = _ranking_version(root, model, method)
    return _head_ranking(root, version, model, method, int(layer), metric, feature)


@pn.cache(max_items=CACHE_ITEMS, policy="LRU")
def _head_feature_matrix(
    root: str, version: str, model: str, method: str, layer: int, metric: str
) -> HeadFeatureMatrix:
    return warehouse(root).head_feature_matrix(model, method, layer, metric)


def head_feature_matrix(root: str, model: str, method: str, layer: int, metric: str) -> HeadFeatureMatrix:
    version = _ranking_version(root, model, method)
    return _head_feature_matrix(root, version, model, method, int(layer), metric)


@pn.cache(max_items=CACHE_ITEMS, policy="LRU")
def _exemplars(
    root: str,
    version: str,
    model: str,
    method: str,
    layer: int,
    head: int | None,
    feature: str,
    metric: str,
    limit: int,
) -> pa.Table:
    return warehouse(root).exemplars(model, method, layer, head, feature, metric, limit)


def exemplars(
    root: str, model: str, method: str, layer: int, head: int | None, feature: str, metric: str, limit: int
) -> pa.Table:
    """The images where one map (``head=None``: fused) scores best on ``metric`` for ``feature``, best first."""
    version = _ranking_version(root, model, method)
    return _exemplars(root, version, model, method, int(layer), head, feature, metric, int(limit))


__all__ = [
    "Loaded",
    "QueryError",
    "alignment_features",
    "alignment_grid",
    "annotated_images",
    "compare_models",
    "exemplars",
    "head_feature_matrix",
    "head_grid",
    "head_ranking",
    "head_statistics",
    "image_scores",
    "input_rgb",
    "layer_head_maps",
    "load_index",
    "one_line",
    "regions_in_view",
    "stat_grid",
    "thumbnail",
]
