"""Wall time of a backfill of 4 image shards x 1 model on Celery workers: with 1 worker, then with 2.

The cluster of tests/test_distributed.py (tests/cluster_services.py): a PostgreSQL instance, a Redis broker and
N Celery worker processes of dagster-celery's app (``-c 1`` each), all on 127.0.0.1. For each N, a fresh
warehouse: the images are catalogued (not timed), then the four (model, shard) runs of ``attention_maps`` are
launched at once, each from its own process, and the backfill's wall time is from the first launch to the last
run's end. The same images (distinct synthetic photographs, so their ids spread over the shards) and the same
base-size model (seeded random weights: nothing is downloaded) for both N. Expect a ratio (2 workers / 1) of
about 0.5-0.7 on a quiet machine with two free cores; each step loads the model, which both pay alike.

    python -m bench.backfill_scaling [--model dinov2] [--images 32] [--shards 4] [--write-docs]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
SECTION_START = "<!-- backfill-scaling:start -->"
SECTION_END = "<!-- backfill-scaling:end -->"


def make_images(folder: Path, count: int) -> None:
    """``count`` distinct 256 x 192 photographs: the bundled samples, cropped and shifted per index."""
    import numpy as np
    from PIL import Image

    sources = sorted((REPO / "data" / "samples").glob("*.jpg"))
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = Image.open(sources[index % len(sources)]).convert("RGB").resize((256, 192))
        array = np.roll(np.asarray(image), shift=3 * index + 1, axis=1)
        Image.fromarray(array).save(folder / f"img_{index:03d}.jpg", quality=90)


def backfill(workers: int, shards: int, model: str, images: Path, root: Path, services: tuple) -> dict:
    """One timed backfill with ``workers`` Celery workers on a fresh warehouse; its wall time and step pids."""
    import dagster as dg

    from pipelines.distributed import celery_run_config
    from tests.cluster_services import celery_workers, launch_run, run_finished

    pg_env, redis_url = services
    broker, backend = f"{redis_url}/0", f"{redis_url}/1"
    home = root / f"home{workers}"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "postgres" / "dagster.yaml", home / "dagster.yaml")
    extraction = {
        "images_dir": str(images),
        "warehouse": str(root / f"warehouse{workers}"),
        "weights": "random",
        "device": "cpu",
        "shards": shards,
    }
    run_config = celery_run_config(broker, backend, extraction)
    env = {**os.environ, **pg_env, "SSL_ATTENTION_POOL": "none", "SSL_ATTENTION_SHARDS": str(shards)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    with celery_workers(broker, backend, workers, env):
        _, ok = run_finished(launch_run(home, run_config, None, ["images"], env))
        if not ok:
            raise RuntimeError("cataloguing the images failed")
        keys = [f"{model}|{shard}" for shard in range(shards)]
        start = time.perf_counter()
        runs = [
            run_finished(p, timeout=3600)
            for p in [launch_run(home, run_config, k, ["attention_maps"], env) for k in keys]
        ]
        seconds = time.perf_counter() - start
    if not all(ok for _, ok in runs):
        raise RuntimeError(f"a run failed: {runs}")
    os.environ.update(pg_env)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        pids = {
            record.dagster_event.pid
            for run_id, _ in runs
            for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START)
        }
    return {"workers": workers, "seconds": seconds, "step_processes": len(pids)}


def section(model: str, images: int, shards: int, rows: list[dict], ratio: float) -> str:
    cores = os.cpu_count()
    lines = [
        SECTION_START,
        "## Backfill scaling (Celery workers)",
        "",
        f"`python -m bench.backfill_scaling --model {model} --images {images} --shards {shards} --write-docs`: a "
        f"backfill of {shards} image shards x 1 model ({model}, base size, random weights, CPU) on a PostgreSQL "
        "instance with Redis and N Celery workers (`-c 1` each), the four (model, shard) runs launched at once; "
        f"wall time from the first launch to the last run's end, on a machine with {cores} cores.",
        "",
        "| workers | wall time (s) | worker processes that ran steps |",
        "|---:|---:|---:|",
        *(f"| {r['workers']} | {r['seconds']:.1f} | {r['step_processes']} |" for r in rows),
        "",
        f"Ratio (2 workers / 1): **{ratio:.2f}** (goal: at most 0.7 on two free cores).",
        SECTION_END,
    ]
    return "\n".join(lines)


def write_docs(text: str) -> None:
    docs = DOCS.read_text()
    if SECTION_START in docs:
        docs = re.sub(re.escape(SECTION_START) + ".*?" + re.escape(SECTION_END), lambda _: text, docs, flags=re.S)
    else:
        docs = docs.rstrip("\n") + "\n\n" + text + "\n"
    DOCS.write_text(docs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dinov2", help="one registry model (base size, random weights)")
    parser.add_argument("--images", type=int, default=32, help="images in the backfill (default 32)")
    parser.add_argument("--shards", type=int, default=4, help="image shards (default 4)")
    parser.add_argument("--write-docs", action="store_true", help="update the section in docs/benchmarks.md")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from ssl_attention.warehouse.shards import shard_of
    from tests.cluster_services import postgres, redis

    with tempfile.TemporaryDirectory(prefix="backfill-scaling-") as tmp:
        root = Path(tmp)
        make_images(root / "images", args.images)
        from ssl_attention.images import image_id_of

        counts = [0] * args.shards
        for path in (root / "images").iterdir():
            counts[int(shard_of(image_id_of(path.read_bytes()), args.shards))] += 1
        print(f"{args.images} images over {args.shards} shards: {counts}", flush=True)
        rows = []
        with postgres() as pg_env, redis() as redis_url:
            for workers in (1, 2):
                rows.append(backfill(workers, args.shards, args.model, root / "images", root, (pg_env, redis_url)))
                print(f"{workers} worker(s): {rows[-1]['seconds']:.1f} s, steps in {rows[-1]['step_processes']} "
                      "process(es)", flush=True)  # fmt: skip
    ratio = rows[1]["seconds"] / rows[0]["seconds"]
    print(f"ratio (2 workers / 1): {ratio:.2f}")
    if args.write_docs:
        write_docs(section(args.model, args.images, args.shards, rows, ratio))
        print(f"updated {DOCS}")


if __name__ == "__main__":
    main()
