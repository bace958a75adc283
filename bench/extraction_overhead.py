"""Extraction time per image over a bare eager forward pass, per model, measured in one run.

For each model (base-size architecture, seeded random init: timings do not depend on the weights' values):
  bare       = module(pixel_values, output_attentions=True) on an already preprocessed batch
               (ResNet-50: its plain forward; Grad-CAM needs a backward too, reported separately)
  extraction = ssl_attention.extraction.extract_model on the same images into an empty warehouse:
               decoding, preprocessing, the forward pass, every method's maps, Arrow conversion, Parquet
               writing and the atomic commit.
The ratio extraction / bare is what the pipeline adds. Goal: <= 1.15 for every ViT.

    python bench/extraction_overhead.py [--images 16] [--batch-size 8] [--repeats 3] [--device auto]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ssl_attention.extraction import catalog_images, extract_model, plan_batches, read_catalog_records
from ssl_attention.models.adapters import ViTAdapter
from ssl_attention.models.loading import LoadRequest, load_model
from ssl_attention.registry import MODELS

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


def make_images(folder: Path, count: int) -> Path:
    """``count`` distinct photographs: the samples, shifted and flipped so each has its own content id."""
    sources = sorted(SAMPLES.glob("*.jpg"))
    for index in range(count):
        image = Image.open(sources[index % len(sources)]).convert("RGB")
        array = np.roll(np.asarray(image), shift=index * 7, axis=1)
        Image.fromarray(array).save(folder / f"img_{index:03d}.jpg", quality=90)
    return folder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(adapter, pixel_values: torch.Tensor) -> float:
    start = time.perf_counter()
    if isinstance(adapter, ViTAdapter):
        with torch.inference_mode():
            adapter.module(**adapter.model_inputs(pixel_values), output_attentions=True)
    else:
        with torch.inference_mode():
            adapter.module(pixel_values)
    sync(adapter.device)
    return time.perf_counter() - start


def forward_backward(adapter, pixel_values: torch.Tensor) -> float:
    start = time.perf_counter()
    inputs = pixel_values.detach().requires_grad_(True)
    logits = adapter.module(inputs)
    logits.max(dim=1).values.sum().backward()
    sync(adapter.device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="ssl_attention_bench_"))
    try:
        (workdir / "images").mkdir()
        folder = make_images(workdir / "images", args.images)
        warehouse = workdir / "warehouse"
        catalog_images(folder, warehouse)
        records = read_catalog_records(warehouse, folder)
        print(
            f"{len(records)} images, batch {args.batch_size}, {args.repeats} repeats, torch threads "
            f"{torch.get_num_threads()}"
        )
        print(f"{'model':14s} {'device':6s} {'bare ms/img':>12s} {'extract ms/img':>15s} {'ratio':>6s}  note")
        for slug in args.models.split(","):
            adapter = load_model(slug, LoadRequest(weights="random", device=args.device))
            batches = plan_batches(adapter, records, args.batch_size)  # one input size per batch, as extraction
            pixel_batches = [
                adapter.pixel_values([Image.open(r.path).convert("RGB") for r in batch]) for batch in batches
            ]
            bare_forward(adapter, pixel_batches[0])  # warm-up
            bare_runs, extract_runs, fb_runs = [], [], []
            for _ in range(args.repeats):
                bare_runs.append(sum(bare_forward(adapter, pv) for pv in pixel_batches) / len(records))
                target = workdir / f"run_{slug}_{len(extract_runs)}"  # a first extraction into an empty warehouse
                start = time.perf_counter()
                extract_model(adapter, records, target, batch_size=args.batch_size)
                sync(adapter.device)
                extract_runs.append((time.perf_counter() - start) / len(records))
                if MODELS[slug].family == "cnn":
                    fb_runs.append(sum(forward_backward(adapter, pv) for pv in pixel_batches) / len(records))
            bare, extract = statistics.median(bare_runs), statistics.median(extract_runs)
            note = ""
            if fb_runs:
                fb = statistics.median(fb_runs)
                note = f"Grad-CAM needs forward+backward: {fb * 1e3:.1f} ms/img, ratio to that {extract / fb:.2f}"
            print(
                f"{slug:14s} {adapter.device.type:6s} {bare * 1e3:12.1f} {extract * 1e3:15.1f} "
                f"{extract / bare:6.2f}  {note}",
                flush=True,
            )
            del adapter, pixel_batches
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
