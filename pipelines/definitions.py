"""Wires the project's Dagster definitions; the pieces live in their own modules."""

import os

import dagster as dg

from pipelines.assets import attention_maps, head_stats, images, warehouse_catalog
from pipelines.jobs import extraction_job
from pipelines.resources import IMAGES_ENV, ExtractionSettings
from pipelines.sensors import new_images_sensor
from ssl_attention.warehouse.paths import ENV_VAR as WAREHOUSE_ENV

# EnvVar where the variable is set (the launchpad then shows where the value comes from); otherwise the
# resource falls back to data/samples and data/warehouse.
extraction_settings = ExtractionSettings(
    **{
        field: dg.EnvVar(var)
        for field, var in (("images_dir", IMAGES_ENV), ("warehouse", WAREHOUSE_ENV))
        if os.environ.get(var)
    }
)

defs = dg.Definitions(
    assets=[images, attention_maps, head_stats, warehouse_catalog],
    jobs=[extraction_job],
    sensors=[new_images_sensor],
    resources={"extraction": extraction_settings},
)


def extraction_job_def() -> dg.JobDefinition:
    """The resolved extraction job, for `reconstructable` (multiprocess runs in tests and scripts)."""
    return defs.resolve_job_def("extract_model")
