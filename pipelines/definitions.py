"""Wires the project's Dagster definitions; the pieces live in their own modules."""

import dagster as dg

from pipelines.alignment_assets import alignment, annotations, head_ranking
from pipelines.assets import attention_maps, attention_maps_checks, head_stats, images, warehouse_catalog
from pipelines.jobs import check_maps_job, demo_job, extraction_job, rank_heads_job
from pipelines.resources import ExtractionSettings
from pipelines.sensors import new_images_sensor
from ssl_attention.settings import environment_fields

# EnvVar where the variable is set (the launchpad then shows where the value comes from); an empty location
# falls back to the environment, then to data/samples and data/warehouse, when a run resolves it.
extraction_settings = ExtractionSettings(**{field: dg.EnvVar(var) for field, var in environment_fields().items()})

# Evaluates the automation conditions of head_stats, alignment, head_ranking and warehouse_catalog (they follow
# new attention_maps) in the daemon `dagster dev` runs; on by default, so downstream never goes silently stale.
automation_sensor = dg.AutomationConditionSensorDefinition(
    "downstream_follows_new_maps",
    target=dg.AssetSelection.assets(head_stats, alignment, head_ranking, warehouse_catalog),
    default_status=dg.DefaultSensorStatus.RUNNING,
)

defs = dg.Definitions(
    assets=[images, attention_maps, head_stats, warehouse_catalog, annotations, alignment, head_ranking],
    asset_checks=[attention_maps_checks],
    jobs=[extraction_job, demo_job, check_maps_job, rank_heads_job],
    sensors=[new_images_sensor, automation_sensor],
    resources={"extraction": extraction_settings},
)


def extraction_job_def() -> dg.JobDefinition:
    """The resolved extraction job, for `reconstructable` (multiprocess runs in tests and scripts)."""
    return defs.resolve_job_def("extract_model")
