"""The jobs the UI, the sensor and the CLI launch: catalog the images, then one (model, shard)'s maps and
statistics; the head ranking of a model (over all its shards) is its own job (another partitioning)."""

import dagster as dg

EXTRACTION_ASSETS = dg.AssetSelection.assets(
    "images", "attention_maps", "head_stats", "annotations", "alignment", "warehouse_catalog"
)

extraction_job = dg.define_asset_job(
    name="extract_model",
    selection=EXTRACTION_ASSETS,
    description="Catalog the images folder, then extract one model's maps and head statistics for one image shard "
    "(only images not yet extracted with the same weights are computed), and score them against the "
    "annotation file when one is set (only changed maps or annotations are rescored).",
)

# What a first UI user launches: no YAML to write, nothing to download.
DEMO_CONFIG = {"resources": {"extraction": {"config": {"weights": "random"}}}}

demo_job = dg.define_asset_job(
    name="demo",
    selection=EXTRACTION_ASSETS,
    config=DEMO_CONFIG,
    description="The extraction with random weights (offline: nothing is downloaded) over the images folder "
    "(the bundled data/samples unless `images_dir` or $SSL_ATTENTION_IMAGES says otherwise): pick a model "
    "partition and launch. Maps of random weights show the machinery, not a model's behaviour.",
)

# The checks of one model's maps, re-read from the warehouse: nothing is extracted (the Checks tab does the same).
check_maps_job = dg.define_asset_job(
    name="check_attention_maps",
    selection=dg.AssetSelection.checks_for_assets("attention_maps"),
    description="Re-run the checks of one (model, shard) attention_maps partition on the files as they are now.",
)

# Per model, not per shard: the ranking aggregates every image (the automation sensor also runs it).
rank_heads_job = dg.define_asset_job(
    name="rank_heads",
    selection=dg.AssetSelection.assets("head_ranking"),
    description="Rebuild one model's head ranking from the alignment rows of all its image shards.",
)
