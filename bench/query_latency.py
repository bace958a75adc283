"""p50/p95 latency of the dashboard's query functions over a warehouse (default: the synthetic one).

    python bench/make_synthetic_warehouse.py          # once: 1,000 images x 6 models
    python bench/query_latency.py [--warehouse DIR] [--repeat 200] [--threads 1]

Each query picks a random image, model, method, layer and head (seeded), so the timings include row-group
pruning over the whole partition, not one hot row group. The first call of each kind (footer parse,
metadata caches) is reported separately as "cold". With ``--threads N`` the same mix runs from N threads
at once (a few dashboard sessions) and latencies are per call.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ssl_attention.query import open_warehouse

GOALS_MS = {"head_grid": 20.0, "map": 10.0}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def build_calls(warehouse: Path, seed: int) -> dict[str, Callable[[random.Random], object]]:
    wh = open_warehouse(warehouse)
    images = [i.image_id for i in wh.images()]
    models = wh.models()
    if not images or not models:
        sys.exit(f"error: {warehouse} holds no maps; run bench/make_synthetic_warehouse.py first")
    plans = []  # (model, method, layers, heads)
    for info in models:
        for method in info.methods:
            plans.append((info.slug, method, wh.layers(info.slug, method), wh.heads(info.slug, method)))
    per_head = [p for p in plans if p[3]]

    def head_grid(rng: random.Random) -> object:
        model, method, layers, _ = rng.choice(plans)
        return wh.head_grid(rng.choice(images), model, method, rng.choice(layers))

    def one_map(rng: random.Random) -> object:
        model, method, layers, heads = rng.choice(per_head)
        return wh.map(rng.choice(images), model, method, rng.choice(layers), rng.choice(heads))

    def fused_map(rng: random.Random) -> object:
        model, method, layers, _ = rng.choice(plans)
        return wh.map(rng.choice(images), model, method, rng.choice(layers), None)

    def layers_by_heads(rng: random.Random) -> object:
        model, method, _, _ = rng.choice(plans)
        return wh.layer_head_maps(rng.choice(images), model, method)

    def stat_image(rng: random.Random) -> object:
        model, method, _, _ = rng.choice(plans)
        return wh.stat_grid(model, method, "entropy_norm", rng.choice(images))

    def stat_all(rng: random.Random) -> object:
        model, method, _, _ = rng.choice(plans)
        return wh.stat_grid(model, method, rng.choice(["entropy_norm", "mean_dist_frac", "pearson_fused"]))

    def compare(rng: random.Random) -> object:
        return wh.compare_models(rng.choice(images), rng.choice([0.0, 0.5, 1.0]))

    def head_stats_one(rng: random.Random) -> object:
        model, method, layers, heads = rng.choice(per_head)
        return wh.head_statistics(rng.choice(images), model, method, rng.choice(layers), rng.choice(heads))

    return {
        "head_grid": head_grid,
        "map": one_map,
        "map (fused)": fused_map,
        "layers x heads": layers_by_heads,
        "stat heatmap (image)": stat_image,
        "stat heatmap (all)": stat_all,
        "head statistics": head_stats_one,
        "compare models": compare,
    }


def measure(call: Callable[[random.Random], object], repeat: int, threads: int, seed: int) -> list[float]:
    """Latencies in ms of ``repeat`` calls from each of ``threads`` threads."""
    timings: list[float] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        mine = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            call(rng)
            mine.append((time.perf_counter() - t0) * 1000)
        with lock:
            timings.extend(mine)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return timings


def run(calls: dict[str, Callable[[random.Random], object]], repeat: int, threads: int, seed: int) -> dict:
    results: dict[str, dict[str, float]] = {}
    for name, call in calls.items():
        start = time.perf_counter()
        call(random.Random(seed))  # cold: first touch of the footers
        cold = (time.perf_counter() - start) * 1000
        timings = measure(call, repeat, threads, seed)
        results[name] = {
            "cold": cold,
            "p50": percentile(timings, 50),
            "p95": percentile(timings, 95),
            "mean": statistics.fmean(timings),
            "n": len(timings),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warehouse", type=Path, default=Path("bench/results/synthetic_warehouse"))
    parser.add_argument("--repeat", type=int, default=200, help="calls per query kind (per thread)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    calls = build_calls(args.warehouse, args.seed)
    results = run(calls, args.repeat, args.threads, args.seed)
    print(f"warehouse {args.warehouse.resolve()}  threads {args.threads}  calls/kind {args.repeat * args.threads}")
    print(f"{'query':24s} {'cold ms':>8s} {'p50 ms':>8s} {'p95 ms':>8s}  goal")
    failed = False
    for name, r in results.items():
        goal = GOALS_MS.get(name)
        verdict = ""
        if goal is not None:
            ok = r["p95"] <= goal
            failed |= not ok
            verdict = f"p95 <= {goal:g} ms: {'ok' if ok else 'MISSED'}"
        print(f"{name:24s} {r['cold']:8.1f} {r['p50']:8.2f} {r['p95']:8.2f}  {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
