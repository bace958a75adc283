"""The job the sensor and the CLI launch: catalog the images, then one model's maps and statistics."""

import dagster as dg

extraction_job = dg.define_asset_job(
    name="extract_model",
    selection=dg.AssetSelection.assets(
        "images", "attention_maps", "head_stats", "annotations", "alignment", "warehouse_catalog"
    ),
    description="Catalog the images folder, then extract one model's maps and head statistics "
    "(only images not yet extracted with the same weights are computed), and score them against the "
    "annotation file when one is set (only changed maps or annotations are rescored).",
)
