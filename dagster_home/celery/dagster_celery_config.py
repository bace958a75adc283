"""Celery settings of every worker that executes `extract_model_celery` steps (docs/scaling.md).

dagster-celery's worker app (`celery -A dagster_celery.app worker`) reads a module named
`dagster_celery_config` when one is importable: put this folder on each worker's PYTHONPATH, e.g.
`PYTHONPATH=dagster_home/celery celery -A dagster_celery.app worker ...`. (`dagster-celery worker start -y
FILE` writes such a module from a YAML file's `config_source`.)

A worker process killed mid-step (SIGKILL, the kernel's OOM killer) then gives the step's message back to the
broker, and a worker runs the step again in the same Dagster run. Without these settings Celery acknowledges
the message when the step starts, the orchestrator receives `WorkerLostError`, and the run fails: Dagster's
`RetryPolicy` never sees a failure raised by the step. The step must be safe to run twice: ours is (each
partition file is swapped in atomically; a rerun recomputes only what the previous file lacks).
"""

task_acks_late = True  # acknowledge a step's message when the step has finished, not when it started
task_reject_on_worker_lost = True  # a step whose worker process died goes back to the queue
