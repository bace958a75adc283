"""Wires the project's Dagster definitions; the pieces live in their own modules."""

import dagster as dg

from pipelines.assets import attention_maps, attention_maps_checks, head_stats, images, warehouse_catalog
from pipelines.jobs import check_maps_job, demo_job, extraction_job
from pipelines.resources import ExtractionSettings
from pipelines.sensors import new_images_sensor
from ssl_attention.settings import environment_fields

# EnvVar where the variable is set (the launchpad then shows where the value comes from); an empty location
# falls back to the environment, then to data/samples and data/warehouse, when a run resolves it.
extraction_settings = ExtractionSettings(**{field: dg.EnvVar(var) for field, var in environment_fields().items()})

defs = dg.Definitions(
    assets=[images, attention_maps, head_stats, warehouse_catalog],
    asset_checks=[attention_maps_checks],
    jobs=[extraction_job, demo_job, check_maps_job],
    sensors=[new_images_sensor],
    resources={"extraction": extraction_settings},
)


def extraction_job_def() -> dg.JobDefinition:
    """The resolved extraction job, for `reconstructable` (multiprocess runs in tests and scripts)."""
    return defs.resolve_job_def("extract_model")
