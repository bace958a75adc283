"""`ssl-attention`: clear errors for bad input, and the main command end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ssl_attention.cli import main
from ssl_attention.registry import METHODS, MODELS
from tests.pipeline_helpers import checkpoint_args

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "ssl_attention" / "models" / "configs"


def test_unknown_model_lists_the_valid_ones(capsys):
    assert main(["run", "--models", "dinov2,vgg", "--weights", "random"]) == 2
    err = capsys.readouterr().err
    assert "vgg" in err
    for slug in MODELS:
        assert slug in err


def test_unknown_weights_mode_and_flag_are_refused(capsys):
    assert main(["run", "--weights", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "--weights" in err and "'bogus'" in err
    assert all(f"'{mode}'" in err for mode in ("auto", "pretrained", "random"))
    with pytest.raises(SystemExit) as exc:
        main(["run", "--no-such-flag"])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["run", "--checkpoint", "clip"], "MODEL=DIR"),
        (["run", "--checkpoint", "vit=/tmp"], "unknown model"),
        (["run", "--images", "/no/such/folder"], "not a directory"),
        (["run", "--device", "tpu"], "valid devices"),
        (["run", "--warehouse", "s3://bucket/wh"], "file://"),
        (["run", "--images", "s3://bucket/images"], "only local paths and file:// URLs"),
        (["run", "--batch-size", "0"], "batch-size"),
    ],
)
def test_bad_arguments_get_a_clear_error(capsys, argv, needle):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_run_with_tiny_checkpoints_prints_a_summary(tmp_path, tiny_checkpoints, images_copy, capsys):
    warehouse = tmp_path / "wh"
    argv = ["run", "--images", str(images_copy(2)), "--models", "all", "--weights", "pretrained"]
    argv += ["--warehouse", str(warehouse), "--device", "cpu"]
    for item in checkpoint_args(tiny_checkpoints):
        argv += ["--checkpoint", item]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for slug in MODELS:
        assert f"  {slug}" in out and "2 extracted" in out
    assert "images: 2 usable, 0 skipped" in out
    for slug, spec in MODELS.items():
        for method in spec.methods:
            assert (
                warehouse / "attention_maps" / f"model={slug}" / f"method={method}" / "shard=0" / "data.parquet"
            ).is_file()
    assert (warehouse / "attention.duckdb").is_file()
    # a second run extracts nothing new
    assert main(argv) == 0
    assert "0 extracted, 2 up to date" in capsys.readouterr().out


def _expected_shape(slug: str) -> tuple[int, int, int]:
    """(layers, heads, grid side) of the shipped hub config, read independently of the library."""
    import json

    config = json.loads((CONFIGS / slug / "config.json").read_text())
    processor = json.loads((CONFIGS / slug / "preprocessor_config.json").read_text())
    if "max_num_patches" in processor:  # NaFlex: each image's own grid, see _naflex_grid
        return config["num_hidden_layers"], config["num_attention_heads"], 0
    side = (processor.get("crop_size") or processor["size"])["height"]
    return config["num_hidden_layers"], config["num_attention_heads"], side // config["patch_size"]


def _naflex_grid(slug: str, width: int, height: int) -> tuple[int, int]:
    """The NaFlex processor's own patch grid for an image, by transformers' function and the shipped config."""
    import json

    from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

    processor = json.loads((CONFIGS / slug / "preprocessor_config.json").read_text())
    patch = processor["patch_size"]
    size_h, size_w = get_image_size_for_max_num_patches(height, width, patch, processor["max_num_patches"])
    return size_h // patch, size_w // patch


@pytest.mark.slow
def test_readme_main_command_fills_every_partition(tmp_path):
    """The README's main job: every model, random weights, offline, into a fresh warehouse."""
    warehouse = tmp_path / "wh"
    command = [sys.executable, "-m", "ssl_attention.cli", "run", "--images", "data/samples", "--models", "all"]
    command += ["--weights", "random", "--warehouse", str(warehouse)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "RANDOM" in result.stdout
    catalog = pq.read_table(warehouse / "images" / "data.parquet").to_pylist()
    images = len(catalog)
    sizes = {r["image_id"]: (r["width"], r["height"]) for r in catalog}
    assert images == len(list((REPO / "data" / "samples").glob("*.jpg")))
    for slug, spec in MODELS.items():
        for method in spec.methods:
            table = pq.read_table(
                warehouse / "attention_maps" / f"model={slug}" / f"method={method}" / "shard=0" / "data.parquet",
                columns=["image_id", "layer", "head", "grid_h", "grid_w", "weights_mode", "num_heads"],
            ).to_pylist()
            assert {r["weights_mode"] for r in table} == {"random"}
            if slug == "resnet50":
                assert {r["layer"] for r in table} == {0, 1, 2, 3} and {r["head"] for r in table} == {None}
                assert {(r["grid_h"], r["grid_w"]) for r in table} == {(56, 56), (28, 28), (14, 14), (7, 7)}
                continue
            layers, heads, side = _expected_shape(slug)
            expected_layers = {layers} if method == "probe" else set(range(layers))
            expected_heads = {None, *range(heads)} if METHODS[method].per_head else {None}
            assert {r["layer"] for r in table} == expected_layers, (slug, method)
            assert {r["head"] for r in table} == expected_heads, (slug, method)
            if side:
                assert {(r["grid_h"], r["grid_w"]) for r in table} == {(side, side)}
            else:
                for r in table:
                    assert (r["grid_h"], r["grid_w"]) == _naflex_grid(slug, *sizes[r["image_id"]]), (slug, method)
            assert {r["num_heads"] for r in table} == {heads}
            assert len(table) == images * len(expected_layers) * len(expected_heads)


def test_flags_are_checked_before_the_images_folder(capsys):
    assert main(["run", "--images", "/no/such/folder", "--device", "tpu"]) == 2
    assert "valid devices" in capsys.readouterr().err


def test_a_folder_without_usable_images_fails_with_the_reasons(tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image")
    argv = ["run", "--images", str(folder), "--models", "clip", "--weights", "random"]
    assert main([*argv, "--warehouse", str(tmp_path / "wh")]) == 1
    captured = capsys.readouterr()
    assert "no usable images" in captured.err
    assert "empty file (0 bytes): empty.jpg" in captured.out
    assert "not an image" in captured.out and "notes.jpg" in captured.out
    assert "Traceback" not in captured.out + captured.err
    assert not (tmp_path / "wh" / "attention_maps").exists()


def test_a_failing_model_is_reported_in_one_line_without_traces(tmp_path, tiny_checkpoints, images_copy, capfd):
    broken = tmp_path / "broken"
    broken.mkdir()
    argv = ["run", "--images", str(images_copy(1)), "--models", "clip,mae", "--weights", "pretrained"]
    argv += ["--checkpoint", f"clip={tiny_checkpoints['clip']}", "--checkpoint", f"mae={broken}"]
    assert main([*argv, "--warehouse", str(tmp_path / "wh"), "--device", "cpu"]) == 1
    captured = capfd.readouterr()
    output = captured.out + captured.err
    assert "mae       FAILED: mae checkpoint" in output and "config.json" in output
    assert "mae: mae" not in output
    assert "Traceback" not in output and "Stack Trace" not in output
    assert "clip      1 extracted" in output


def test_serve_starts_the_dashboard_on_a_free_port(tiny_warehouse):
    """`ssl-attention serve --port 0` picks a port, allows its websocket origin, and the app builds there."""
    import json
    import re
    import time
    import urllib.request

    command = [sys.executable, "-m", "ssl_attention.cli", "serve", "--warehouse", str(tiny_warehouse), "--port", "0"]
    server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = server.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/app", line)
        assert match, line
        port = int(match.group(1))
        deadline = time.time() + 90
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                url = f"http://127.0.0.1:{port}/liveness?endpoint=/app"
                with urllib.request.urlopen(url, timeout=10) as response:
                    if json.load(response) == {"/app": True}:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "the dashboard did not come up"
            time.sleep(0.3)
    finally:
        server.terminate()
        server.wait(20)


def test_the_library_core_never_imports_the_pipeline_or_the_dashboard():
    """Only ssl_attention/cli may import pipelines/ or dashboards/ (the rule in its docstring); and it does."""
    import ast

    def imported(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        return names

    package = REPO / "ssl_attention"
    offenders = {
        path.relative_to(REPO).as_posix(): sorted(imported(path) & {"pipelines", "dashboards"})
        for path in package.rglob("*.py")
        if package / "cli" not in path.parents and imported(path) & {"pipelines", "dashboards"}
    }
    assert offenders == {}
    assert "pipelines" in set().union(*(imported(p) for p in (package / "cli").glob("*.py")))
