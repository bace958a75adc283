"""Run configuration, editable in the launchpad; each field falls back to an environment variable."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
from pydantic import Field

from ssl_attention.extraction import DEFAULT_BATCH_SIZE
from ssl_attention.images import DEFAULT_MAX_PIXELS
from ssl_attention.models.loading import LoadRequest
from ssl_attention.models.weights import DEFAULT_SEED, WEIGHT_MODES, parse_checkpoints
from ssl_attention.registry import MODELS
from ssl_attention.warehouse.paths import local_path, resolve_warehouse

IMAGES_ENV = "SSL_ATTENTION_IMAGES"
DEFAULT_IMAGES = Path("data") / "samples"


class ExtractionSettings(dg.ConfigurableResource):
    """Where images come from, where maps go, and how models are loaded and run.

    Empty ``images_dir``/``warehouse`` fall back to $SSL_ATTENTION_IMAGES / $SSL_ATTENTION_WAREHOUSE, then
    to ``data/samples`` / ``data/warehouse``. Both may be a path or a ``file://`` URL.
    """

    images_dir: str = Field(
        default="", description="Folder of input images (searched recursively): a path or a file:// URL."
    )
    warehouse: str = Field(default="", description="Warehouse root: a path or a file:// URL.")
    weights: str = Field(default="auto", description="auto | pretrained | random")
    checkpoints: list[str] = Field(
        default_factory=list, description="Local checkpoints as MODEL=DIR; they override `weights` per model."
    )
    seed: int = Field(default=DEFAULT_SEED, description="Seed of random-weights mode.")
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1, description="Images per forward pass.")
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1, description="Decompression-bomb guard.")
    recompute: bool = Field(default=False, description="Recompute images already extracted with these weights.")

    def images_path(self) -> Path:
        return local_path(self.images_dir or os.environ.get(IMAGES_ENV) or str(DEFAULT_IMAGES), "images folder")

    def warehouse_path(self) -> Path:
        return resolve_warehouse(self.warehouse or None)

    def load_request(self, model: str) -> LoadRequest:
        if self.weights not in WEIGHT_MODES:
            raise ValueError(f"unknown weights mode {self.weights!r}; valid: {', '.join(WEIGHT_MODES)}")
        checkpoints = parse_checkpoints(self.checkpoints, list(MODELS))
        return LoadRequest(weights=self.weights, checkpoint=checkpoints.get(model), seed=self.seed, device=self.device)
