"""Annotation files (COCO and WikiChurches) -> region records and errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ssl_attention.alignment.annotations import (
    AnnotationFormatError,
    parse_annotations,
    read_annotations,
)
from ssl_attention.images import scan_images

CATALOG = [
    ("id-church", "churches/church.jpg", 640, 480),
    ("id-tower", "tower.jpg", 400, 800),
    ("id-a", "a/same.jpg", 100, 100),
    ("id-b", "b/same.jpg", 100, 100),
]
SOURCE_FIELDS = ("source_file", "source_hash")

# The same regions in both formats. Feature types: 0 Window (parent 2 Facade), 1 Portal (parent 2), 2 Facade,
# 3 Rose window (parent 0): its ancestors are Window, then Facade.
META = [
    {"name": "Window", "parents": [2]},
    {"name": "Portal", "parents": [2]},
    {"name": "Facade", "parents": []},
    {"name": "Rose window", "parents": [0]},
]
# (file name, label, left, top, width, height as fractions); dyadic fractions keep the pixel values exact
REGIONS = [
    ("churches/church.jpg", 0, 0.125, 0.25, 0.25, 0.5),
    ("churches/church.jpg", 1, 0.5, 0.5, 0.25, 0.375),
    ("churches/church.jpg", 3, 0.375, 0.0625, 0.125, 0.125),
    ("tower.jpg", 2, 0.0, 0.0, 1.0, 0.5),
]
SIZES = {name: (w, h) for _, name, w, h in CATALOG}


def wikichurches_doc(regions=REGIONS, meta=META) -> dict:
    annotations: dict = {}
    for name, label, left, top, width, height in regions:
        record = annotations.setdefault(name, {"styles": ["Gothic"], "bbox_groups": []})
        record["bbox_groups"].append(
            {
                "group_label": label,
                "elements": [{"left": left, "top": top, "width": width, "height": height, "label": label}],
            }
        )
    return {"meta": meta, "annotations": annotations}


def coco_doc(regions=REGIONS) -> dict:
    names = sorted({r[0] for r in regions})
    images = [{"id": i + 10, "file_name": n, "width": SIZES[n][0], "height": SIZES[n][1]} for i, n in enumerate(names)]
    ids = {n: i + 10 for i, n in enumerate(names)}
    annotations = []
    for index, (name, label, left, top, width, height) in enumerate(regions):
        w, h = SIZES[name]
        bbox = [left * w, top * h, width * w, height * h]
        annotations.append({"id": 100 + index, "image_id": ids[name], "category_id": label, "bbox": bbox})
    # COCO has one supercategory per category: give each its nearest parent; Rose window's chain is longer in
    # WikiChurches, so the comparison below leaves it to its own test
    categories = [
        {"id": 0, "name": "Window", "supercategory": "Facade"},
        {"id": 1, "name": "Portal", "supercategory": "Facade"},
        {"id": 2, "name": "Facade"},
        {"id": 3, "name": "Rose window", "supercategory": "Window"},
    ]
    return {"images": images, "annotations": annotations, "categories": categories}


def parse(doc: dict, catalog=CATALOG, name: str = "ann.json"):
    return parse_annotations(json.dumps(doc).encode(), catalog, name)


def rows(result) -> list[dict]:
    return [{k: v for k, v in r.as_row().items() if k not in SOURCE_FIELDS} for r in result.regions]


def test_both_formats_give_identical_rows():
    single_parent = REGIONS[:2] + REGIONS[3:]
    coco = parse(coco_doc(single_parent), name="instances.json")
    wiki = parse(wikichurches_doc(single_parent), name="building_parts.json")
    assert (coco.format, wiki.format) == ("coco", "wikichurches")
    assert coco.errors == [] and wiki.errors == []
    assert rows(coco) == rows(wiki)
    # and the rows hold what the fractions say, in pixels of the 640 x 480 and 400 x 800 images
    assert rows(wiki) == [
        {"image_id": "id-church", "file_name": "churches/church.jpg", "region_id": 0, "feature": "Window",
         "feature_id": 0, "parent_features": ["Facade"], "x0": 80.0, "y0": 120.0, "x1": 240.0, "y1": 360.0,
         "polygon": None},
        {"image_id": "id-church", "file_name": "churches/church.jpg", "region_id": 1, "feature": "Portal",
         "feature_id": 1, "parent_features": ["Facade"], "x0": 320.0, "y0": 240.0, "x1": 480.0, "y1": 420.0,
         "polygon": None},
        {"image_id": "id-tower", "file_name": "tower.jpg", "region_id": 0, "feature": "Facade",
         "feature_id": 2, "parent_features": [], "x0": 0.0, "y0": 0.0, "x1": 400.0, "y1": 400.0,
         "polygon": None},
    ]  # fmt: skip


def test_parent_features_list_every_ancestor_nearest_first():
    wiki = parse(wikichurches_doc())
    rose = next(r for r in wiki.regions if r.feature == "Rose window")
    assert rose.parent_features == ("Window", "Facade")
    assert (rose.x0, rose.y0, rose.x1, rose.y1) == (240.0, 30.0, 320.0, 90.0)
    coco = parse(coco_doc())
    assert next(r for r in coco.regions if r.feature == "Rose window").parent_features == ("Window",)


def test_source_name_and_content_hash(tmp_path: Path):
    data = json.dumps(coco_doc()).encode()
    path = tmp_path / "instances.json"
    path.write_bytes(data)
    result = read_annotations(path, CATALOG)
    assert result.source_file == "instances.json"
    assert result.source_hash == hashlib.sha256(data).hexdigest()
    assert {(r.source_file, r.source_hash) for r in result.regions} == {("instances.json", result.source_hash)}


def test_wikichurches_coordinates_are_clamped_to_the_image():
    regions = [("tower.jpg", 2, -0.25, -0.125, 0.5, 0.25), ("tower.jpg", 2, 0.75, 0.875, 0.5, 0.25)]
    result = parse(wikichurches_doc(regions))
    assert result.errors == []
    # 400 x 800: left -0.25 -> 0, right 0.25 * 400 = 100; top -0.125 -> 0, bottom 0.125 * 800 = 100;
    # second: right 1.25 -> 1, bottom 1.125 -> 1
    assert [(r.x0, r.y0, r.x1, r.y1) for r in result.regions] == [(0, 0, 100, 100), (300, 700, 400, 800)]


def test_bad_regions_go_to_errors_and_the_rest_goes_on():
    regions = [
        ("churches/church.jpg", 0, 0.125, 0.25, 0.25, 0.5),  # fine
        ("churches/church.jpg", 0, 0.5, 0.5, 0.0, 0.25),  # zero width
        ("churches/church.jpg", 0, 1.25, 0.5, 0.25, 0.25),  # right of the image
        ("churches/church.jpg", 9, 0.5, 0.5, 0.25, 0.25),  # no feature type 9
        ("missing.jpg", 0, 0.5, 0.5, 0.25, 0.25),  # not catalogued
        ("tower.jpg", 2, 0.0, 0.0, 1.0, 0.5),  # fine
    ]
    wiki = parse(wikichurches_doc(regions))
    assert [(r.file_name, r.region_id) for r in wiki.regions] == [("churches/church.jpg", 0), ("tower.jpg", 0)]
    reasons = [(e.file_name, e.reason) for e in wiki.errors]
    assert len(reasons) == 4
    assert reasons[0][0] == "churches/church.jpg" and reasons[0][1].startswith("region 1: zero area")
    assert reasons[1][1].startswith("region 2: outside the image")
    assert reasons[2][1].startswith("region 3: unknown label index 9 (valid: 0..3)")
    assert reasons[3][0] == "missing.jpg" and reasons[3][1].startswith("unknown image")

    doc = coco_doc([r for r in regions if r[0] != "missing.jpg" and r[1] != 9])
    doc["annotations"].append({"image_id": 10, "category_id": 42, "bbox": [1, 1, 5, 5]})
    doc["annotations"].append({"image_id": 999, "category_id": 0, "bbox": [1, 1, 5, 5]})
    doc["annotations"].append({"image_id": 10, "category_id": 0, "bbox": [1, 1, 5]})
    doc["images"].append({"id": 7, "file_name": "missing.jpg", "width": 10, "height": 10})
    doc["annotations"].append({"image_id": 7, "category_id": 0, "bbox": [1, 1, 5, 5]})
    coco = parse(doc)
    assert [(r.file_name, r.region_id) for r in coco.regions] == [("churches/church.jpg", 0), ("tower.jpg", 0)]
    reasons = [e.reason for e in coco.errors]
    assert reasons[0].startswith("region 1 (annotation 1): zero area")
    assert reasons[1].startswith("region 2 (annotation 2): outside the image")
    assert reasons[2].startswith("region 3 (annotation 4): unknown category id 42 (known: 0, 1, 2, 3)")
    assert reasons[3] == "annotation 5: image_id 999 is not in images[]"
    assert reasons[4].startswith("region 4 (annotation 6): bbox [1, 1, 5] must be")
    assert coco.errors[5].file_name == "missing.jpg" and reasons[5].startswith("unknown image")


def test_a_file_of_neither_format_is_one_error_naming_both():
    for data in (b'{"images": [], "licenses": []}', b"[1, 2, 3]", b"not json at all", "é".encode("latin-1")):
        with pytest.raises(AnnotationFormatError) as info:
            parse_annotations(data, CATALOG, "odd.json")
        message = str(info.value)
        assert "odd.json" in message and "COCO" in message and "WikiChurches" in message


def test_images_match_by_relative_path_then_by_unique_base_name():
    regions = [
        ("church.jpg", 0, 0.0, 0.0, 0.5, 0.5),  # base name of churches/church.jpg, unique
        ("./tower.jpg", 2, 0.0, 0.0, 0.5, 0.5),  # relative path with ./
        ("same.jpg", 2, 0.0, 0.0, 0.5, 0.5),  # two catalogued images have this base name
        ("b\\same.jpg", 2, 0.0, 0.0, 0.5, 0.5),  # Windows separator
    ]
    result = parse(wikichurches_doc(regions))
    assert sorted(r.image_id for r in result.regions) == ["id-b", "id-church", "id-tower"]
    assert len(result.errors) == 1
    assert result.errors[0].file_name == "same.jpg"
    assert "a/same.jpg, b/same.jpg" in result.errors[0].reason


def test_coco_sizes_against_the_catalogue():
    base = {
        "annotations": [{"image_id": 1, "category_id": 0, "bbox": [10, 20, 30, 40]}],
        "categories": [{"id": 0, "name": "Window"}],
    }

    def with_size(width, height):
        return parse(dict(base, images=[{"id": 1, "file_name": "tower.jpg", "width": width, "height": height}]))

    same = with_size(400, 800)
    assert [(r.x0, r.y0, r.x1, r.y1) for r in same.regions] == [(10, 20, 40, 60)]
    half = with_size(200, 400)  # annotated on a half-size copy: boxes doubled
    assert [(r.x0, r.y0, r.x1, r.y1) for r in half.regions] == [(20, 40, 80, 120)]
    transposed = with_size(800, 400)  # the size before EXIF orientation
    assert transposed.regions == [] and "before EXIF orientation" in transposed.errors[0].reason
    other = with_size(300, 800)
    assert other.regions == [] and "does not match the image (400x800" in other.errors[0].reason


def test_coco_polygons_are_kept_and_scaled_partial_boxes_clamped():
    doc = {
        "images": [{"id": 1, "file_name": "tower.jpg", "width": 200, "height": 400}],
        "annotations": [
            {"image_id": 1, "category_id": 0, "bbox": [10, 20, 30, 40], "segmentation": [[10, 20, 40, 20, 40, 60]]},
            {"image_id": 1, "category_id": 0, "bbox": [180, 390, 40, 40], "segmentation": {"counts": "x"}},
            {"image_id": 1, "category_id": 0, "bbox": [1, 1, 2, 2], "segmentation": [[1, 2, 3]]},
        ],
        "categories": [{"id": 0, "name": "Window", "supercategory": "Window"}],
    }  # fmt: skip
    result = parse(doc)
    first, second = result.regions
    assert first.polygon == ((20.0, 40.0, 80.0, 40.0, 80.0, 120.0),)  # scaled by 2 like the box
    assert first.parent_features == ()  # a supercategory equal to the name is no parent
    assert second.polygon is None and (second.x1, second.y1) == (400, 800)  # RLE dropped; clamped to the image
    assert [e.reason for e in result.errors] == [
        "region 2 (annotation 2): segmentation polygon must be a flat list of at least 3 (x, y) number pairs"
    ]


def test_bundled_sample_annotations_match_the_samples():
    root = Path(__file__).resolve().parents[1] / "data" / "samples"
    catalog = scan_images(root, with_thumbnails=False)
    entries = [(r.image_id, r.file_name, r.width, r.height) for r in catalog.records]
    result = read_annotations(root / "annotations.json", entries)
    assert result.format == "coco" and result.errors == []
    per_image = {r.file_name: 0 for r in catalog.records}
    for region in result.regions:
        per_image[region.file_name] += 1
    assert all(2 <= n <= 4 for n in per_image.values()), per_image
    assert all(r.parent_features for r in result.regions)  # every category has a supercategory
