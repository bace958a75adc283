"""The extraction on a cluster: the same assets, their steps executed by Celery workers (dagster-celery).

Import this module only where `dagster-celery` is installed (the `distributed` extra). A run of
`extract_model_celery` submits each step (maps, checks, statistics, catalog) to the broker; any worker that
can import this project and reach the instance's Postgres and the warehouse executes it. A step that raises is
retried (`RETRY_POLICY`). A worker process killed mid-step raises nothing in the step: Celery gives the step
back to the broker, and it runs again in the same run, only where the workers have
dagster_home/celery/dagster_celery_config.py on their PYTHONPATH (`task_acks_late`,
`task_reject_on_worker_lost`; without it the run fails with Celery's WorkerLostError). Each partition file is
replaced atomically, so a killed attempt leaves the previous file whole. docs/scaling.md shows the deployment.
"""

import dagster as dg
from dagster_celery import celery_executor

from pipelines.definitions import defs as local_defs
from pipelines.jobs import EXTRACTION_ASSETS

# a step that raised (a transient error, a child process of the step that died) runs again, after a pause, at
# most twice; a killed worker process is Celery's redelivery instead (module docstring)
RETRY_POLICY = dg.RetryPolicy(max_retries=2, delay=1)

celery_extraction_job = dg.define_asset_job(
    name="extract_model_celery",
    selection=EXTRACTION_ASSETS,
    executor_def=celery_executor,
    op_retry_policy=RETRY_POLICY,
    description="The extraction of one model partition, each step executed by a Celery worker "
    "(configure `execution: config: broker/backend`; the instance must be shared, e.g. Postgres).",
)

defs = dg.Definitions.merge(local_defs, dg.Definitions(jobs=[celery_extraction_job]))


def celery_job_def() -> dg.JobDefinition:
    """The resolved Celery job, for `dg.reconstructable` (workers rebuild it from this function)."""
    return defs.resolve_job_def("extract_model_celery")


def celery_run_config(broker: str, backend: str, extraction: dict[str, object]) -> dict[str, object]:
    """Run config of `extract_model_celery`: the broker and result backend, and the extraction settings."""
    return {
        "execution": {"config": {"broker": broker, "backend": backend}},
        "resources": {"extraction": {"config": extraction}},
    }
