"""Arrow schemas of the warehouse tables (documented column by column in docs/warehouse.md).

Partition columns (``model``, ``method``, ``source``) live in the directory names, not in the files.
"""

from __future__ import annotations

import pyarrow as pa

TIMESTAMP = pa.timestamp("us", tz="UTC")

PROVENANCE_FIELDS = [
    pa.field("weights_mode", pa.string(), nullable=False),  # pretrained | local | random
    pa.field("weights_source", pa.string(), nullable=False),  # hub id, checkpoint dir, or the hub id mimicked
    pa.field("weights_revision", pa.string()),  # hub commit, when known
    pa.field("weights_seed", pa.int32()),  # random mode only
    pa.field("weights_id", pa.string(), nullable=False),  # identity used for incremental runs
]

ATTENTION_MAPS = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("layer_name", pa.string()),
        pa.field("head", pa.int16()),  # NULL = the fused map (mean over heads, or a fused-only method)
        pa.field("grid_h", pa.int16(), nullable=False),
        pa.field("grid_w", pa.int16(), nullable=False),
        pa.field("map_values", pa.list_(pa.float32()), nullable=False),  # grid_h * grid_w, row-major
        pa.field("prefix_mass", pa.float32(), nullable=False),  # mass on CLS + register tokens
        pa.field("register_mass", pa.float32(), nullable=False),  # mass on register tokens alone
        pa.field("raw_scale", pa.float32()),  # Grad-CAM: sum of the raw cam (raw = map * raw_scale)
        pa.field("target_class", pa.int32()),  # Grad-CAM: top-1 class explained
        pa.field("num_heads", pa.int16(), nullable=False),  # heads of the model (0 for a CNN)
        pa.field("num_layers", pa.int16(), nullable=False),
        *PROVENANCE_FIELDS,
        pa.field("extracted_at", TIMESTAMP, nullable=False),
    ]
)

INPUTS = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("input_h", pa.int16(), nullable=False),
        pa.field("input_w", pa.int16(), nullable=False),
        pa.field("jpeg", pa.binary(), nullable=False),  # the preprocessed input, de-normalised, as JPEG
        pa.field("weights_id", pa.string(), nullable=False),
        # the geometry of the preprocessing (alignment.geometry.InputTransform): a point x of the original
        # image (after EXIF orientation) lands at x * scale_x - crop_left in the input; NULL in older files
        pa.field("scale_x", pa.float64()),
        pa.field("scale_y", pa.float64()),
        pa.field("crop_left", pa.int32()),
        pa.field("crop_top", pa.int32()),
    ]
)

MODELS = pa.schema(
    [
        pa.field("label", pa.string(), nullable=False),
        pa.field("family", pa.string(), nullable=False),  # vit | cnn
        pa.field("num_layers", pa.int16(), nullable=False),
        pa.field("num_heads", pa.int16(), nullable=False),  # 0 for the CNN
        pa.field("num_registers", pa.int16(), nullable=False),
        pa.field("has_cls", pa.bool_(), nullable=False),
        pa.field("patch_size", pa.int16()),  # NULL for the CNN
        pa.field("input_h", pa.int16(), nullable=False),
        pa.field("input_w", pa.int16(), nullable=False),
        pa.field("methods", pa.list_(pa.string()), nullable=False),
        pa.field("per_head_methods", pa.list_(pa.string()), nullable=False),
        pa.field("layer_names", pa.list_(pa.string()), nullable=False),
        *PROVENANCE_FIELDS,
        pa.field("extracted_at", TIMESTAMP, nullable=False),
    ]
)

IMAGES = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),  # first 128 bits of SHA-256 of the file bytes, hex
        pa.field("file_name", pa.string(), nullable=False),  # relative to the images folder
        pa.field("width", pa.int32(), nullable=False),  # after EXIF orientation
        pa.field("height", pa.int32(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),  # PIL mode before conversion to RGB
        pa.field("num_bytes", pa.int64(), nullable=False),
        pa.field("mtime_ns", pa.int64()),  # file modification time when catalogued (skip re-reading)
        pa.field("duplicate_files", pa.list_(pa.string())),  # other files with identical content
        pa.field("thumbnail", pa.binary()),  # JPEG, longest side 128 px
        pa.field("catalogued_at", TIMESTAMP, nullable=False),
    ]
)

ERRORS = pa.schema(
    [
        pa.field("file_name", pa.string(), nullable=False),
        pa.field("image_id", pa.string()),  # known when the file was readable
        pa.field("reason", pa.string(), nullable=False),
        pa.field("recorded_at", TIMESTAMP, nullable=False),
    ]
)

HEAD_STATS = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("layer_name", pa.string()),
        pa.field("head", pa.int16()),  # NULL = the fused map
        pa.field("grid_h", pa.int16(), nullable=False),
        pa.field("grid_w", pa.int16(), nullable=False),
        pa.field("num_cells", pa.int32(), nullable=False),  # N = grid_h * grid_w
        pa.field("input_h", pa.int16(), nullable=False),  # the model's input size, for the pixel geometry
        pa.field("input_w", pa.int16(), nullable=False),
        # formulas: docs/sql.md; NULL where undefined (a map with no mass, a constant map for Pearson)
        pa.field("total_mass", pa.float64()),  # sum of the stored map values
        pa.field("entropy", pa.float64()),  # -sum p log p, natural log, p = map / sum(map)
        pa.field("entropy_norm", pa.float64()),  # entropy / log N
        pa.field("mean_dist_px", pa.float64()),  # mass-weighted mean distance from the centre of mass
        pa.field("mean_dist_frac", pa.float64()),  # mean_dist_px / input diagonal
        pa.field("centroid_x_px", pa.float64()),  # centre of mass, input pixels from the left edge
        pa.field("centroid_y_px", pa.float64()),  # ... from the top edge
        pa.field("top1_mass", pa.float64()),  # max p
        pa.field("top1pct_mass", pa.float64()),  # sum of the ceil(N/100) largest p
        pa.field("area60_frac", pa.float64()),  # fewest cells holding 60% of the mass, / N
        pa.field("prefix_mass", pa.float64()),  # copied from the map row
        pa.field("register_mass", pa.float64()),
        pa.field("pearson_fused", pa.float64()),  # correlation with the fused map of the same image and layer
        pa.field("jsd_fused", pa.float64()),  # Jensen-Shannon divergence from it, natural log
        pa.field("weights_mode", pa.string(), nullable=False),
        pa.field("weights_id", pa.string(), nullable=False),
        pa.field("computed_at", TIMESTAMP, nullable=False),
    ]
)

ANNOTATIONS = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("file_name", pa.string(), nullable=False),  # the catalogue's name, relative to the images folder
        pa.field("region_id", pa.int32(), nullable=False),  # position among the image's entries in the file
        pa.field("feature", pa.string(), nullable=False),
        pa.field("feature_id", pa.int32(), nullable=False),  # COCO category id or WikiChurches meta index
        pa.field("parent_features", pa.list_(pa.string()), nullable=False),  # every ancestor, nearest first
        pa.field("x0", pa.float64(), nullable=False),  # original-image pixels after EXIF orientation
        pa.field("y0", pa.float64(), nullable=False),
        pa.field("x1", pa.float64(), nullable=False),
        pa.field("y1", pa.float64(), nullable=False),
        pa.field("polygon", pa.list_(pa.list_(pa.float64()))),  # COCO polygons [x1, y1, x2, y2, ...], same pixels
        pa.field("source_file", pa.string(), nullable=False),  # the annotation file's name
        pa.field("source_hash", pa.string(), nullable=False),  # SHA-256 of its bytes
        pa.field("format", pa.string(), nullable=False),  # coco | wikichurches
        pa.field("loaded_at", TIMESTAMP, nullable=False),
    ]
)

ALIGNMENT = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("head", pa.int16()),  # NULL = the fused map (and the baselines)
        pa.field("map_kind", pa.string(), nullable=False),  # map | uniform | centre_gaussian
        pa.field("feature", pa.string(), nullable=False),  # "all" = the union of every region of the image
        pa.field("grid_h", pa.int16(), nullable=False),
        pa.field("grid_w", pa.int16(), nullable=False),
        pa.field("num_regions", pa.int32(), nullable=False),
        # the metrics (formulas: docs/sql.md); NULL when every region lies outside the model's view
        pa.field("iou_50", pa.float64()),
        pa.field("iou_75", pa.float64()),
        pa.field("iou_90", pa.float64()),
        pa.field("iou_95", pa.float64()),
        pa.field("coverage", pa.float64()),
        pa.field("pointing_hit", pa.bool_()),
        pa.field("kl", pa.float64()),
        pa.field("mse", pa.float64()),
        pa.field("area_fraction", pa.float64(), nullable=False),  # union area in the view / view area
        pa.field("visible_fraction", pa.float64(), nullable=False),  # union in the view / union before the crop
        pa.field("weights_id", pa.string(), nullable=False),  # of the maps scored
        pa.field("maps_extracted_at", TIMESTAMP, nullable=False),  # of the image's maps: a re-extraction rescores
        pa.field("targets_hash", pa.string(), nullable=False),  # the image's regions and transform
        pa.field("annotations_hash", pa.string(), nullable=False),  # the annotation file's SHA-256
        pa.field("computed_at", TIMESTAMP, nullable=False),
    ]
)

HEAD_RANKING = pa.schema(
    [
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("feature", pa.string(), nullable=False),
        pa.field("map_kind", pa.string(), nullable=False),
        pa.field("head", pa.int16()),  # NULL for the fused map and the baselines
        pa.field("entry", pa.string(), nullable=False),  # "head 3" | "fused" | "uniform" | "centre_gaussian"
        pa.field("n_images", pa.int32(), nullable=False),  # images with a score
        pa.field("mean", pa.float64()),
        pa.field("median", pa.float64()),
        pa.field("ci_low", pa.float64()),  # seeded percentile bootstrap of the mean, 95 %
        pa.field("ci_high", pa.float64()),
        pa.field("higher_is_better", pa.bool_(), nullable=False),  # false for kl and mse
        pa.field("rank", pa.int32()),  # 1 = best mean among every entry of (layer, metric, feature)
        pa.field("head_rank", pa.int32()),  # the same among the heads only (NULL for the others)
        pa.field("computed_at", TIMESTAMP, nullable=False),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "attention_maps": ATTENTION_MAPS,
    "head_stats": HEAD_STATS,
    "inputs": INPUTS,
    "models": MODELS,
    "images": IMAGES,
    "errors": ERRORS,
    "annotations": ANNOTATIONS,
    "alignment": ALIGNMENT,
    "head_ranking": HEAD_RANKING,
}
