"""Image discovery, decoding, conversion to RGB, content ids, and bad input."""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ssl_attention.extraction import catalog_images, extract_model
from ssl_attention.images import ImageLoadError, decode_image, load_image, scan_images
from ssl_attention.models.loading import LoadRequest, load_model
from ssl_attention.warehouse.paths import partition_file


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def gradient(width: int = 48, height: int = 32) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1), "RGB")


def rgb_array(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


# --- conversions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF"])
def test_every_supported_format_decodes_to_rgb(fmt):
    source = gradient()
    image, found, _mode = decode_image(encode(source, fmt))
    assert found == fmt
    assert image.mode == "RGB" and image.size == source.size
    mean_error = np.abs(rgb_array(image) - rgb_array(source)).mean()
    assert mean_error <= (15 if fmt in ("JPEG", "WEBP", "GIF") else 0)  # lossy or 256 colours


def test_grayscale_becomes_equal_channels():
    grey = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, "L")
    image, _fmt, mode = decode_image(encode(grey, "PNG"))
    assert mode == "L"
    array = rgb_array(image)
    for channel in range(3):
        np.testing.assert_array_equal(array[..., channel], np.asarray(grey))


def test_cmyk_jpeg_is_converted_not_inverted():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    image, fmt, mode = decode_image(encode(cmyk, "JPEG", quality=95))
    assert (fmt, mode) == ("JPEG", "CMYK")
    np.testing.assert_allclose(rgb_array(image).mean(axis=(0, 1)), [255, 0, 0], atol=12)


def test_16bit_png_is_rescaled_not_saturated():
    values = np.array([[0, 16384, 32768, 65535]] * 4, dtype=np.uint16)
    image16 = Image.fromarray(values)
    data = encode(image16, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really a 16-bit file
    image, _fmt, mode = decode_image(data)
    assert mode.startswith("I")
    row = rgb_array(image)[0, :, 0]
    np.testing.assert_allclose(row, [0, 64, 128, 255], atol=1)
    assert (rgb_array(image) < 255).any()  # not saturated white


def test_palette_with_transparency_composites_on_white():
    palette = Image.new("P", (4, 2))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    palette.putdata([0, 1, 0, 1, 1, 0, 1, 0])
    image, _fmt, mode = decode_image(encode(palette, "PNG", transparency=1))
    assert mode == "P"
    array = rgb_array(image)
    assert tuple(array[0, 0]) == (255, 0, 0)  # opaque palette entry 0: red
    assert tuple(array[0, 1]) == (255, 255, 255)  # transparent entry 1: white background, not blue


def test_rgba_alpha_composites_on_white():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    image, _fmt, mode = decode_image(encode(rgba, "PNG"))
    assert mode == "RGBA"
    array = rgb_array(image)[0]
    assert tuple(array[0]) == (255, 255, 255)
    assert tuple(array[1]) == (0, 0, 255)
    np.testing.assert_allclose(array[2], [127, 127, 127], atol=2)


def test_gif_first_frame():
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    image, fmt, _mode = decode_image(data)
    assert fmt == "GIF"
    np.testing.assert_allclose(rgb_array(image).mean(axis=(0, 1)), [255, 0, 0], atol=2)


def test_exif_orientation_is_applied(tmp_path):
    # stored 40 wide x 20 high, left half red, right half blue; orientation 6 = rotate 90° clockwise to display
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "rotated.jpg").write_bytes(encode(stored, "JPEG", exif=exif.tobytes(), quality=95))

    image, _ = load_image(tmp_path / "rotated.jpg")
    assert image.size == (20, 40)  # width and height swapped
    array = rgb_array(image)
    np.testing.assert_allclose(array[:15].mean(axis=(0, 1)), [255, 0, 0], atol=20)  # old left is now the top
    np.testing.assert_allclose(array[25:].mean(axis=(0, 1)), [0, 0, 255], atol=20)
    (record,) = scan_images(tmp_path).records
    assert (record.width, record.height) == (20, 40)


# --- content ids ----------------------------------------------------------------------------------------


def test_image_id_is_content_hash_rename_keeps_change_changes(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    data = encode(gradient(), "PNG")
    (folder / "a.png").write_bytes(data)
    (first,) = scan_images(folder).records
    assert first.image_id.startswith(hashlib.sha256(data).hexdigest()[:16])

    (folder / "a.png").rename(folder / "renamed.png")
    (renamed,) = scan_images(folder).records
    assert renamed.image_id == first.image_id and renamed.file_name == "renamed.png"

    changed = gradient()
    changed.putpixel((0, 0), (1, 2, 3))
    (folder / "renamed.png").write_bytes(encode(changed, "PNG"))
    (after,) = scan_images(folder).records
    assert after.image_id != first.image_id


def test_duplicates_are_recorded_and_extracted_once(tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    data = encode(gradient(), "PNG")
    (folder / "a.png").write_bytes(data)
    (folder / "sub" / "copy.png").write_bytes(data)
    (folder / "b.png").write_bytes(encode(gradient(30, 20), "PNG"))
    catalog = scan_images(folder)
    assert sorted(r.file_name for r in catalog.records) == ["a.png", "b.png"]
    a_id = next(r.image_id for r in catalog.records if r.file_name == "a.png")
    assert catalog.duplicates == {a_id: ["sub/copy.png"]}

    report = catalog_images(folder, tmp_path / "wh")
    table = {r["file_name"]: r for r in pq.read_table(report.images_path).to_pylist()}
    assert table["a.png"]["duplicate_files"] == ["sub/copy.png"]
    assert table["b.png"]["duplicate_files"] == []
    assert (table["b.png"]["width"], table["b.png"]["height"]) == (30, 20)


def test_recursive_scan_skips_hidden_and_uses_relative_posix_names(tmp_path):
    folder = tmp_path / "in"
    (folder / "x" / "y").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    (folder / "x" / "y" / "deep.png").write_bytes(encode(gradient(), "PNG"))
    (folder / ".hidden" / "h.png").write_bytes(encode(gradient(), "PNG"))
    (folder / ".dotfile.png").write_bytes(b"")
    (folder / "UPPER.JPG").write_bytes(encode(gradient(), "JPEG"))
    catalog = scan_images(folder)
    assert [r.file_name for r in catalog.records] == ["UPPER.JPG", "x/y/deep.png"]
    assert catalog.issues == []


# --- bad input ------------------------------------------------------------------------------------------


@pytest.fixture
def messy_folder(tmp_path, sample_dir, monkeypatch) -> Path:
    """Two good samples and one file of every kind of bad input."""
    folder = tmp_path / "messy"
    folder.mkdir()
    shutil.copy(sample_dir / "chelsea.jpg", folder / "good1.jpg")
    shutil.copy(sample_dir / "rocket.jpg", folder / "good2.jpg")
    (folder / "zero.jpg").write_bytes(b"")
    full = (sample_dir / "coffee.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (folder / "text.jpg").write_text("this is not an image\n")
    (folder / "huge.png").write_bytes(encode(Image.new("RGB", (1500, 1500), (9, 9, 9)), "PNG"))
    (folder / "strip.png").write_bytes(encode(Image.new("RGB", (3000, 2), (9, 9, 9)), "PNG"))  # 6,000 pixels
    (folder / "dir.png").mkdir()
    (folder / "locked.jpg").write_bytes(full)
    (folder / "notes.txt").write_text("readme")
    (folder / "portable.png").write_bytes(encode(gradient(), "PPM"))  # valid image, unsupported format

    real_read_bytes = pathlib.Path.read_bytes

    def read_bytes(self):  # tests run as root, so chmod 000 would not stop the read
        if self.name == "locked.jpg":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
    return folder


EXPECTED_REASONS = {
    "zero.jpg": "0 bytes",
    "truncated.jpg": "truncated",
    "text.jpg": "not an image",
    "huge.png": "exceeds the limit of 1,000,000 pixels",
    "strip.png": "aspect ratio 1500:1 exceeds the limit of 50:1",
    "dir.png": "directory",
    "locked.jpg": "permission denied",
    "notes.txt": "unsupported file extension",
    "portable.png": "unsupported image format",
}
MAX_PIXELS = 1_000_000  # the samples are well below, huge.png (2.25 MP) is above


def test_bad_files_are_skipped_with_reasons(messy_folder):
    catalog = scan_images(messy_folder, max_pixels=MAX_PIXELS)
    assert sorted(r.file_name for r in catalog.records) == ["good1.jpg", "good2.jpg"]
    reasons = {issue.file_name: issue.reason for issue in catalog.issues}
    assert set(reasons) == set(EXPECTED_REASONS)
    for name, fragment in EXPECTED_REASONS.items():
        assert fragment in reasons[name].lower(), (name, reasons[name])


def test_bad_files_do_not_stop_extraction(messy_folder, tmp_path, tiny_checkpoints):
    warehouse = tmp_path / "wh"
    report = catalog_images(messy_folder, warehouse, max_pixels=MAX_PIXELS)
    errors = {r["file_name"]: r["reason"] for r in pq.read_table(report.errors_path).to_pylist()}
    assert set(errors) == set(EXPECTED_REASONS)
    adapter = load_model("mae", LoadRequest(checkpoint=tiny_checkpoints["mae"], device="cpu"))
    run = extract_model(adapter, report.catalog.records, warehouse, max_pixels=MAX_PIXELS)
    assert run.images_extracted == 2 and run.issues == []
    maps = pq.read_table(partition_file(warehouse, "attention_maps", model="mae", method="cls", shard="0"))
    assert set(maps["image_id"].to_pylist()) == {r.image_id for r in report.catalog.records}


def test_file_broken_after_cataloguing_is_recorded_and_the_rest_extracted(tmp_path, images_copy, tiny_checkpoints):
    folder = images_copy(3)
    warehouse = tmp_path / "wh"
    records = catalog_images(folder, warehouse).catalog.records
    victim = records[1]
    victim.path.write_bytes(victim.path.read_bytes()[:200])  # truncated after the scan
    adapter = load_model("mae", LoadRequest(checkpoint=tiny_checkpoints["mae"], device="cpu"))
    run = extract_model(adapter, records, warehouse, batch_size=2)
    assert run.images_extracted == 2
    assert [i.file_name for i in run.issues] == [victim.file_name]
    errors = pq.read_table(partition_file(warehouse, "errors", source="mae")).to_pylist()
    assert [e["file_name"] for e in errors] == [victim.file_name]
    maps = pq.read_table(partition_file(warehouse, "attention_maps", model="mae", method="rollout", shard="0"))
    assert set(maps["image_id"].to_pylist()) == {r.image_id for r in records} - {victim.image_id}


FIFO_SCAN = """
import sys
from ssl_attention.images import scan_images
catalog = scan_images(sys.argv[1])
print(sorted(r.file_name for r in catalog.records), [i.file_name for i in catalog.issues])
"""


def test_special_file_named_like_an_image_does_not_block_the_scan(tmp_path, sample_dir):
    """A FIFO called pipe.jpg cannot be read without a writer; the scan must skip it, not wait forever."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(sample_dir / "chelsea.jpg", folder / "good.jpg")
    os.mkfifo(folder / "pipe.jpg")
    try:
        done = subprocess.run(
            [sys.executable, "-c", FIFO_SCAN, str(folder)], capture_output=True, text=True, timeout=10
        )
    except subprocess.TimeoutExpired:
        pytest.fail("scan_images blocked on a FIFO named pipe.jpg")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['good.jpg'] ['pipe.jpg']"


def test_decode_errors_are_image_load_errors():
    for data in (b"", b"GIF89a garbage", b"\x89PNG\r\n\x1a\n" + b"\0" * 20):
        with pytest.raises(ImageLoadError):
            decode_image(data)


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        scan_images(tmp_path / "nope")


def test_recataloguing_reads_only_new_or_changed_files(tmp_path, sample_dir, monkeypatch):
    from ssl_attention import images as images_module
    from ssl_attention.extraction import catalog_images

    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("astronaut.jpg", "chelsea.jpg", "coffee.jpg"):
        shutil.copy(sample_dir / name, folder / name)
    warehouse = tmp_path / "wh"
    first = {r.file_name: r.image_id for r in catalog_images(folder, warehouse).catalog.records}

    reads: list[str] = []
    real_read = images_module.read_file
    monkeypatch.setattr(images_module, "read_file", lambda path: reads.append(path.name) or real_read(path))
    again = catalog_images(folder, warehouse).catalog
    assert reads == []  # nothing changed: no file is read, hashed or decoded
    assert {r.file_name: r.image_id for r in again.records} == first
    assert set(again.thumbnails) == set(first.values())  # thumbnails kept

    shutil.copy(sample_dir / "rocket.jpg", folder / "chelsea.jpg")  # new content under an old name
    os.utime(folder / "coffee.jpg")  # touched only: re-read, same id
    shutil.copy(sample_dir / "hubble_deep_field.jpg", folder / "new.jpg")
    third = {r.file_name: r.image_id for r in catalog_images(folder, warehouse).catalog.records}
    assert sorted(reads) == ["chelsea.jpg", "coffee.jpg", "new.jpg"]
    assert third["coffee.jpg"] == first["coffee.jpg"] and third["astronaut.jpg"] == first["astronaut.jpg"]
    assert third["chelsea.jpg"] != first["chelsea.jpg"]
