"""Finding, identifying and safely decoding input images.

Every file under the input folder (recursively; hidden files and folders, and JSON sidecars such as annotation
files, excluded) is either catalogued as an ``ImageRecord`` or reported as an ``ImageIssue`` with a reason;
one bad file never stops the rest.
Images are identified by the SHA-256 of their bytes, so a renamed file keeps its id and a changed file
gets a new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import stat
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

SUPPORTED_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif")
SIDECAR_EXTENSIONS = (".json",)  # annotation files kept beside the images: neither catalogued nor reported
SUPPORTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "TIFF", "BMP", "GIF")
# Decompression-bomb guard: images with more pixels than this are refused (about 8000 x 8000).
DEFAULT_MAX_PIXELS = 64_000_000
# Image processors resize the short side to ~224 px keeping the aspect ratio before cropping, so a 1 x 60,000
# strip (few pixels) would become 224 x 13 million: far beyond memory. Longer/shorter side above this is refused.
MAX_ASPECT_RATIO = 50
THUMBNAIL_SIZE = 128
ID_HEX_CHARS = 32  # 128 bits of SHA-256


@dataclass(frozen=True)
class ImageRecord:
    image_id: str
    path: Path
    file_name: str  # relative to the input folder, with forward slashes
    width: int  # after EXIF orientation
    height: int
    format: str
    mode: str  # PIL mode of the file before conversion to RGB
    num_bytes: int
    mtime_ns: int = 0  # modification time when catalogued: unchanged (size, mtime) files are not re-read


@dataclass(frozen=True)
class ImageIssue:
    file_name: str
    reason: str
    image_id: str | None = None  # when known (a catalogued file that failed during a model's extraction)


class ImageLoadError(ValueError):
    """A file that cannot be used as an image; the message is the reason recorded in the errors table."""


def image_id_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:ID_HEX_CHARS]


def iter_candidate_files(folder: Path) -> Iterator[Path]:
    """Every non-hidden path below ``folder`` that is a file or looks like an image by name, sorted."""
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for d in dirs:  # a directory named like an image is reported, not silently ignored
            if d.lower().endswith(SUPPORTED_EXTENSIONS):
                yield Path(root) / d
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root) / name


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit/float grey is rescaled, alpha is composited onto white."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            scaled = values / 65535.0
        else:  # 32-bit int or float: stretch the image's own range
            low, high = float(values.min()), float(values.max())
            scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
        grey = Image.fromarray((np.clip(scaled, 0, 1) * 255).round().astype(np.uint8), mode="L")
        return grey.convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, str, str]:
    """Bytes -> (RGB image with EXIF orientation applied, format, original mode); ImageLoadError otherwise."""
    if not data:
        raise ImageLoadError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageLoadError(
                f"not an image PIL can identify (valid formats: {', '.join(SUPPORTED_FORMATS)})"
            ) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageLoadError(f"refused as a possible decompression bomb: {exc}") from None
        except Exception as exc:  # corrupt headers raise a zoo of exception types
            raise ImageLoadError(f"cannot open image: {type(exc).__name__}: {exc}") from None
        fmt = image.format or "unknown"
        if fmt not in SUPPORTED_FORMATS:
            raise ImageLoadError(f"unsupported image format {fmt} (valid: {', '.join(SUPPORTED_FORMATS)})")
        width, height = image.size
        if width * height > max_pixels:
            raise ImageLoadError(
                f"{width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,} pixels "
                "(decompression-bomb guard; raise --max-pixels to allow it)"
            )
        if width == 0 or height == 0:
            raise ImageLoadError(f"image has no pixels ({width}x{height})")
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise ImageLoadError(
                f"{width}x{height}: aspect ratio {max(width, height) / min(width, height):.0f}:1 exceeds the limit "
                f"of {MAX_ASPECT_RATIO}:1 (resizing its short side to the model's input size would exhaust memory)"
            )
        try:
            image.seek(0)  # GIF/TIFF: the first frame
            image.load()  # decode now: truncated files fail here, not later
            mode = image.mode
            image = ImageOps.exif_transpose(image) or image
            rgb = _to_rgb(image)
        except Exception as exc:
            raise ImageLoadError(f"cannot decode image: {type(exc).__name__}: {exc}") from None
    return rgb, fmt, mode


def read_file(path: Path) -> bytes:
    """The file's bytes, or ImageLoadError with the OS's reason (permissions, a directory, vanished)."""
    try:
        mode = path.stat().st_mode
    except PermissionError:
        raise ImageLoadError("permission denied: the file cannot be read") from None
    except OSError as exc:
        raise ImageLoadError(f"cannot read file: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise ImageLoadError("is a directory, not an image file")
    if not stat.S_ISREG(mode):  # FIFOs, sockets, devices: reading could block forever
        raise ImageLoadError("not a regular file (FIFO, socket or device)")
    try:
        return path.read_bytes()
    except PermissionError:
        raise ImageLoadError("permission denied: the file cannot be read") from None
    except OSError as exc:
        raise ImageLoadError(f"cannot read file: {exc.strerror or exc}") from None


def load_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, str]:
    """RGB image and content id of one file; ImageLoadError if it cannot be used."""
    data = read_file(path)
    image, _fmt, _mode = decode_image(data, max_pixels)
    return image, image_id_of(data)


def thumbnail_jpeg(image: Image.Image, size: int = THUMBNAIL_SIZE, quality: int = 85) -> bytes:
    thumb = image.copy()
    thumb.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _unchanged(
    path: Path, rel: str, known: Mapping[str, tuple[ImageRecord, bytes | None]] | None
) -> tuple[ImageRecord, bytes | None] | None:
    """The earlier record of ``rel`` if the file's size and modification time have not changed."""
    if not known or rel not in known:
        return None
    record, thumbnail = known[rel]
    try:
        stat_result = path.stat()
    except OSError:
        return None
    if not stat.S_ISREG(stat_result.st_mode) or not record.mtime_ns:
        return None
    if (stat_result.st_size, stat_result.st_mtime_ns) != (record.num_bytes, record.mtime_ns):
        return None
    return dataclasses.replace(record, path=path.resolve()), thumbnail


@dataclass
class Catalog:
    records: list[ImageRecord]
    issues: list[ImageIssue]
    thumbnails: dict[str, bytes]
    duplicates: dict[str, list[str]]  # image_id -> other file names with identical content


def scan_images(
    folder: Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    with_thumbnails: bool = True,
    known: Mapping[str, tuple[ImageRecord, bytes | None]] | None = None,
) -> Catalog:
    """Catalogue every usable image under ``folder``; every other file becomes an ImageIssue.

    ``known`` (file name -> earlier record and thumbnail) lets a file whose size and modification time are
    unchanged keep its record without being read, hashed and decoded again.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"images folder {folder} does not exist or is not a directory")
    records: list[ImageRecord] = []
    issues: list[ImageIssue] = []
    thumbnails: dict[str, bytes] = {}
    duplicates: dict[str, list[str]] = {}
    seen: dict[str, ImageRecord] = {}
    for path in iter_candidate_files(folder):
        rel = path.relative_to(folder).as_posix()
        if not path.is_dir() and path.name.lower().endswith(SIDECAR_EXTENSIONS):
            continue
        if not path.is_dir() and not path.name.lower().endswith(SUPPORTED_EXTENSIONS):
            issues.append(ImageIssue(rel, f"unsupported file extension (valid: {', '.join(SUPPORTED_EXTENSIONS)})"))
            continue
        reused = _unchanged(path, rel, known)
        if reused is not None:
            record, thumbnail = reused
            if record.image_id in seen:
                duplicates.setdefault(record.image_id, []).append(rel)
                continue
            seen[record.image_id] = record
            records.append(record)
            if with_thumbnails and thumbnail is not None:
                thumbnails[record.image_id] = thumbnail
            continue
        try:
            data = read_file(path)
            image, fmt, mode = decode_image(data, max_pixels)
        except ImageLoadError as exc:
            log.warning("skipping %s: %s", rel, exc)
            issues.append(ImageIssue(rel, str(exc)))
            continue
        image_id = image_id_of(data)
        if image_id in seen:
            duplicates.setdefault(image_id, []).append(rel)
            log.info("%s has the same content as %s; extracted once", rel, seen[image_id].file_name)
            continue
        record = ImageRecord(
            image_id=image_id,
            path=path.resolve(),
            file_name=rel,
            width=image.width,
            height=image.height,
            format=fmt,
            mode=mode,
            num_bytes=len(data),
            mtime_ns=path.stat().st_mtime_ns,
        )
        seen[image_id] = record
        records.append(record)
        if with_thumbnails:
            thumbnails[image_id] = thumbnail_jpeg(image)
    return Catalog(records=records, issues=issues, thumbnails=thumbnails, duplicates=duplicates)
