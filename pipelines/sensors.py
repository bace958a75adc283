"""Watch the images folder and extract new images (off by default: turn it on in the UI)."""

import hashlib
import json

import dagster as dg

from pipelines.jobs import extraction_job
from pipelines.partitions import SHARDS, partition_key
from pipelines.resources import ExtractionSettings
from ssl_attention.images import SUPPORTED_EXTENSIONS, iter_candidate_files
from ssl_attention.registry import MODELS
from ssl_attention.settings import sensor_interval_s
from ssl_attention.warehouse.paths import WarehouseLocationError, partition_file
from ssl_attention.warehouse.shards import shard_names


def folder_fingerprint(settings: ExtractionSettings) -> tuple[str, int]:
    """Digest of (name, size, mtime) of the image files, and how many there are; cheap, no decoding."""
    folder = settings.images_path()
    digest = hashlib.sha256()
    count = 0
    if folder.is_dir():
        for path in iter_candidate_files(folder):
            if path.is_file() and path.name.lower().endswith(SUPPORTED_EXTENSIONS):
                stat = path.stat()
                digest.update(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
                count += 1
    return digest.hexdigest()[:20], count


def annotations_fingerprint(settings: ExtractionSettings) -> str:
    """Digest of the annotation file's bytes ("" when none is set or it is missing): a new or edited file
    triggers runs even when the images did not change."""
    try:
        path = settings.annotations_path()
    except WarehouseLocationError:
        return ""
    if path is None or not path.is_file():
        return ""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:20]


def sensor_models(settings: ExtractionSettings) -> list[str]:
    """The models the warehouse already holds (their maps are kept up to date); all six for a new warehouse."""
    warehouse = settings.warehouse_path()
    present = [slug for slug in MODELS if partition_file(warehouse, "models", model=slug).is_file()]
    return present or list(MODELS)


@dg.sensor(
    job=extraction_job,
    minimum_interval_seconds=sensor_interval_s(),
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="When image files in the images folder (or the annotation file, if set) change, run the "
    "extraction for each model the warehouse already holds (all six for an empty warehouse), one run per image "
    "shard; only images not yet extracted with the same weights are computed, and only changed maps or "
    "annotations are rescored. A failed run is not retried until the folder or the file changes again.",
)
def new_images_sensor(context: dg.SensorEvaluationContext, extraction: ExtractionSettings) -> dg.SensorResult:
    try:
        fingerprint, count = folder_fingerprint(extraction)
        models = sensor_models(extraction)
    except WarehouseLocationError as exc:
        return dg.SensorResult(skip_reason=str(exc))
    labels = annotations_fingerprint(extraction)
    previous = json.loads(context.cursor) if context.cursor else {}
    if previous.get("fingerprint") == fingerprint and previous.get("annotations", "") == labels:
        return dg.SensorResult(skip_reason=f"no change in {count} image files or the annotation file")
    key = f"{fingerprint}:{labels}" if labels else fingerprint
    runs = [  # one run per (model, shard); each computes only its shard's new images
        dg.RunRequest(
            run_key=f"{key}:{model}:{shard}",
            partition_key=partition_key(model, shard),
            tags={"trigger": "new_images_sensor"},
        )
        for model in models
        for shard in shard_names(SHARDS)
    ]
    cursor = {"fingerprint": fingerprint, "files": count, "annotations": labels}
    return dg.SensorResult(run_requests=runs, cursor=json.dumps(cursor))
