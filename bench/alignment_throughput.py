"""Throughput of the alignment metrics core: maps scored per second on synthetic maps.

Synthetic float32 maps (softmax-like: positive, summing to 1, with ties from quantisation) on square grids,
scored against one coverage vector and one soft target per grid with
``ssl_attention.alignment.metrics.alignment_metrics``. Only the metrics core is timed (no Parquet reading,
no geometry). Goal: >= 20,000 maps/s on 2 cores for 14 x 14 .. 16 x 16 grids.

    python bench/alignment_throughput.py [--maps 50000] [--repeats 3] [--grids 14 16]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ssl_attention.alignment.geometry import InputTransform, coverage_grid, soft_target_grid
from ssl_attention.alignment.metrics import alignment_metrics

GOAL_MAPS_PER_S = 20_000


def synthetic_maps(count: int, n_cells: int, rng: np.random.Generator) -> np.ndarray:
    """(count, n_cells) float32 maps summing to 1, quantised to 1/4096 of the peak so some values tie."""
    logits = rng.normal(size=(count, n_cells)).astype(np.float32) * 2
    maps = np.exp(logits - logits.max(axis=1, keepdims=True))
    maps = np.round(maps * 4096) / 4096
    return (maps / maps.sum(axis=1, keepdims=True)).astype(np.float32)


def targets(grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Coverage and soft target of two boxes on a 224 x 224 input split into grid x grid cells."""
    transform = InputTransform(1.0, 1.0, 0, 0, 224, 224)
    boxes = np.array([[30.5, 40.0, 120.0, 101.3], [150.0, 20.0, 200.0, 180.0]])
    return coverage_grid(boxes, transform, grid, grid), soft_target_grid(boxes, transform, grid, grid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--maps", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grids", type=int, nargs="+", default=[14, 16])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for grid in args.grids:
        maps = synthetic_maps(args.maps, grid * grid, rng)
        coverage, soft = targets(grid)
        alignment_metrics(maps[:1000], coverage, soft)  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            alignment_metrics(maps, coverage, soft)
            best = min(best, time.perf_counter() - start)
        rate = args.maps / best
        verdict = "meets" if rate >= GOAL_MAPS_PER_S else "misses"
        print(f"{grid}x{grid} grid: {rate:,.0f} maps/s (best of {args.repeats}, {args.maps:,} maps) - {verdict} "
              f"the goal of {GOAL_MAPS_PER_S:,}")  # fmt: skip


if __name__ == "__main__":
    main()
