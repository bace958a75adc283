"""Settings of an extraction run, validated once, and the one place that reads the environment.

``Settings`` is the one pydantic model of a run. ``ssl-attention run`` builds it from its flags (which are
generated from its fields), the Dagster ``extraction`` resource (pipelines/resources.py) inherits
``ExtractionFields`` field for field (same types, defaults, descriptions and checks, so the launchpad
refuses ``weights: nonsense`` or ``batch_size: 0`` and shows ``weights`` as an enum), and the dashboard and
the SQL command resolve the warehouse with ``resolve_warehouse``.

Environment variables, read here and nowhere else:

==================================  ==========================================  ====================
variable                            what                                        when unset or empty
==================================  ==========================================  ====================
``SSL_ATTENTION_WAREHOUSE``         warehouse root (path or ``file://`` URL)    ``data/warehouse``
``SSL_ATTENTION_IMAGES``            images folder (path or ``file://`` URL)     ``data/samples``
``SSL_ATTENTION_POOL``              concurrency pool of extraction steps        ``gpu`` with CUDA, else none
``SSL_ATTENTION_SENSOR_INTERVAL``   seconds between ticks of the images sensor  60
``SSL_ATTENTION_SHARDS``            image shards (``shards`` when it is 0)       1
==================================  ==========================================  ====================

An empty ``images_dir`` / ``warehouse`` falls back to its variable when the location is resolved (at run
time, not when the settings are built), so a run started from the launchpad sees the environment of the
process that runs it.
"""

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from ssl_attention.extraction import DEFAULT_BATCH_SIZE
from ssl_attention.images import DEFAULT_MAX_PIXELS
from ssl_attention.models.resolution import DEFAULT_MAX_TOKENS, Resolution, parse_resolution
from ssl_attention.models.weights import DEFAULT_SEED, parse_checkpoints
from ssl_attention.registry import MODELS, UnknownNameError, parse_model_list
from ssl_attention.warehouse.paths import DEFAULT_WAREHOUSE, local_path
from ssl_attention.warehouse.shards import DEFAULT_SHARDS, MAX_SHARDS, check_shards, recorded_shards

WAREHOUSE_ENV = "SSL_ATTENTION_WAREHOUSE"
IMAGES_ENV = "SSL_ATTENTION_IMAGES"
POOL_ENV = "SSL_ATTENTION_POOL"
SENSOR_INTERVAL_ENV = "SSL_ATTENTION_SENSOR_INTERVAL"
SHARDS_ENV = "SSL_ATTENTION_SHARDS"
DEFAULT_IMAGES = Path("data") / "samples"
DEFAULT_SENSOR_INTERVAL_S = 60
ENV_FALLBACKS = {"images_dir": IMAGES_ENV, "warehouse": WAREHOUSE_ENV}  # field -> variable it falls back to

WeightsMode = Literal["auto", "pretrained", "random"]
WEIGHT_MODES: tuple[str, ...] = get_args(WeightsMode)
VALID_DEVICES = "auto, cpu, cuda, cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


# --- the checks, one per rule ---------------------------------------------------------------------------


def check_weights(mode: str) -> str:
    if mode not in WEIGHT_MODES:
        raise UnknownNameError(f"unknown weights mode {mode!r}; valid: {', '.join(WEIGHT_MODES)}")
    return mode


def check_device(device: str) -> str:
    if not _DEVICE.fullmatch(device):
        raise ValueError(f"unknown device {device!r}; valid devices: {VALID_DEVICES}")
    return device


def _check_checkpoints(items: list[str]) -> list[str]:
    parse_checkpoints(items, list(MODELS))  # MODEL=DIR, a known model, an existing directory
    return items


def _model_list(value: Any) -> Any:
    """``"all"``, ``"clip,mae"`` or a list of slugs -> the validated slugs in registry order."""
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        value = ",".join(value)
    return tuple(parse_model_list(value)) if isinstance(value, str) else value


def _check_resolution(text: str) -> str:
    parse_resolution(text, list(MODELS))  # default, N, or MODEL=VALUE,... with known models
    return text


def check_annotations_file(location: str) -> str:
    """Empty (no annotations), or an existing file (a path or a file:// URL)."""
    if location.strip() and not local_path(location, "annotation file").is_file():
        raise ValueError(f"annotation file {location!r} does not exist (give a COCO or WikiChurches JSON file)")
    return location


Device = Annotated[str, AfterValidator(check_device)]
ResolutionText = Annotated[str, AfterValidator(_check_resolution)]
Annotations = Annotated[str, AfterValidator(check_annotations_file)]
Checkpoints = Annotated[list[str], AfterValidator(_check_checkpoints)]
ModelList = Annotated[tuple[str, ...], BeforeValidator(_model_list)]


# --- the model ------------------------------------------------------------------------------------------


class ExtractionFields(BaseModel):
    """How each model's extraction runs: inherited as is by the Dagster resource (its launchpad config)."""

    images_dir: str = Field(
        default="",
        description=f"Folder of input images (searched recursively): a path or a file:// URL; empty: ${IMAGES_ENV},"
        f" else {DEFAULT_IMAGES}.",
    )
    warehouse: str = Field(
        default="",
        description=f"Warehouse root: a path or a file:// URL; empty: ${WAREHOUSE_ENV}, else {DEFAULT_WAREHOUSE}.",
    )
    weights: WeightsMode = Field(
        default="auto",
        description="auto (pretrained where obtainable, else random with a warning) | pretrained (fail fast if"
        " unobtainable) | random (the architecture with seeded random init).",
    )
    checkpoints: Checkpoints = Field(
        default_factory=list, description="Local checkpoints as MODEL=DIR; each overrides `weights` for its model."
    )
    seed: int = Field(default=DEFAULT_SEED, ge=0, description="Seed of random weights.")
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1, description="Images per forward pass.")
    device: Device = Field(default="auto", description=f"{VALID_DEVICES.replace(', ', ' | ')} (auto: CUDA if any).")
    max_pixels: int = Field(
        default=DEFAULT_MAX_PIXELS, ge=1, description="Images with more pixels are skipped (decompression bombs)."
    )
    recompute: bool = Field(default=False, description="Recompute images already extracted with these weights.")
    resolution: ResolutionText = Field(
        default="default",
        description="default (each processor's own size and crop) | N (shorter side N px, the other side following"
        " the aspect ratio, both multiples of the patch size, no crop) | MODEL=VALUE,... per model.",
    )
    max_tokens: int = Field(
        default=DEFAULT_MAX_TOKENS, ge=1, description="Patches per image at most: larger N requests are scaled down."
    )
    shards: int = Field(
        default=0,
        ge=0,
        le=MAX_SHARDS,
        description=f"Image shards per (model, method) partition: each image's rows live in shard "
        f"int(image_id[:8], 16) mod N, and a backfill runs one step per (model, shard); recorded in the warehouse "
        f"(layout.json), a run with another count is refused. 0: ${SHARDS_ENV}, else the recorded count, else "
        f"{DEFAULT_SHARDS}.",
    )
    annotations: Annotations = Field(
        default="",
        description="Annotation file (COCO instances JSON or WikiChurches building_parts.json): every map is "
        "scored against its regions (tables annotations, alignment, head_ranking); empty: no alignment.",
    )

    def images_path(self) -> Path:
        return resolve_images(self.images_dir)

    def warehouse_path(self) -> Path:
        return resolve_warehouse(self.warehouse)

    def annotations_path(self) -> Path | None:
        """The annotation file as an absolute path, or None when none is set."""
        return local_path(self.annotations, "annotation file") if self.annotations.strip() else None

    def shard_count(self) -> int:
        """``shards``; when 0, ``$SSL_ATTENTION_SHARDS``, else the count the warehouse records, else 1."""
        if self.shards:
            return self.shards
        if os.environ.get(SHARDS_ENV, "").strip():
            return default_shards()
        try:
            return recorded_shards(self.warehouse_path()) or DEFAULT_SHARDS
        except ValueError:  # an unreadable layout file: the run's own layout check reports it
            return DEFAULT_SHARDS

    def checkpoint_dirs(self) -> dict[str, Path]:
        return parse_checkpoints(self.checkpoints, list(MODELS))

    def resolution_of(self, model: str) -> Resolution:
        return parse_resolution(self.resolution, list(MODELS))[model]


class Settings(ExtractionFields):
    """A whole run: which models, and how each is extracted. Bad values raise ``ValidationError`` (a
    ``ValueError``) naming the field and what is valid; ``describe_errors`` makes it one line."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: ModelList = Field(
        default_factory=lambda: tuple(MODELS),
        description=f"all (the default), or a comma-separated list of: {', '.join(MODELS)}.",
    )


def describe_errors(error: ValidationError, names: Mapping[str, str] | None = None) -> str:
    """``field: what is valid (got value)`` per refused value, joined by ``; ``; ``names`` renames fields."""
    names = names or {}
    parts = []
    for item in error.errors(include_url=False):
        field = str(item["loc"][0]) if item["loc"] else "settings"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            valid = ", ".join(names.get(name, name) for name in Settings.model_fields)
            message = f"unknown setting; valid: {valid}"
        elif not item["type"].startswith("value_error"):  # a check of ours names the value itself
            message += f" (got {item['input']!r})"
        label = names.get(field, field)
        parts.append(message if message.startswith(label) else f"{label}: {message}")
    return "; ".join(parts)


# --- the environment ------------------------------------------------------------------------------------


def _given_or_env(given: str | os.PathLike[str] | None, variable: str, default: Path) -> str:
    text = os.fspath(given).strip() if given is not None else ""
    return text or os.environ.get(variable, "").strip() or str(default)


def warehouse_location(given: str | os.PathLike[str] | None = None) -> str:
    """The warehouse as given: ``given``, else ``$SSL_ATTENTION_WAREHOUSE``, else ``data/warehouse``; not
    resolved (for messages about a location that cannot be used)."""
    return _given_or_env(given, WAREHOUSE_ENV, DEFAULT_WAREHOUSE)


def resolve_warehouse(given: str | os.PathLike[str] | None = None) -> Path:
    """``warehouse_location(given)`` as an absolute path; raises ``WarehouseLocationError`` for a URL that is
    not ``file://`` (docs/scaling.md tells how to run on object storage)."""
    return local_path(warehouse_location(given), "warehouse")


def resolve_images(given: str | os.PathLike[str] | None = None) -> Path:
    """``given``, else ``$SSL_ATTENTION_IMAGES``, else ``data/samples``, as an absolute path."""
    return local_path(_given_or_env(given, IMAGES_ENV, DEFAULT_IMAGES), "images folder")


def environment_fields() -> dict[str, str]:
    """The location fields whose variable is set: {field: variable} (the launchpad then shows the source)."""
    return {field: variable for field, variable in ENV_FALLBACKS.items() if os.environ.get(variable, "").strip()}


def pool_override() -> str | None:
    """``$SSL_ATTENTION_POOL``: None when unset (the pipeline picks), ``""`` for no pool (``none`` or empty),
    else the pool's name."""
    value = os.environ.get(POOL_ENV)
    if value is None:
        return None
    return "" if value.strip().lower() in ("", "none") else value.strip()


def default_shards() -> int:
    """``$SSL_ATTENTION_SHARDS`` (1..4096), else 1: the shard count of a run that sets none, and of the Dagster
    partitions when the definitions load."""
    raw = os.environ.get(SHARDS_ENV, "").strip()
    if not raw:
        return DEFAULT_SHARDS
    if not raw.isdigit():
        raise ValueError(f"${SHARDS_ENV}={raw!r}: expected a whole number of shards, 1..{MAX_SHARDS}")
    try:
        return check_shards(int(raw))
    except ValueError as exc:
        raise ValueError(f"${SHARDS_ENV}={raw!r}: {exc}") from None


def sensor_interval_s() -> int:
    """``$SSL_ATTENTION_SENSOR_INTERVAL`` in whole seconds (at least 1), else 60."""
    raw = os.environ.get(SENSOR_INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_SENSOR_INTERVAL_S
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"${SENSOR_INTERVAL_ENV}={raw!r}: expected whole seconds, at least 1")
    return int(raw)
