"""Atomic re-materialization, a SIGKILL mid-partition, a failing model among others, parallel partitions
with the multiprocess executor, and file:// locations."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from pipelines.assets import attention_maps, attention_maps_checks, head_stats, images, warehouse_catalog
from pipelines.runner import run_extraction
from ssl_attention.registry import MODELS
from tests.pipeline_helpers import checkpoint_args, read_partition, tiny_settings

ALL_ASSETS = [images, attention_maps, attention_maps_checks, head_stats, warehouse_catalog]
REPO = Path(__file__).resolve().parents[1]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _keys(rows: list[dict]) -> list[tuple]:
    return [(r["image_id"], r["layer"], r["head"]) for r in rows]


def _noise_images(folder: Path, count: int, seed: int = 0, prefix: str = "noise") -> Path:
    """``count`` distinct small PNGs (distinct content, so distinct image ids)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{prefix}_{index:04d}.png")
    return folder


def test_rematerializing_replaces_the_partition(tmp_path, tiny_checkpoints, images_copy):
    folder = images_copy(3)
    warehouse = tmp_path / "wh"
    settings = tiny_settings(folder, warehouse, tiny_checkpoints)
    dg.materialize(ALL_ASSETS, selection=[images], resources={"extraction": settings})
    dg.materialize(ALL_ASSETS, selection=[attention_maps], partition_key="clip|0", resources={"extraction": settings})
    path = warehouse / "attention_maps" / "model=clip" / "method=cls" / "shard=0" / "data.parquet"
    before_inode, before_rows = path.stat().st_ino, read_partition(warehouse, "clip", "cls")
    again = tiny_settings(folder, warehouse, tiny_checkpoints, recompute=True)
    dg.materialize(ALL_ASSETS, selection=[attention_maps], partition_key="clip|0", resources={"extraction": again})
    after_rows = read_partition(warehouse, "clip", "cls")
    assert path.stat().st_ino != before_inode  # a new file was swapped in
    assert sorted(_keys(after_rows), key=str) == sorted(_keys(before_rows), key=str)  # same keys, no duplicates
    assert len(set(_keys(after_rows))) == len(after_rows)
    assert not list(path.parent.glob(".*"))  # no temp file left behind


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    import dagster as dg
    from pipelines.assets import attention_maps, images
    from pipelines.resources import ExtractionSettings
    settings = ExtractionSettings(images_dir=sys.argv[1], warehouse=sys.argv[2], weights="pretrained",
                                  checkpoints=sys.argv[3:], batch_size=1, device="cpu", recompute=True)
    dg.materialize([images, attention_maps], partition_key="mae|0", resources={"extraction": settings})
    """
)


def test_sigkill_mid_partition_keeps_previous_data_and_next_run_completes(tmp_path, tiny_checkpoints):
    folder = _noise_images(tmp_path / "images", 4)
    warehouse = tmp_path / "wh"
    settings = tiny_settings(folder, warehouse, tiny_checkpoints)
    for selection, key in (([images], None), ([attention_maps], "mae")):
        dg.materialize(
            ALL_ASSETS,
            selection=selection,
            partition_key=f"{key}|0" if key else None,
            resources={"extraction": settings},
        )
    partition = warehouse / "attention_maps" / "model=mae" / "method=cls" / "shard=0"
    before = _digest(partition / "data.parquet")
    rows_before = read_partition(warehouse, "mae", "cls")

    _noise_images(folder, 400, seed=1, prefix="more")  # many more images: the next run takes a while
    script = tmp_path / "kill_me.py"
    script.write_text(KILL_SCRIPT)
    args = [sys.executable, str(script), str(folder), str(warehouse), *checkpoint_args(tiny_checkpoints)]
    child = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    temp_seen = None
    while time.time() < deadline and child.poll() is None:
        temps = [p for p in partition.glob(".*.parquet.tmp") if p.stat().st_size > 0]
        if temps:  # the writer has started streaming the new partition
            temp_seen = temps[0]
            time.sleep(0.3)
            break
        time.sleep(0.01)
    assert temp_seen is not None, "the child never started writing"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    assert child.returncode == -signal.SIGKILL

    # the previous data is whole and readable, byte for byte
    assert _digest(partition / "data.parquet") == before
    assert pq.read_table(partition / "data.parquet").num_rows == len(rows_before)

    # the next run completes: all images, no duplicates, the orphan temp file cleaned up
    dg.materialize(ALL_ASSETS, selection=[images], resources={"extraction": settings})
    result = dg.materialize(
        ALL_ASSETS, selection=[attention_maps], partition_key="mae|0", resources={"extraction": settings}
    )
    assert result.success
    rows = read_partition(warehouse, "mae", "cls")
    keys = _keys(rows)
    assert len(keys) == len(set(keys))
    assert len({r["image_id"] for r in rows}) == 404
    assert not any(p.name.endswith(".parquet.tmp") for p in partition.iterdir())
    assert all(e.passed for e in result.get_asset_check_evaluations())


def test_a_failing_model_does_not_stop_the_others(tmp_path, tiny_checkpoints, images_copy):
    broken = tmp_path / "broken_checkpoint"
    broken.mkdir()  # no config.json
    checkpoints = {**tiny_checkpoints, "mae": broken}
    warehouse = tmp_path / "wh"
    settings = tiny_settings(images_copy(2), warehouse, checkpoints)
    outcome = run_extraction(settings, ["dinov2", "mae", "clip"], instance=dg.DagsterInstance.ephemeral())
    by_model = {m.model: m for m in outcome.models}
    assert not by_model["mae"].success
    assert "mae" in by_model["mae"].error and "config.json" in by_model["mae"].error
    for model in ("dinov2", "clip"):
        assert by_model[model].success, by_model[model].error
        assert len({r["image_id"] for r in read_partition(warehouse, model, "cls")}) == 2
    assert not (warehouse / "attention_maps" / "model=mae").exists() or not list(
        (warehouse / "attention_maps" / "model=mae").glob("*/shard=*/data.parquet")
    )
    assert not outcome.success


def _run_partition(instance_ref: dg.InstanceRef, partition: str, run_config: dict) -> tuple[bool, str]:
    from pipelines.definitions import extraction_job_def

    with dg.DagsterInstance.from_ref(instance_ref) as instance:
        result = dg.execute_job(
            dg.reconstructable(extraction_job_def),
            instance=instance,
            run_config=run_config,
            tags={"dagster/partition": partition},
        )
        return result.success, result.run_id


def _step_window(instance: dg.DagsterInstance, run_id: str, step: str) -> tuple[float, float]:
    records = instance.all_logs(run_id)
    starts = [
        r.timestamp for r in records if r.step_key == step and r.dagster_event_type == dg.DagsterEventType.STEP_START
    ]
    ends = [
        r.timestamp for r in records if r.step_key == step and r.dagster_event_type == dg.DagsterEventType.STEP_SUCCESS
    ]
    return min(starts), max(ends)


def test_two_partitions_in_parallel_with_the_multiprocess_executor(tmp_path, tiny_checkpoints, images_copy):
    """Two runs (one per model partition) at once; each uses the multiprocess executor; the warehouse
    and the images folder are given as file:// URLs."""
    folder = images_copy(3)
    warehouse = tmp_path / "wh"
    config = {
        "images_dir": folder.as_uri(),
        "warehouse": warehouse.as_uri(),
        "weights": "pretrained",
        "checkpoints": checkpoint_args(tiny_checkpoints),
        "device": "cpu",
    }
    run_config = {"resources": {"extraction": {"config": config}}}
    with dg.instance_for_test() as instance:
        with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
            keys = ["dinov2|0", "clip|0"]  # (model, shard) partitions
            results = list(pool.map(_run_partition, [instance.get_ref()] * 2, keys, [run_config] * 2))
        assert all(ok for ok, _ in results)
        for run_id, partition in zip((r for _, r in results), keys, strict=True):
            run = instance.get_run_by_id(run_id)
            assert run.tags["dagster/partition"] == partition
            # the multiprocess executor runs each step in a child process of the run's process
            events = [r.dagster_event for r in instance.all_logs(run_id) if r.dagster_event is not None]
            run_pid = next(e.pid for e in events if e.event_type == dg.DagsterEventType.RUN_START)
            step_pids = {e.pid for e in events if e.event_type == dg.DagsterEventType.STEP_START}
            assert step_pids and run_pid not in step_pids
        windows = sorted(_step_window(instance, run_id, "attention_maps") for _, run_id in results)
        assert windows[1][0] < windows[0][1], f"steps did not overlap: {windows}"
        assert instance.get_materialized_partitions(dg.AssetKey("attention_maps")) == set(keys)
    for model in ("dinov2", "clip"):
        for method in MODELS[model].methods:
            assert len({r["image_id"] for r in read_partition(warehouse, model, method)}) == 3


def test_a_killed_cli_run_does_not_block_the_next_one(tmp_path, tiny_checkpoints):
    """With the shipped instance config (gpu pool, limit 1), a SIGKILLed `ssl-attention run` must not keep
    the pool's only slot: the next run marks it failed, frees the slot and completes."""
    import shutil

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "SSL_ATTENTION_POOL": "gpu"}  # as on a CUDA machine
    folder = _noise_images(tmp_path / "images", 300)
    warehouse = tmp_path / "wh"
    command = [sys.executable, "-m", "ssl_attention.cli", "run", "--images", str(folder), "--models", "mae"]
    command += ["--weights", "pretrained", "--checkpoint", f"mae={tiny_checkpoints['mae']}"]
    command += ["--warehouse", str(warehouse), "--batch-size", "1", "--device", "cpu"]

    child = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partition = warehouse / "attention_maps" / "model=mae" / "method=cls" / "shard=0"
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None and not list(partition.glob(".*.parquet.tmp")):
        time.sleep(0.01)
    assert child.poll() is None, "the run ended before it could be killed"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        held = instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
        assert held, "the killed run should still hold the gpu slot"  # the situation under test

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "mae       300 extracted" in second.stdout
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
        failed = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
        assert any(r.tags.get("ssl_attention/pid") == str(child.pid) for r in failed)
