"""The extraction itself: images folder -> catalog; (model, images) -> warehouse partitions.

One forward pass per batch gives every method's maps for that model (Grad-CAM: one forward, one
backward). A batch holds images of one input size, as many as a token budget allows (``plan_batches``: the
attention of T tokens takes T² memory), so peak memory does not grow with the number of images; only one
batch's attentions are alive at a time; rows are streamed into each partition's
replacement file and swapped in atomically at the end, so a failed or killed run leaves the previous
data whole. Images already extracted with the same weights are carried over, not recomputed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

from ssl_attention.alignment.geometry import InputTransform, observed_transform
from ssl_attention.images import (
    DEFAULT_MAX_PIXELS,
    Catalog,
    ImageIssue,
    ImageLoadError,
    ImageRecord,
    load_image,
    scan_images,
)
from ssl_attention.methods.blocks import MapBlock
from ssl_attention.models.adapters import ModelAdapter
from ssl_attention.models.preprocessing import Size
from ssl_attention.warehouse import schema
from ssl_attention.warehouse.atomic import PartitionWriter, write_table_atomic
from ssl_attention.warehouse.paths import DATA_FILE, iter_partitions, partition_dir, partition_file
from ssl_attention.warehouse.shards import DEFAULT_SHARDS, ensure_shards, shard_names, shard_of
from ssl_attention.warehouse.tables import (
    catalog_table,
    copy_rows_except,
    errors_table,
    image_ids_by_weights,
    input_rows,
    map_rows,
    now_utc,
    provenance_columns,
)

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8  # images per batch at most
# Σ T² over a batch at most (T tokens per image): one layer's attention per head, in elements. 2**22 is about
# 2.4 GB of attention weights for a 12-layer, 12-head ViT in float32; an image above it runs alone.
DEFAULT_TOKEN_BUDGET = 2**22


# --- the images catalog ---------------------------------------------------------------------------------


@dataclass
class CatalogReport:
    catalog: Catalog
    images_path: Path
    errors_path: Path
    rows_total: int  # images in the merged catalog (this folder and earlier runs)


def catalog_images(folder: Path, warehouse: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> CatalogReport:
    """Scan ``folder`` and write the ``images`` table (merged with earlier catalogues) and the catalog's
    ``errors`` partition (replaced: it describes this folder as it is now)."""
    images_dir = partition_dir(warehouse, "images")
    old_path = images_dir / DATA_FILE
    old = _read_images_table(old_path) if old_path.is_file() else None
    known = _known_files(old, Path(folder)) if old is not None else None
    catalog = scan_images(folder, max_pixels=max_pixels, known=known)
    stamp = now_utc()
    new = catalog_table(catalog, stamp)
    if old is not None:
        # Replace rows of re-catalogued images and of files whose content (hence id) has changed, including
        # a file that became a copy of another one (it is then listed only in its twin's duplicate_files).
        # A file that is missing or unusable now keeps its row, like a file of another folder.
        scanned = [*new["file_name"].to_pylist(), *(name for names in catalog.duplicates.values() for name in names)]
        stale = pc.or_(
            pc.is_in(old["image_id"], value_set=new["image_id"]),
            pc.is_in(old["file_name"], value_set=pa.array(scanned, pa.string())),
        )
        keep = pc.invert(stale)
        merged = pa.concat_tables([old.filter(keep), new])
    else:
        merged = new
    images_stats = write_table_atomic(images_dir, merged, schema.IMAGES)
    errors_stats = write_table_atomic(
        partition_dir(warehouse, "errors", source="catalog"), errors_table(catalog.issues, stamp), schema.ERRORS
    )
    return CatalogReport(
        catalog=catalog, images_path=images_stats.path, errors_path=errors_stats.path, rows_total=merged.num_rows
    )


def _read_images_table(path: Path) -> pa.Table:
    """The catalog table in the current schema (columns added since it was written come back as NULL)."""
    table = pq.read_table(path)
    for column in schema.IMAGES:
        if column.name not in table.column_names:
            table = table.append_column(column.name, pa.nulls(table.num_rows, column.type))
    return table.select(schema.IMAGES.names).cast(schema.IMAGES)


def _known_files(table: pa.Table, folder: Path) -> dict[str, tuple[ImageRecord, bytes | None]]:
    """file name -> (earlier record, thumbnail), for rows that recorded a modification time."""
    known = {}
    fields = ("image_id", "file_name", "width", "height", "format", "mode", "num_bytes", "mtime_ns")
    for row in table.select([*fields, "thumbnail"]).to_pylist():
        if row["mtime_ns"]:
            thumbnail = row.pop("thumbnail")
            known[row["file_name"]] = (ImageRecord(path=folder / row["file_name"], **row), thumbnail)
    return known


def read_errors(warehouse: Path) -> list[dict[str, str]]:
    """Every recorded skip: source (``catalog`` or a model), file name and reason."""
    rows = []
    for partition in iter_partitions(warehouse, "errors"):
        for row in pq.read_table(partition.path, columns=["file_name", "reason"]).to_pylist():
            rows.append({**partition.keys, **row})
    return rows


def read_catalog_records(warehouse: Path, folder: Path | None = None) -> list[ImageRecord]:
    """Image records of the catalog table, resolved against ``folder`` (files since removed are skipped)."""
    path = partition_file(warehouse, "images")
    if not path.is_file():
        return []
    table = (
        _read_images_table(path)
        .select(["image_id", "file_name", "width", "height", "format", "mode", "num_bytes", "mtime_ns"])
        .to_pylist()
    )
    records = []
    for row in table:
        file_path = (folder / row["file_name"]) if folder is not None else Path(row["file_name"])
        if folder is not None and not file_path.exists():
            continue
        records.append(ImageRecord(path=file_path.resolve(), **{**row, "mtime_ns": row["mtime_ns"] or 0}))
    return records


# --- one model ------------------------------------------------------------------------------------------


@dataclass
class ModelRunReport:
    model: str
    weights: str  # provenance, human-readable
    weights_id: str
    is_random: bool
    images_requested: int = 0
    images_extracted: int = 0
    images_up_to_date: int = 0
    issues: list[ImageIssue] = field(default_factory=list)
    rows_written: dict[str, int] = field(default_factory=dict)  # per partition, rows in the new file
    bytes_written: dict[str, int] = field(default_factory=dict)
    rows_extracted: int = 0  # rows computed in this run
    seconds: float = 0.0
    forward_seconds: float = 0.0
    weights_changed: bool = False
    preview: dict[str, np.ndarray] | None = None  # a sample image's maps, for previews
    preview_image_id: str | None = None
    preview_input: np.ndarray | None = None  # (H, W, 3) uint8, what the model saw

    @property
    def images_per_second(self) -> float:
        return self.images_extracted / self.seconds if self.seconds > 0 else 0.0


def model_partitions(warehouse: Path, adapter: ModelAdapter, shard: str = "0") -> dict[str, Path]:
    """Partition directories written for one model's shard: one per method, and its inputs."""
    slug = adapter.spec.slug
    dirs = {
        m: partition_dir(warehouse, "attention_maps", model=slug, method=m, shard=shard) for m in adapter.spec.methods
    }
    dirs["inputs"] = partition_dir(warehouse, "inputs", model=slug, shard=shard)
    return dirs


class WeightsDowngradeError(RuntimeError):
    """`auto` fell back to random weights, but the warehouse holds maps from real weights."""


@dataclass
class WorkPlan:
    todo: list[ImageRecord]  # images to compute now
    weights_changed: bool  # old rows were made with other weights: they all go
    existing: dict[str, set[str]]  # partition name -> image ids it holds now
    existing_weights: set[str]  # weights ids found in the partitions


def plan_work(
    records: Sequence[ImageRecord], partitions: dict[str, Path], weights_id: str, recompute: bool
) -> WorkPlan:
    states = {name: image_ids_by_weights(d / DATA_FILE) for name, d in partitions.items()}
    existing = {name: set().union(*state.values()) for name, state in states.items()}
    weights = set().union(*(set(state) for state in states.values()))
    other_weights = bool(weights - {weights_id})
    if recompute or other_weights:
        return WorkPlan(list(records), other_weights, existing, weights)
    done = set.intersection(*(state.get(weights_id, set()) for state in states.values())) if states else set()
    return WorkPlan([r for r in records if r.image_id not in done], False, existing, weights)


def catalogued_ids(warehouse: Path) -> set[str] | None:
    """Image ids of the catalog table, or None when there is no catalog (library use without one)."""
    path = partition_file(warehouse, "images")
    if not path.is_file():
        return None
    return set(pq.read_table(path, columns=["image_id"])["image_id"].to_pylist())


def plan_batches(
    adapter: ModelAdapter,
    records: Sequence[ImageRecord],
    batch_size: int = DEFAULT_BATCH_SIZE,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
) -> list[list[ImageRecord]]:
    """Batches of images of one input size (``adapter.input_size`` of each image's catalogued size), each of at
    most ``batch_size`` images whose Σ T² stays within ``token_budget`` (T = ``adapter.sequence_length``); an
    image whose T² alone exceeds the budget makes a batch of its own. Sizes in order of first appearance."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if token_budget < 1:
        raise ValueError(f"token budget must be >= 1, got {token_budget}")
    by_size: dict[Size, list[ImageRecord]] = {}
    for record in records:
        by_size.setdefault(adapter.input_size(record.width, record.height), []).append(record)
    batches = []
    for size, group in by_size.items():
        cost = adapter.sequence_length(*size) ** 2
        per_batch = max(1, min(batch_size, token_budget // cost))
        batches.extend(group[start : start + per_batch] for start in range(0, len(group), per_batch))
    return batches


def stored_input_sizes(path: Path) -> dict[str, Size]:
    """image id -> (input_h, input_w) recorded in an ``inputs`` partition file (empty when there is none)."""
    if not path.is_file():
        return {}
    table = pq.read_table(path, columns=["image_id", "input_h", "input_w"]).to_pylist()
    return {row["image_id"]: (int(row["input_h"]), int(row["input_w"])) for row in table}


def _resized(
    adapter: ModelAdapter, records: Sequence[ImageRecord], todo: Sequence[ImageRecord], path: Path
) -> set[str]:
    """Ids of up-to-date images whose stored input size is not the one asked for now (another resolution)."""
    stored = stored_input_sizes(path)
    planned = {r.image_id for r in todo}
    return {
        r.image_id
        for r in records
        if r.image_id not in planned
        and r.image_id in stored
        and stored[r.image_id] != adapter.input_size(r.width, r.height)
    }


def extract_model(
    adapter: ModelAdapter,
    records: Sequence[ImageRecord],
    warehouse: Path,
    batch_size: int = DEFAULT_BATCH_SIZE,
    recompute: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable[[int], None] | None = None,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    shards: int = DEFAULT_SHARDS,
    shard: str | None = None,
) -> ModelRunReport:
    """Extract every method's maps of ``adapter`` for ``records`` into the warehouse, at the adapter's resolution
    (images stored at another input size are recomputed), in batches planned by ``plan_batches``.

    The warehouse is laid out in ``shards`` image shards (recorded on first write, refused if it records another
    count); ``shard`` extracts that shard's images only (one (model, shard) step of a backfill), None every
    shard in turn. Each shard's partition files are written and swapped in on their own."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if token_budget < 1:
        raise ValueError(f"token budget must be >= 1, got {token_budget}")
    ensure_shards(warehouse, shards)
    names = shard_names(shards)
    if shard is not None and shard not in names:
        raise ValueError(f"shard {shard!r} is not one of the warehouse's {shards} shards ({', '.join(names[:8])} ...)")
    unique = list({r.image_id: r for r in records}.values())  # one entry per content id
    by_shard: dict[str, list[ImageRecord]] = {name: [] for name in names}
    for record in unique:
        by_shard[shard_of(record.image_id, shards)].append(record)
    reports = [
        _extract_shard(
            adapter, by_shard[name], warehouse, name, shards, batch_size, recompute, max_pixels, progress, token_budget
        )
        for name in ([shard] if shard is not None else names)
    ]
    report = reports[0] if len(reports) == 1 else _merge_reports(reports)
    report.images_requested = len(records) if shard is None else len(by_shard[shard])
    return report


def _merge_reports(reports: list[ModelRunReport]) -> ModelRunReport:
    """One model's report over its shards: counts summed, per-partition rows and bytes summed by name."""
    first = reports[0]
    merged = dataclasses.replace(first, issues=[], rows_written={}, bytes_written={})
    for field_name in ("images_extracted", "images_up_to_date", "rows_extracted", "seconds", "forward_seconds"):
        setattr(merged, field_name, sum(getattr(r, field_name) for r in reports))
    for report in reports:
        merged.issues.extend(report.issues)
        for name, rows in report.rows_written.items():
            merged.rows_written[name] = merged.rows_written.get(name, 0) + rows
            merged.bytes_written[name] = merged.bytes_written.get(name, 0) + report.bytes_written.get(name, 0)
        merged.weights_changed = merged.weights_changed or report.weights_changed
        if merged.preview is None and report.preview is not None:
            merged.preview, merged.preview_image_id = report.preview, report.preview_image_id
            merged.preview_input = report.preview_input
    return merged


def _extract_shard(
    adapter: ModelAdapter,
    records: list[ImageRecord],
    warehouse: Path,
    shard: str,
    shards: int,
    batch_size: int,
    recompute: bool,
    max_pixels: int,
    progress: Callable[[int], None] | None,
    token_budget: int,
) -> ModelRunReport:
    """``extract_model`` for the images of one shard (``records``, unique ids, all of that shard)."""
    spec, provenance = adapter.spec, adapter.provenance
    start = time.perf_counter()
    report = ModelRunReport(
        model=spec.slug,
        weights=provenance.describe(),
        weights_id=provenance.weights_id,
        is_random=provenance.is_random,
        images_requested=len(records),
    )
    partitions = model_partitions(warehouse, adapter, shard)
    if not records and not any((d / DATA_FILE).is_file() for d in partitions.values()):
        log.info("%s: no images to extract", spec.slug)
        report.seconds = time.perf_counter() - start
        return report
    plan = plan_work(records, partitions, provenance.weights_id, recompute)
    todo, weights_changed = plan.todo, plan.weights_changed
    if not weights_changed:  # another resolution than the stored one: those images are computed again
        resized = _resized(adapter, records, todo, partitions["inputs"] / DATA_FILE)
        if resized:
            log.info("%s: %d images are stored at another input size; recomputed", spec.slug, len(resized))
            wanted = {r.image_id for r in todo} | resized
            todo = [r for r in records if r.image_id in wanted]
    if provenance.fallback and weights_changed:
        real = sorted(w for w in plan.existing_weights if not w.startswith("random:"))
        if real:
            raise WeightsDowngradeError(
                f"{spec.slug}: pretrained weights could not be obtained and --weights auto fell back to random "
                f"ones, but the warehouse holds maps from {real[0]}; they are kept. Restore access to the "
                "weights (network, login, --checkpoint), or pass --weights random to replace them on purpose."
            )
    # Rows of images the catalog no longer knows (a file whose content changed) are dropped, not carried.
    catalog = catalogued_ids(warehouse)
    superseded = {name: ids - catalog for name, ids in plan.existing.items()} if catalog is not None else {}
    report.weights_changed = weights_changed
    report.images_up_to_date = len(records) - len(todo)
    if weights_changed:
        log.warning(
            "%s: the warehouse holds maps from other weights; its partitions are rebuilt with %s",
            spec.slug,
            provenance.describe(),
        )
    stale = any(superseded.values())
    if not todo and not stale and partition_file(warehouse, "models", model=spec.slug).is_file():
        log.info("%s: all %d images are up to date", spec.slug, len(records))
        report.seconds = time.perf_counter() - start
        return report

    # clustered by image: sorted, ~1 MiB row groups, so a query for one image reads one row group
    writers = {name: PartitionWriter(d, _schema_for(name), cluster_by="image_id") for name, d in partitions.items()}
    input_sizes: Counter[Size] = Counter()  # images per input size in this run
    try:
        recompute_ids = {r.image_id for r in todo}
        for name, directory in partitions.items():
            drop = recompute_ids | superseded.get(name, set())
            if not weights_changed and plan.existing[name] - drop:  # keep what is still valid, streamed
                copy_rows_except(directory / DATA_FILE, drop, writers[name].write)
        # Rows are converted and written by one background thread while the next batch runs forward;
        # at most one batch waits to be written, so memory stays at two batches whatever the image count.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ssl-attention-writer") as pool:
            pending: Future[None] | None = None
            for batch in plan_batches(adapter, todo, batch_size, token_budget):
                images, decoded = _load_batch(spec.slug, batch, max_pixels, report)
                for pixel_values, loaded in _preprocess(adapter, images, decoded, report):
                    forward_start = time.perf_counter()
                    blocks = _to_cpu(adapter.run(pixel_values))  # the one forward (Grad-CAM: + backward) pass
                    report.forward_seconds += time.perf_counter() - forward_start
                    input_sizes[(int(pixel_values.shape[-2]), int(pixel_values.shape[-1]))] += len(loaded)
                    display = adapter.display_images(pixel_values)
                    ids = [r.image_id for r in loaded]
                    if report.preview is None:
                        report.preview, report.preview_image_id = _preview(blocks), ids[0]
                        report.preview_input = display[0]
                    if pending is not None:
                        pending.result()
                    transforms = [
                        observed_transform(adapter.preprocess, r.width, r.height, *display.shape[1:3]) for r in loaded
                    ]
                    pending = pool.submit(_write_batch, adapter, blocks, ids, display, transforms, writers, report)
                    report.images_extracted += len(loaded)
                    del pixel_values
                if progress is not None:
                    progress(len(batch))
            if pending is not None:
                pending.result()
        for name, writer in writers.items():
            stats = writer.commit()
            report.rows_written[name] = stats.rows
            report.bytes_written[name] = stats.bytes
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    if input_sizes:  # the models table keeps the most common size; each image's own is in `inputs`
        _write_model_row(adapter, warehouse, input_sizes.most_common(1)[0][0])
    write_model_errors(warehouse, spec.slug, shard, shards, report.issues)
    report.seconds = time.perf_counter() - start
    return report


def write_model_errors(warehouse: Path, model: str, shard: str, shards: int, issues: Sequence[ImageIssue]) -> None:
    """Replace one shard's rows of ``errors/source=<model>`` with ``issues``, keeping the other shards' rows.

    The shards of a model may finish at the same time (a backfill): the read-merge-replace holds an exclusive
    lock on a file beside the partition, so no shard's rows are lost. Rows without an image id (written before
    ids were recorded) belong to no shard and are dropped.
    """
    directory = partition_dir(warehouse, "errors", source=model)
    directory.mkdir(parents=True, exist_ok=True)
    # one shard: the partition is this shard's alone (no lock file); more: the lock is a hidden file beside it
    with open(directory / ".lock", "a") if shards > 1 else contextlib.nullcontext() as lock:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        keep = schema.ERRORS.empty_table()
        old = directory / DATA_FILE
        if shards > 1 and old.is_file():
            table = pq.read_table(old)
            ids = table["image_id"].to_pylist()
            others = [i is not None and shard_of(i, shards) != shard for i in ids]
            keep = table.filter(pa.array(others, pa.bool_())).select(schema.ERRORS.names).cast(schema.ERRORS)
        new = errors_table(issues, now_utc(), [issue.image_id for issue in issues])
        write_table_atomic(directory, pa.concat_tables([keep, new]), schema.ERRORS)


def _schema_for(name: str) -> pa.Schema:
    return schema.INPUTS if name == "inputs" else schema.ATTENTION_MAPS


def _load_batch(
    slug: str, batch: list[ImageRecord], max_pixels: int, report: ModelRunReport
) -> tuple[list[Image.Image], list[ImageRecord]]:
    """Decode a batch; a file that cannot be used is recorded in the report and left out."""
    images, loaded = [], []
    for record in batch:
        try:
            image, image_id = load_image(record.path, max_pixels)
        except ImageLoadError as exc:
            report.issues.append(ImageIssue(record.file_name, str(exc), record.image_id))
            log.warning("%s: skipping %s: %s", slug, record.file_name, exc)
            continue
        if image_id != record.image_id:  # the catalog is the run's source of truth
            reason = "file changed since it was catalogued; materialize `images` again to include it"
            report.issues.append(ImageIssue(record.file_name, reason, record.image_id))
            log.warning("%s: skipping %s: %s", slug, record.file_name, reason)
            continue
        images.append(image)
        loaded.append(record)
    return images, loaded


def _preprocess(
    adapter: ModelAdapter, images: list[Image.Image], loaded: list[ImageRecord], report: ModelRunReport
) -> list[tuple[torch.Tensor, list[ImageRecord]]]:
    """The batch's pixel values, one tensor per input size (a single one when the planned sizes hold). If the
    batch fails as a whole, images are preprocessed one by one: those that fail are recorded and skipped,
    the others grouped by the size they came out at."""
    if not images:
        return []
    try:
        return [(adapter.pixel_values(images), loaded)]
    except Exception:
        groups: dict[tuple[int, ...], tuple[list[torch.Tensor], list[ImageRecord]]] = {}
        for image, record in zip(images, loaded, strict=True):
            try:
                pixels = adapter.pixel_values([image])
            except Exception as exc:
                report.issues.append(ImageIssue(record.file_name, f"preprocessing failed: {exc}", record.image_id))
                continue
            tensors, records = groups.setdefault(tuple(pixels.shape[1:]), ([], []))
            tensors.append(pixels)
            records.append(record)
        return [(torch.cat(tensors), records) for tensors, records in groups.values()]


def _to_cpu(blocks: dict[str, list[MapBlock]]) -> dict[str, list[MapBlock]]:
    """Map blocks with every tensor on the CPU as float32 (one transfer per tensor, not per image)."""

    def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.detach().float().cpu()

    return {
        method: [
            dataclasses.replace(
                block,
                values=move(block.values),
                prefix_mass=move(block.prefix_mass),
                register_mass=move(block.register_mass),
                raw_scale=move(block.raw_scale),
                target_class=None if block.target_class is None else block.target_class.detach().cpu(),
            )
            for block in method_blocks
        ]
        for method, method_blocks in blocks.items()
    }


def _write_batch(
    adapter: ModelAdapter,
    blocks: dict[str, list[MapBlock]],
    ids: list[str],
    display: np.ndarray,
    transforms: list[InputTransform],
    writers: dict[str, PartitionWriter],
    report: ModelRunReport,
) -> None:
    stamp = now_utc()
    for method, method_blocks in blocks.items():
        for index, image_id in enumerate(ids):
            table = map_rows(
                method_blocks,
                index,
                image_id,
                num_heads=adapter.num_heads,
                num_layers=adapter.num_layers,
                provenance=adapter.provenance,
                extracted_at=stamp,
            )
            writers[method].write(table)  # one image per call; the writer clusters by image_id on commit
            report.rows_extracted += table.num_rows
    writers["inputs"].write(input_rows(ids, display, adapter.provenance.weights_id, transforms))


def _preview(blocks: dict[str, list[MapBlock]]) -> dict[str, np.ndarray]:
    """The first image's maps at the last layer of each method: (K, grid_h, grid_w), fused first."""
    preview = {}
    for method, method_blocks in blocks.items():
        block = method_blocks[-1]
        values = block.values[0, -1].numpy()  # (K, N)
        preview[method] = values.reshape(values.shape[0], block.grid_h, block.grid_w)
    return preview


def _write_model_row(adapter: ModelAdapter, warehouse: Path, input_size: tuple[int, int]) -> None:
    spec, provenance = adapter.spec, adapter.provenance
    row = {
        "label": pa.array([spec.label]),
        "family": pa.array([spec.family]),
        "num_layers": pa.array([adapter.num_layers], pa.int16()),
        "num_heads": pa.array([adapter.num_heads], pa.int16()),
        "num_registers": pa.array([adapter.num_registers], pa.int16()),
        "has_cls": pa.array([spec.has_cls]),
        "patch_size": pa.array([adapter.patch_size], pa.int16()),
        "input_h": pa.array([input_size[0]], pa.int16()),
        "input_w": pa.array([input_size[1]], pa.int16()),
        "methods": pa.array([list(spec.methods)], pa.list_(pa.string())),
        "per_head_methods": pa.array([list(spec.per_head_methods)], pa.list_(pa.string())),
        "layer_names": pa.array([adapter.layer_names], pa.list_(pa.string())),
        **provenance_columns(provenance, 1),
        "extracted_at": pa.array([now_utc()], schema.TIMESTAMP),
    }
    write_table_atomic(
        partition_dir(warehouse, "models", model=spec.slug), pa.table(row, schema=schema.MODELS), schema.MODELS
    )
