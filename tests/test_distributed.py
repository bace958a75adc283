"""The extraction on a cluster, end to end: a Dagster instance on PostgreSQL, a Redis broker and two Celery
worker processes (all started here on 127.0.0.1 and stopped afterwards), a backfill of 2 image shards x 2 models
(four (model, shard) runs launched at once); the warehouse they write equals a single-process run's."""

import os
import shutil
import subprocess

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.runner import run_extraction
from tests.cluster_services import REPO, celery_workers, launch_run, postgres, postgres_bin, redis
from tests.cluster_services import run_finished as finished
from tests.pipeline_helpers import checkpoint_args, tiny_settings

REQUIRED = os.environ.get("SSL_ATTENTION_REQUIRE_DISTRIBUTED") == "1"  # CI: run, never skip
MODELS = ("clip", "dinov2")
SHARDS = 2  # the first three samples fall in both shards (ids 5d23…: 1, fc89…: 0, 52da…: 0)


def _missing() -> str | None:
    try:
        import dagster_celery  # noqa: F401
        import dagster_postgres  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} not installed (pip install -e '.[test]')"
    if postgres_bin() is None or shutil.which("redis-server") is None:
        return "postgresql / redis-server not installed (apt-get install -y postgresql redis-server)"
    return None


@pytest.fixture(scope="module")
def services():
    reason = _missing()
    if reason:
        if REQUIRED:
            pytest.fail(reason)
        pytest.skip(reason)
    with postgres() as pg_url, redis() as redis_url:
        yield pg_url, redis_url


def _step_pids(instance: dg.DagsterInstance, run_id: str) -> dict[str, int]:
    return {
        event.step_key: event.dagster_event.pid
        for event in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START)
    }


def _table(warehouse, model: str, method: str, shard: str):
    path = warehouse / "attention_maps" / f"model={model}" / f"method={method}" / f"shard={shard}" / "data.parquet"
    table = pq.read_table(path).drop_columns(["extracted_at"])
    return table.sort_by([("image_id", "ascending"), ("layer", "ascending"), ("head", "ascending")])


def test_celery_workers_on_a_postgres_instance_write_the_single_process_warehouse(
    services, tmp_path, tiny_checkpoints, images_copy, monkeypatch
):
    from pipelines.distributed import celery_run_config

    pg_env, redis_url = services
    broker, backend = f"{redis_url}/0", f"{redis_url}/1"
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "postgres" / "dagster.yaml", home / "dagster.yaml")  # the documented one
    for name, value in pg_env.items():
        monkeypatch.setenv(name, value)
    folder, warehouse = images_copy(3), tmp_path / "cluster_wh"
    extraction = {
        "images_dir": str(folder),
        "warehouse": str(warehouse),
        "weights": "pretrained",
        "checkpoints": checkpoint_args(tiny_checkpoints),
        "batch_size": 2,
        "device": "cpu",
        "shards": SHARDS,
    }
    run_config = celery_run_config(broker, backend, extraction)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env["SSL_ATTENTION_POOL"] = "none"
    env["SSL_ATTENTION_SHARDS"] = str(SHARDS)  # the definitions of the launchers and the workers: 2 shards

    def launch(partition: str | None, assets: list[str]) -> subprocess.Popen:
        return launch_run(home, run_config, partition, assets, env)

    with celery_workers(broker, backend, 2, env) as workers:
        assert finished(launch(None, ["images"]))[1]
        keys = [f"{model}|{shard}" for model in MODELS for shard in map(str, range(SHARDS))]
        runs = [finished(p) for p in [launch(k, ["attention_maps", "head_stats"]) for k in keys]]  # all at once
        assert all(success for _, success in runs)
        assert finished(launch(None, ["warehouse_catalog"]))[1]
        with dg.DagsterInstance.from_config(str(home)) as instance:
            pids = [_step_pids(instance, run_id) for run_id, _ in runs]
            assert {type(instance.run_storage).__name__} == {"PostgresRunStorage"}
            for key in keys:
                records = instance.get_runs(dg.RunsFilter(tags={"dagster/partition": key}))
                assert [r.status for r in records] == [dg.DagsterRunStatus.SUCCESS], key
        assert all(worker.poll() is None for worker in workers)

    step_pids = {pid for p in pids for pid in p.values()}
    assert len(step_pids) >= 2, pids  # the backfill's steps ran in (at least) two worker processes
    assert os.getpid() not in step_pids  # none ran in this process (nor in the launching ones, which only wait)
    assert all({"attention_maps", "attention_maps_checks", "head_stats"} <= set(p) for p in pids)

    reference = tmp_path / "single_wh"
    outcome = run_extraction(tiny_settings(folder, reference, tiny_checkpoints, shards=SHARDS), list(MODELS))
    assert outcome.success
    ours_files = sorted(str(p.relative_to(warehouse)) for p in warehouse.glob("attention_maps/*/*/*/data.parquet"))
    theirs_files = sorted(str(p.relative_to(reference)) for p in reference.glob("attention_maps/*/*/*/data.parquet"))
    assert ours_files == theirs_files
    assert {f.split("/")[3] for f in ours_files} == {"shard=0", "shard=1"}  # both shards hold images
    for name in ours_files:
        _, model, method, shard, _ = (part.split("=")[-1] for part in name.split("/"))
        ours, theirs = _table(warehouse, model, method, shard), _table(reference, model, method, shard)
        assert ours.num_rows > 0
        assert ours.drop_columns(["map_values"]).equals(theirs.drop_columns(["map_values"])), name
        for a, b in zip(ours["map_values"].to_pylist(), theirs["map_values"].to_pylist(), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
