"""A Celery worker process killed mid-step: the partition's previous file stays whole, and the step, given back
to the broker (dagster_home/celery/dagster_celery_config.py), runs again in the same run and completes the
partition with every image once.

Services as in tests/test_distributed.py (PostgreSQL instance, Redis, two workers). The workers import
tests/worker_pause.py, which holds the attention_maps step just before it swaps in its first new file; the
test SIGKILLs the process executing the step there (the pid of its STEP_START event).
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipelines.runner import run_extraction
from ssl_attention.extraction import catalog_images, read_catalog_records
from ssl_attention.warehouse.atomic import TEMP_SUFFIX
from ssl_attention.warehouse.paths import iter_partitions
from tests.cluster_services import REPO, celery_workers, postgres, postgres_bin, redis
from tests.pipeline_helpers import checkpoint_args, tiny_settings

REQUIRED = os.environ.get("SSL_ATTENTION_REQUIRE_DISTRIBUTED") == "1"  # CI: run, never skip
MODEL = "dinov2"
WORKER_CONFIG = REPO / "dagster_home" / "celery"
LAUNCH = """
import json, sys
import dagster as dg
from pipelines.distributed import celery_job_def
home, run_config, model = json.loads(sys.argv[1])
with dg.DagsterInstance.from_config(home) as instance:
    result = dg.execute_job(
        dg.reconstructable(celery_job_def), instance, run_config=run_config, tags={"dagster/partition": model},
        asset_selection=[dg.AssetKey("attention_maps")],
    )
    print(result.run_id, "SUCCESS" if result.success else "FAILURE")
"""


@pytest.fixture(scope="module")
def services():
    missing = None
    try:
        import dagster_celery  # noqa: F401
        import dagster_postgres  # noqa: F401
    except ImportError as exc:
        missing = f"{exc.name} not installed (pip install -e '.[test]')"
    if missing is None and (postgres_bin() is None or shutil.which("redis-server") is None):
        missing = "postgresql / redis-server not installed (apt-get install -y postgresql redis-server)"
    if missing:
        if REQUIRED:
            pytest.fail(missing)
        pytest.skip(missing)
    with postgres() as pg_env, redis() as redis_url:
        yield pg_env, redis_url


def digests(warehouse: Path) -> dict[Path, str]:
    return {
        p.path: hashlib.sha256(p.path.read_bytes()).hexdigest()
        for p in iter_partitions(warehouse, "attention_maps", model=MODEL)
    }


def wait_for_pause(control: Path, seen: set[int], run: subprocess.Popen) -> int:
    """The pid of a process that paused in a step and is not in ``seen``."""
    deadline = time.time() + 120
    while time.time() < deadline:
        pids = {int(p.name.removeprefix("paused-")) for p in control.glob("paused-*")} - seen
        if pids:
            (pid,) = pids
            return pid
        assert run.poll() is None, run.communicate()[0]
        time.sleep(0.05)
    raise AssertionError("no worker process reached the pause within 120 s")


def test_a_killed_worker_leaves_the_previous_file_and_the_redelivered_step_completes(
    services, tmp_path, tiny_checkpoints, images_copy, monkeypatch
):
    from pipelines.distributed import celery_run_config

    pg_env, redis_url = services
    broker, backend = f"{redis_url}/0", f"{redis_url}/1"
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "postgres" / "dagster.yaml", home / "dagster.yaml")
    for name, value in pg_env.items():
        monkeypatch.setenv(name, value)

    folder, warehouse = images_copy(2), tmp_path / "wh"
    with dg.DagsterInstance.ephemeral() as local:  # the previous files: two images, one process
        assert run_extraction(tiny_settings(folder, warehouse, tiny_checkpoints), [MODEL], instance=local).success
    previous = digests(warehouse)
    assert len(previous) == 3  # cls, mean, rollout
    images_copy(3)  # a third image: the next run rewrites every partition of the model
    catalog_images(folder, warehouse)
    image_ids = {r.image_id for r in read_catalog_records(warehouse, folder)}
    assert len(image_ids) == 3

    control = tmp_path / "pause"
    control.mkdir()
    (control / "armed").touch()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), str(WORKER_CONFIG), os.environ.get("PYTHONPATH")])),
        "SSL_ATTENTION_POOL": "none",
        "SSL_ATTENTION_TEST_PAUSE_DIR": str(control),
    }
    extraction = {
        "images_dir": str(folder),
        "warehouse": str(warehouse),
        "weights": "pretrained",
        "checkpoints": checkpoint_args(tiny_checkpoints),
        "batch_size": 2,
        "device": "cpu",
    }
    args = json.dumps([str(home), celery_run_config(broker, backend, extraction), f"{MODEL}|0"])  # (model, shard)
    with celery_workers(broker, backend, 2, env, ("-I", "tests.worker_pause")) as workers:
        run = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, args], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
        )
        killed = wait_for_pause(control, set(), run)
        os.kill(killed, signal.SIGKILL)  # the process executing the step, its new rows all in temp files
        rerun = wait_for_pause(control, {killed}, run)  # the step, redelivered, paused at the same point
        assert digests(warehouse) == previous  # the killed attempt replaced nothing
        (control / "release").touch()
        out, _ = run.communicate(timeout=240)
        assert all(worker.poll() is None for worker in workers)  # a worker outlives its killed pool process
    run_id, status = out.strip().splitlines()[-1].split()
    assert status == "SUCCESS"

    with dg.DagsterInstance.from_config(str(home)) as instance:
        starts = [e.dagster_event.pid for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START)]
        steps = [e.step_key for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START)]
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.SUCCESS
    attempts = [pid for pid, step in zip(starts, steps, strict=True) if step == "attention_maps"]
    assert attempts == [killed, rerun]  # the one run executed the step twice: killed, then redelivered

    after = digests(warehouse)
    assert set(after) == set(previous) and all(after[p] != previous[p] for p in previous)
    for path in after:
        table = pq.read_table(path, columns=["image_id", "layer", "head"])
        assert set(table["image_id"].to_pylist()) == image_ids
        keys = pc.binary_join_element_wise(
            table["image_id"],
            pc.cast(table["layer"], "string"),
            pc.fill_null(pc.cast(table["head"], "string"), "f"),
            "/",
        )
        assert pc.count_distinct(keys).as_py() == table.num_rows, path  # every (image, layer, head) once
        assert not list(path.parent.glob(f".*{TEMP_SUFFIX}"))  # the killed attempt's temp files are gone
