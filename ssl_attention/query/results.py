"""What the query functions return: plain frozen dataclasses holding numpy arrays, never DataFrames."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ssl_attention import registry
from ssl_attention.models.weights import Provenance
from ssl_attention.query.errors import QueryError


@dataclass(frozen=True)
class StoredProvenance:
    """The weights provenance as stored with the rows (one per partition in a consistent warehouse).

    The stored counterpart of ``ssl_attention.models.weights.Provenance``, which describes a *loaded* model
    and computes ``weights_id`` from its fields (a checkpoint's fingerprint among them). A reader has the
    columns the writer stored, ``weights_id`` included, and not the fingerprint, so it keeps the stored id
    as is; ``is_random`` and ``describe()`` are the library's own, so the dashboard and the pipeline logs
    use one vocabulary.
    """

    mode: str  # pretrained | local | random
    source: str  # hub id, checkpoint directory, or the hub id a random model mimics
    revision: str | None
    seed: int | None
    weights_id: str  # as stored: identifies the weights for incremental runs

    def _library(self) -> Provenance:
        # for is_random and describe() only: without the fingerprint its weights_id is not the stored one
        return Provenance(self.mode, self.source, self.revision, self.seed)

    @property
    def is_random(self) -> bool:
        return self._library().is_random

    def describe(self) -> str:
        """``ssl_attention.models.weights.Provenance.describe()`` of these fields, word for word."""
        return self._library().describe()


@dataclass(frozen=True)
class ImageInfo:
    image_id: str
    file_name: str
    width: int
    height: int
    format: str
    thumbnail: bytes | None  # JPEG, longest side 128 px


@dataclass(frozen=True)
class ModelInfo:
    """A model as extracted into the warehouse (metadata row + registry + which partitions exist)."""

    slug: str
    label: str
    family: str  # vit | cnn
    num_layers: int
    num_heads: int  # 0 for the CNN
    num_registers: int
    has_cls: bool
    patch_size: int | None
    input_h: int
    input_w: int
    methods: tuple[str, ...]  # methods with a partition in the warehouse, registry order
    per_head_methods: tuple[str, ...]  # subset of ``methods`` with per-head maps
    layer_names: tuple[str, ...]
    provenance: StoredProvenance
    default_weights: str | None = None
    notes: str | None = None

    @property
    def grid(self) -> tuple[int, int] | None:
        """(grid_h, grid_w) of the ViT patch grid; None for the CNN (its grid differs per stage)."""
        if not self.patch_size or self.family != "vit":
            return None
        return self.input_h // self.patch_size, self.input_w // self.patch_size

    def has_heads(self, method: str) -> bool:
        return self.num_heads > 0 and method in self.per_head_methods

    @property
    def default_method(self) -> str:
        """The most comparable map across models (the registry's role preference: CLS-like, then saliency)."""
        return registry.default_method(self.methods)


@dataclass(frozen=True)
class AttentionMap:
    image_id: str
    model: str
    method: str
    layer: int
    layer_name: str | None
    head: int | None  # None = fused
    values: np.ndarray  # (grid_h, grid_w) float32, raw (not normalised)
    prefix_mass: float  # mass on CLS + register tokens
    register_mass: float
    raw_scale: float | None  # Grad-CAM: raw cam = values * raw_scale
    target_class: int | None  # Grad-CAM: the class explained
    provenance: StoredProvenance

    @property
    def grid(self) -> tuple[int, int]:
        return self.values.shape  # type: ignore[return-value]


@dataclass(frozen=True)
class HeadGrid:
    """The fused map and every head of one (image, model, method, layer); index 0 is the fused map."""

    image_id: str
    model: str
    method: str
    layer: int
    layer_name: str | None
    heads: tuple[int | None, ...]  # (None, 0, 1, ..., H-1); (None,) for fused-only methods
    maps: np.ndarray  # (len(heads), grid_h, grid_w) float32
    prefix_mass: np.ndarray  # (len(heads),) float32
    register_mass: np.ndarray
    provenance: StoredProvenance


@dataclass(frozen=True)
class LayerHeadMaps:
    """All layers x (fused + heads) of one (image, model, method)."""

    image_id: str
    model: str
    method: str
    layers: tuple[int, ...]
    layer_names: tuple[str | None, ...]
    heads: tuple[int | None, ...]  # (None, 0, ..., H-1)
    per_layer: tuple[np.ndarray, ...]  # per layer (len(heads), grid_h_l, grid_w_l) float32
    prefix_mass: np.ndarray  # (L, len(heads)) float32
    provenance: StoredProvenance

    @property
    def uniform_grid(self) -> bool:
        return len({m.shape for m in self.per_layer}) <= 1

    @property
    def maps(self) -> np.ndarray:
        """(L, len(heads), grid_h, grid_w); Grad-CAM stages have different grids: use ``per_layer`` there."""
        if not self.uniform_grid:
            shapes = ", ".join(f"{m.shape[1]}x{m.shape[2]}" for m in self.per_layer)
            raise QueryError(f"{self.model}/{self.method} has a different grid per layer ({shapes}); use per_layer")
        return np.stack(self.per_layer) if self.per_layer else np.zeros((0, len(self.heads), 0, 0), np.float32)


@dataclass(frozen=True)
class StatGrid:
    """One statistic over layers x (fused + heads): of one image, or averaged over all images."""

    model: str
    method: str
    stat: str
    image_id: str | None  # None = mean over all images
    layers: tuple[int, ...]
    heads: tuple[int | None, ...]  # (None, 0, ..., H-1)
    values: np.ndarray  # (L, len(heads)) float64, NaN where undefined or missing
    counts: np.ndarray  # (L, len(heads)) int64: images averaged (0 or 1 for one image)


@dataclass(frozen=True)
class ComparedMap:
    """One model's map in a cross-model comparison at a relative depth."""

    model: str
    method: str
    layer: int
    depth: float  # the layer's own relative depth, layer index / (layers - 1)
    map: AttentionMap


@dataclass(frozen=True)
class Comparison:
    image_id: str
    depth: float
    entries: tuple[ComparedMap, ...]
    missing: dict[str, str] = field(default_factory=dict)  # model -> why it is not shown
