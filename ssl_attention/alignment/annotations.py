"""Annotation files -> region records in original-image pixels, plus errors for what cannot be used.

Two formats, told apart by their content:

- COCO instances JSON: ``images[]`` (``id``, ``file_name``, ``width``, ``height``), ``annotations[]``
  (``image_id``, ``category_id``, ``bbox`` = [x, y, w, h] in pixels, optional polygon ``segmentation``),
  ``categories[]`` (``id``, ``name``, optional ``supercategory``).
- WikiChurches ``building_parts.json``: ``meta[]`` = feature types ``{name, parents: [indices]}`` and
  ``annotations{<file name>: {styles, bbox_groups: [{group_label, elements: [{left, top, width, height,
  label}]}]}}``, coordinates as fractions of the image's width and height, ``label`` indexing ``meta``.

Rules, the same for both formats so that the same regions give identical rows:

- Images are matched by file name relative to the images folder (``./`` and backslashes normalised), then
  by base name where exactly one catalogued image has it.
- Coordinates are taken to be on the image as displayed, i.e. after EXIF orientation, which is the size the
  catalogue holds. A box reaching past the image is clamped to it (WikiChurches: fractions below 0 become 0,
  right/bottom edges beyond 1 become 1); a box of zero area, or one wholly outside the image after clamping,
  is an error.
- COCO ``width``/``height`` against the catalogue's (after EXIF) size: equal -> used as is; the same aspect
  ratio at another scale (annotated on a resized copy, per-axis scales within 1 % of each other) -> boxes
  and polygons are scaled to the catalogue's size; the transposed size of a non-square image (the size
  before EXIF orientation: the boxes may be on the unrotated pixels, and the rotation's direction is not
  known here) -> every region of that image is an error; any other size -> an error. Missing width/height
  -> the catalogue's size is assumed.
- ``region_id`` is the region's position among the entries for its image in file order (COCO: the order of
  ``annotations[]``; WikiChurches: groups, then elements), counting entries that become errors, so fixing
  one bad entry does not renumber the rest.
- ``feature_id`` is the COCO category id or the WikiChurches ``meta`` index; ``parent_features`` lists every
  ancestor, nearest first (COCO: the supercategory unless it equals the name; WikiChurches: ``parents``
  followed transitively).
- COCO polygons are kept (in catalogue pixels); RLE masks are not (the box is used). Coverage uses boxes.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

FORMATS_HELP = (
    "COCO instances JSON (an object with images[], annotations[] and categories[]) or WikiChurches "
    "building_parts.json (an object with meta[] and an annotations{file name: {bbox_groups}} object)"
)
SCALE_TOLERANCE = 0.01  # COCO sizes whose per-axis scales to the catalogue differ by less than 1 % are scaled

Format = Literal["coco", "wikichurches"]
CatalogEntry = tuple[str, str, int, int]  # (image_id, file name relative to the images folder, width, height)


class AnnotationFormatError(ValueError):
    """The file is neither annotation format (or not JSON at all); the message names both formats."""


@dataclass(frozen=True)
class Region:
    image_id: str
    file_name: str  # the catalogue's name, relative to the images folder
    region_id: int
    feature: str
    feature_id: int
    parent_features: tuple[str, ...]
    x0: float  # original-image pixels after EXIF orientation, 0 <= x0 < x1 <= width
    y0: float
    x1: float
    y1: float
    polygon: tuple[tuple[float, ...], ...] | None  # COCO polygons [x1, y1, x2, y2, ...] in the same pixels
    source_file: str  # the annotation file's name
    source_hash: str  # SHA-256 of the annotation file's bytes

    def as_row(self) -> dict[str, Any]:
        """The record with lists instead of tuples, ready for a table."""
        row = asdict(self)
        row["parent_features"] = list(self.parent_features)
        row["polygon"] = [list(p) for p in self.polygon] if self.polygon is not None else None
        return row


@dataclass(frozen=True)
class AnnotationError:
    file_name: str  # the image's name as the annotation file writes it (or the annotation file's own name)
    reason: str


@dataclass
class AnnotationSet:
    format: Format
    source_file: str
    source_hash: str
    regions: list[Region] = field(default_factory=list)
    errors: list[AnnotationError] = field(default_factory=list)


# --- matching file names to the catalogue ------------------------------------------------------------


def _normalise_name(name: str) -> str:
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


class _Matcher:
    def __init__(self, catalog: Iterable[CatalogEntry]) -> None:
        self.by_name: dict[str, CatalogEntry] = {}
        self.by_base: dict[str, list[CatalogEntry]] = {}
        for entry in catalog:
            image_id, file_name, width, height = entry
            entry = (str(image_id), _normalise_name(str(file_name)), int(width), int(height))
            self.by_name[entry[1]] = entry
            self.by_base.setdefault(posixpath.basename(entry[1]), []).append(entry)

    def match(self, name: str) -> CatalogEntry | str:
        """The catalogue entry for an annotation's file name, or the reason there is none."""
        name = _normalise_name(name)
        if name in self.by_name:
            return self.by_name[name]
        candidates = self.by_base.get(posixpath.basename(name), [])
        if len(candidates) == 1:
            return candidates[0]
        if candidates:
            names = ", ".join(sorted(c[1] for c in candidates))
            return (
                f"base name {posixpath.basename(name)!r} matches {len(candidates)} catalogued images ({names}); "
                "give the path relative to the images folder"
            )
        return "unknown image: no catalogued image has this path relative to the images folder or this base name"


# --- shared checks -----------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_key(value: Any) -> bool:
    """A COCO id: an integer or a string."""
    return _is_index(value) or isinstance(value, str)


def _clamped_box(
    x0: float, y0: float, x1: float, y1: float, width: float, height: float
) -> tuple[float, float, float, float] | str:
    """The box clamped to [0, width] x [0, height], or the reason it cannot be used."""
    if not (x1 > x0 and y1 > y0):
        return f"zero area ({x1 - x0:g} x {y1 - y0:g})"
    cx0, cy0 = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
    cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
    if not (cx1 > cx0 and cy1 > cy0):
        return f"outside the image ({x0:g}, {y0:g}, {x1:g}, {y1:g}) against {width:g} x {height:g}"
    return cx0, cy0, cx1, cy1


def _ancestors(index: int, parents: Mapping[int, Sequence[int]]) -> list[int]:
    """Every ancestor of ``index``, nearest first (breadth-first), each once, cycles ignored."""
    seen: list[int] = []
    frontier = list(parents.get(index, ()))
    while frontier:
        following: list[int] = []
        for p in frontier:
            if p != index and p not in seen:
                seen.append(p)
                following.extend(parents.get(p, ()))
        frontier = following
    return seen


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- COCO --------------------------------------------------------------------------------------------


def _coco_size_rule(coco_w: Any, coco_h: Any, width: int, height: int) -> tuple[float, float] | str:
    """Per-axis scale from the COCO image size to the catalogue's, or the reason it cannot be used."""
    if coco_w is None and coco_h is None:
        return 1.0, 1.0
    if not (_is_number(coco_w) and _is_number(coco_h)) or coco_w <= 0 or coco_h <= 0:
        return f"COCO width/height {coco_w!r} x {coco_h!r} must be positive numbers"
    if (coco_w, coco_h) == (width, height):
        return 1.0, 1.0
    if width != height and (coco_w, coco_h) == (height, width):
        return (
            f"COCO size {coco_w:g}x{coco_h:g} is the image's size before EXIF orientation (after it: "
            f"{width}x{height}); boxes must be given on the oriented image"
        )
    sx, sy = width / coco_w, height / coco_h
    if abs(sx - sy) <= SCALE_TOLERANCE * max(sx, sy):
        return sx, sy
    return f"COCO size {coco_w:g}x{coco_h:g} does not match the image ({width}x{height} after EXIF orientation)"


def _coco_polygon(segmentation: Any, sx: float, sy: float) -> tuple[tuple[float, ...], ...] | str | None:
    if segmentation is None or isinstance(segmentation, Mapping) or segmentation == []:
        return None  # absent, or an RLE mask: the box is used
    if not isinstance(segmentation, list):
        return "segmentation must be a list of polygons [x1, y1, x2, y2, ...] or an RLE object"
    polygons = []
    for poly in segmentation:
        if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2 or not all(_is_number(v) for v in poly):
            return "segmentation polygon must be a flat list of at least 3 (x, y) number pairs"
        polygons.append(tuple(float(v) * (sx if i % 2 == 0 else sy) for i, v in enumerate(poly)))
    return tuple(polygons)


def _parse_coco(doc: Mapping[str, Any], matcher: _Matcher, out: AnnotationSet) -> None:
    categories: dict[int, tuple[str, tuple[str, ...]]] = {}
    for cat in doc["categories"]:
        if not isinstance(cat, Mapping) or not _is_index(cat.get("id")) or not isinstance(cat.get("name"), str):
            out.errors.append(AnnotationError(out.source_file, f"category {cat!r} needs an integer id and a name"))
            continue
        sup = cat.get("supercategory")
        parents = (sup,) if isinstance(sup, str) and sup and sup != cat["name"] else ()
        categories[cat["id"]] = (cat["name"], parents)

    images: dict[Any, tuple[str, CatalogEntry | str, tuple[float, float] | str]] = {}
    for img in doc["images"]:
        if not isinstance(img, Mapping) or not _is_key(img.get("id")) or not isinstance(img.get("file_name"), str):
            out.errors.append(AnnotationError(out.source_file, f"image entry {img!r} needs an id and a file_name"))
            continue
        if img["id"] in images:
            out.errors.append(AnnotationError(img["file_name"], f"image id {img['id']!r} appears twice in images[]"))
            continue
        entry = matcher.match(img["file_name"])
        rule = (
            _coco_size_rule(img.get("width"), img.get("height"), entry[2], entry[3]) if isinstance(entry, tuple) else ""
        )
        images[img["id"]] = (img["file_name"], entry, rule)

    ordinal: dict[str, int] = {}  # per catalogued image
    reported: set[Any] = set()  # images whose size or match error is already recorded
    for position, ann in enumerate(doc["annotations"]):
        image_key = ann.get("image_id") if isinstance(ann, Mapping) else None
        if not _is_key(image_key) or image_key not in images:
            out.errors.append(
                AnnotationError(out.source_file, f"annotation {position}: image_id {image_key!r} is not in images[]")
            )
            continue
        name, entry, rule = images[image_key]
        if isinstance(entry, str) or isinstance(rule, str):
            if image_key not in reported:
                reported.add(image_key)
                out.errors.append(AnnotationError(name, entry if isinstance(entry, str) else str(rule)))
            continue
        image_id, file_name, _width, _height = entry
        region_id = ordinal.get(image_id, 0)
        ordinal[image_id] = region_id + 1
        region = _coco_region(ann, categories, rule, entry)
        if isinstance(region, str):
            out.errors.append(AnnotationError(name, f"region {region_id} (annotation {position}): {region}"))
            continue
        feature, feature_id, parents, box, polygon = region
        out.regions.append(
            Region(
                image_id,
                file_name,
                region_id,
                feature,
                feature_id,
                parents,
                *box,
                polygon,
                out.source_file,
                out.source_hash,
            )
        )


def _coco_region(
    ann: Mapping[str, Any],
    categories: Mapping[int, tuple[str, tuple[str, ...]]],
    scale: tuple[float, float],
    entry: CatalogEntry,
) -> tuple[str, int, tuple[str, ...], tuple[float, float, float, float], Any] | str:
    """(feature, feature id, parents, clamped box, polygon) of one COCO annotation, or why it is unusable."""
    category_id = ann.get("category_id")
    if not _is_index(category_id) or category_id not in categories:
        known = ", ".join(str(c) for c in sorted(categories)) or "none"
        return f"unknown category id {category_id!r} (known: {known})"
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        return f"bbox {bbox!r} must be [x, y, width, height] numbers"
    sx, sy = scale
    x, y, w, h = (float(v) for v in bbox)
    box = _clamped_box(x * sx, y * sy, (x + w) * sx, (y + h) * sy, entry[2], entry[3])
    if isinstance(box, str):
        return box
    polygon = _coco_polygon(ann.get("segmentation"), sx, sy)
    if isinstance(polygon, str):
        return polygon
    feature, parents = categories[category_id]
    return feature, category_id, parents, box, polygon


# --- WikiChurches ------------------------------------------------------------------------------------


def _wiki_features(meta: list[Any], out: AnnotationSet) -> dict[int, tuple[str, tuple[str, ...]]]:
    """meta index -> (feature name, every ancestor's name, nearest first); bad entries go to errors."""
    names: dict[int, str] = {}
    parent_index: dict[int, list[int]] = {}
    for index, item in enumerate(meta):
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            out.errors.append(AnnotationError(out.source_file, f"meta[{index}] needs a name"))
            continue
        names[index] = item["name"]
        parents = item.get("parents") or []
        parents = parents if isinstance(parents, list) else [parents]
        valid = [p for p in parents if _is_index(p) and 0 <= p < len(meta)]
        if len(valid) < len(parents):
            bad = next(p for p in parents if p not in valid)
            out.errors.append(
                AnnotationError(
                    out.source_file,
                    f"meta[{index}] ({item['name']}): unknown parent index {bad!r} (valid: 0..{len(meta) - 1})",
                )
            )
        parent_index[index] = valid
    return {i: (names[i], tuple(names[p] for p in _ancestors(i, parent_index) if p in names)) for i in names}


def _wiki_box(
    element: Any, features: Mapping[int, Any], meta_size: int, width: int, height: int
) -> tuple[int, tuple[float, float, float, float]] | str:
    """(label, box in pixels) of one WikiChurches element, or why it is unusable."""
    coords = [element.get(k) for k in ("left", "top", "width", "height")] if isinstance(element, Mapping) else []
    if len(coords) != 4 or not all(_is_number(v) for v in coords):
        return "needs numeric left, top, width and height (fractions of the image)"
    label = element.get("label")
    if not _is_index(label) or label not in features:
        valid = f"0..{meta_size - 1}" if meta_size else "meta is empty"
        return f"unknown label index {label!r} (valid: {valid})"
    left, top, w, h = (float(v) for v in coords)
    if not (w > 0 and h > 0):
        return f"zero area ({w:g} x {h:g} of the image)"
    fx0, fy0 = min(max(left, 0.0), 1.0), min(max(top, 0.0), 1.0)  # negative values clamp to 0
    fx1, fy1 = min(max(left + w, 0.0), 1.0), min(max(top + h, 0.0), 1.0)  # right/bottom clamp to 1
    if not (fx1 > fx0 and fy1 > fy0):
        return f"outside the image (left {left:g}, top {top:g}, width {w:g}, height {h:g} as fractions of it)"
    return label, (fx0 * width, fy0 * height, fx1 * width, fy1 * height)


def _parse_wikichurches(doc: Mapping[str, Any], matcher: _Matcher, out: AnnotationSet) -> None:
    features = _wiki_features(doc["meta"], out)
    for name, record in doc["annotations"].items():
        entry = matcher.match(name)
        if isinstance(entry, str):
            out.errors.append(AnnotationError(name, entry))
            continue
        image_id, file_name, width, height = entry
        groups = record.get("bbox_groups", []) if isinstance(record, Mapping) else None
        if not isinstance(groups, list):
            out.errors.append(AnnotationError(name, "bbox_groups must be a list of {group_label, elements}"))
            continue
        elements = []
        for group in groups:
            if not isinstance(group, Mapping) or not isinstance(group.get("elements", []), list):
                out.errors.append(AnnotationError(name, f"bbox group {group!r} needs a list of elements"))
                continue
            elements.extend(group.get("elements", []))
        for region_id, element in enumerate(elements):
            result = _wiki_box(element, features, len(doc["meta"]), width, height)
            if isinstance(result, str):
                out.errors.append(AnnotationError(name, f"region {region_id}: {result}"))
                continue
            label, box = result
            feature, parents = features[label]
            out.regions.append(
                Region(
                    image_id,
                    file_name,
                    region_id,
                    feature,
                    label,
                    parents,
                    *box,
                    None,
                    out.source_file,
                    out.source_hash,
                )
            )


# --- entry points ------------------------------------------------------------------------------------


def detect_format(doc: Any) -> Format:
    """Which format a parsed JSON document is; AnnotationFormatError (naming both formats) otherwise."""
    if isinstance(doc, Mapping):
        if all(isinstance(doc.get(k), list) for k in ("images", "annotations", "categories")):
            return "coco"
        if isinstance(doc.get("meta"), list) and isinstance(doc.get("annotations"), Mapping):
            return "wikichurches"
        found = f"an object with keys {sorted(map(str, doc))[:8]}"
    else:
        found = f"a JSON {type(doc).__name__}"
    raise AnnotationFormatError(f"not an annotation file: found {found}; expected {FORMATS_HELP}")


def parse_annotations(data: bytes, catalog: Iterable[CatalogEntry], source_file: str) -> AnnotationSet:
    """Regions and errors from an annotation file's bytes, matched against the catalogue's
    (image_id, relative file name, width, height) entries, width and height after EXIF orientation.
    Rows are sorted by (file name, region id). AnnotationFormatError if the file is neither format."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnnotationFormatError(f"{source_file} is not JSON ({exc}); expected {FORMATS_HELP}") from None
    try:
        fmt = detect_format(doc)
    except AnnotationFormatError as exc:
        raise AnnotationFormatError(f"{source_file}: {exc}") from None
    out = AnnotationSet(format=fmt, source_file=source_file, source_hash=content_hash(data))
    parse = _parse_coco if fmt == "coco" else _parse_wikichurches
    parse(doc, _Matcher(catalog), out)
    out.regions.sort(key=lambda r: (r.file_name, r.region_id))
    return out


def read_annotations(path: str | Path, catalog: Iterable[CatalogEntry]) -> AnnotationSet:
    """``parse_annotations`` of a file; the source name recorded is the file's name."""
    path = Path(path)
    return parse_annotations(path.read_bytes(), catalog, path.name)
