"""Alignment throughput: maps scored per second, end to end over a synthetic warehouse, and the metrics core.

End to end (the default): the synthetic warehouse of ``bench/make_synthetic_warehouse.py`` (base-size shapes,
every input 640 x 480 through shortest-edge 224 + centre crop 224, the transform stored in ``inputs``) gets
synthetic COCO annotations (seeded: 1-4 boxes per image from 4 categories, some cut by the crop), read by
``write_annotations``; then for each image count a fresh process scores the first N annotated images of every
model with ``write_alignment`` (Parquet reads, geometry, metrics, baselines, atomic writes; the head ranking
timed apart) and reports maps/s and the growth of its peak memory (VmHWM) over the process after imports and
the annotations, at the scoring's peak; then the rankings run in a fresh process of their own (over the
same files) and report their peak over that process's size after imports and one row group read. Both
must stay flat as the count grows (the partitions are streamed 32 images at a time; the ranking streams its
alignment rows, bootstrap and medians within ``ranking.MEMORY_BUDGET_BYTES``).

    python bench/alignment_throughput.py [--warehouse DIR] [--counts 100,300,1000] [--models all]
    python bench/alignment_throughput.py --core [--maps 50000] [--repeats 3] [--grids 14 16]

Goal: >= 20,000 maps/s on 2 cores (end to end, scoring).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ssl_attention.alignment.geometry import InputTransform, coverage_grid, soft_target_grid
from ssl_attention.alignment.metrics import alignment_metrics

GOAL_MAPS_PER_S = 20_000
BENCH = Path(__file__).resolve().parent
CATEGORIES = ("face", "door", "window", "tower")


# --- the metrics core ----------------------------------------------------------------------------------------


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


def core(args: argparse.Namespace) -> None:
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


# --- end to end ----------------------------------------------------------------------------------------------


def synthetic_annotations(warehouse: Path, count: int | None, seed: int = 0) -> dict:
    """COCO instances over the first ``count`` catalogued images (all when None), seeded."""
    import pyarrow.parquet as pq

    catalog = pq.read_table(warehouse / "images" / "data.parquet").to_pylist()[:count]
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for index, row in enumerate(catalog):
        images.append({"id": index, "file_name": row["file_name"], "width": row["width"], "height": row["height"]})
        for _ in range(int(rng.integers(1, 5))):
            w, h = rng.uniform(0.08, 0.5) * row["width"], rng.uniform(0.08, 0.5) * row["height"]
            x, y = rng.uniform(0, row["width"] - w), rng.uniform(0, row["height"] - h)
            annotations.append(
                {"id": len(annotations), "image_id": index, "category_id": int(rng.integers(len(CATEGORIES))),
                 "bbox": [round(x, 1), round(y, 1), round(w, 1), round(h, 1)]}
            )  # fmt: skip
    categories = [{"id": i, "name": name} for i, name in enumerate(CATEGORIES)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def child(source: Path, count: int, models: list[str]) -> None:
    """Copy of the maps (hard links) + annotations of the first ``count`` images; score, timed; then the
    rankings in a fresh process of their own (``rank_child``), so each phase's peak is its own."""
    from ssl_attention.alignment.compute import write_alignment
    from ssl_attention.alignment.store import write_annotations

    with tempfile.TemporaryDirectory(prefix="ssl_attention_align_") as workdir:
        warehouse = Path(workdir) / "wh"
        shutil.copytree(source, warehouse, copy_function=_link, ignore=shutil.ignore_patterns("alignment", "head_*"))
        labels = Path(workdir) / "annotations.json"
        labels.write_text(json.dumps(synthetic_annotations(warehouse, count)))
        write_annotations(warehouse, labels)
        baseline = _status_kib("VmRSS")
        result = {"count": count, "baseline_kib": baseline, "models": {}}
        scoring = 0.0
        maps = 0
        for model in models:
            report = write_alignment(warehouse, model, rank=False)
            scoring += report.seconds
            maps += report.maps_scored
            result["models"][model] = {"maps": report.maps_scored, "seconds": report.seconds}
        result.update(maps=maps, scoring_s=scoring, scoring_peak_kib=_status_kib("VmHWM"))
        command = [sys.executable, __file__, "--rank-child", str(warehouse), "--models", ",".join(models)]
        ranked = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        for model, seconds in ranked["models"].items():
            result["models"][model]["rank_s"] = seconds
        result.update(ranking_s=ranked["seconds"], ranking_growth_kib=ranked["peak_kib"] - ranked["baseline_kib"])
        print(json.dumps(result))


def rank_child(warehouse: Path, models: list[str]) -> None:
    """``write_rankings`` of every model of ``models``: seconds, and the peak (VmHWM) over
    the resident size after the imports and one row group read (the Parquet reader's own buffers and pools)."""
    import pyarrow.parquet as pq

    from ssl_attention.alignment.compute import write_rankings
    from ssl_attention.warehouse.paths import iter_partitions

    for part in iter_partitions(warehouse, "alignment", model=models[0]):
        pq.ParquetFile(part.path).read_row_group(0)  # warm the reader: its buffers are not the ranking's
        break
    baseline = _status_kib("VmRSS")
    times = {}
    for model in models:
        start = time.perf_counter()
        write_rankings(warehouse, model)  # each method's ranking from the alignment files of all its shards
        times[model] = time.perf_counter() - start
    print(json.dumps({"models": times, "seconds": sum(times.values()), "baseline_kib": baseline,
                      "peak_kib": _status_kib("VmHWM")}))  # fmt: skip


def _link(src: str, dst: str) -> None:
    try:
        Path(dst).hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)


def end_to_end(args: argparse.Namespace) -> None:
    from ssl_attention.registry import MODELS

    source = args.warehouse.resolve()
    if not (source / "images" / "data.parquet").is_file():
        print(f"making the synthetic warehouse ({max(args.counts)} images) at {source} ...", flush=True)
        command = [sys.executable, str(BENCH / "make_synthetic_warehouse.py"), "--images", str(max(args.counts))]
        subprocess.run([*command, "--out", str(source)], check=True)
    models = list(MODELS) if args.models == "all" else args.models.split(",")
    print(f"end to end over {source}, models {', '.join(models)}; one fresh process per count; MiB")
    print(f"{'images':>6s} {'maps':>9s} {'score s':>8s} {'maps/s':>8s} {'rank s':>7s} {'scoring growth':>14s} "
          f"{'ranking growth':>14s}")  # fmt: skip
    for count in args.counts:
        command = [sys.executable, __file__, "--child", str(source), str(count), "--models", ",".join(models)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        rate = r["maps"] / r["scoring_s"]
        scored = (r["scoring_peak_kib"] - r["baseline_kib"]) / 1024
        peak = r["ranking_growth_kib"] / 1024
        print(f"{count:6d} {r['maps']:9,d} {r['scoring_s']:8.1f} {rate:8,.0f} {r['ranking_s']:7.1f} {scored:14.0f} "
              f"{peak:14.0f}", flush=True)  # fmt: skip
        for model, m in r["models"].items():
            rate_m = m["maps"] / m["seconds"]
            print(f"       {model:9s} {m['maps']:9,d} maps {rate_m:8,.0f} maps/s, rank {m['rank_s']:.1f} s")
    verdict = "meets" if rate >= GOAL_MAPS_PER_S else "misses"
    print(f"at {args.counts[-1]} images: {rate:,.0f} maps/s end to end - {verdict} the goal of {GOAL_MAPS_PER_S:,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--core", action="store_true", help="time the metrics core on in-memory maps only")
    parser.add_argument("--maps", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grids", type=int, nargs="+", default=[14, 16])
    parser.add_argument("--warehouse", type=Path, default=BENCH / "results" / "synthetic_warehouse")
    parser.add_argument("--counts", type=lambda text: [int(c) for c in text.split(",")], default=[100, 300, 1000])
    parser.add_argument("--models", default="all")
    parser.add_argument("--child", nargs=2, metavar=("WAREHOUSE", "COUNT"), help=argparse.SUPPRESS)
    parser.add_argument("--rank-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_child:
        rank_child(args.rank_child, args.models.split(","))
    elif args.child:
        child(Path(args.child[0]), int(args.child[1]), args.models.split(","))
    elif args.core:
        core(args)
    else:
        end_to_end(args)


if __name__ == "__main__":
    main()
