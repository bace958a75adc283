"""Helpers shared by the pipeline tests (resources pointing at tiny checkpoints, reading partitions)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from pipelines.resources import ExtractionSettings


def checkpoint_args(checkpoints: dict[str, Path]) -> list[str]:
    return [f"{slug}={path}" for slug, path in checkpoints.items()]


def tiny_settings(images: Path, warehouse: Path | str, checkpoints: dict[str, Path], **extra) -> ExtractionSettings:
    return ExtractionSettings(
        images_dir=str(images),
        warehouse=str(warehouse),
        weights="pretrained",  # every model has a checkpoint: pretrained would fail loudly if one were missing
        checkpoints=checkpoint_args(checkpoints),
        batch_size=2,
        device="cpu",
        **extra,
    )


def read_partition(warehouse: Path, model: str, method: str) -> list[dict]:
    path = warehouse / "attention_maps" / f"model={model}" / f"method={method}" / "shard=0" / "data.parquet"
    return pq.read_table(path).to_pylist()
