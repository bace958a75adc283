"""Extraction per image against the bare eager forward at the same input size, at 196, 576 and 1,369 tokens.

For each model (base-size architecture, seeded random init) and each patch count P (a square grid of
sqrt(P) x sqrt(P) patches: 224/384/592 px at patch 16, 196/336/518 px at patch 14; the CNN at the patch-16
sizes), a fresh process loads the model at ``resolution = sqrt(P) * patch`` and measures:
  bare       = module(**inputs, output_attentions=True) on already preprocessed batches of that size
               (ResNet-50: forward + backward, what Grad-CAM needs);
  extraction = ssl_attention.extraction.extract_model of the same images into an empty warehouse
               (decoding, preprocessing, the forward pass, every method's maps, Parquet writing);
  peak       = peak memory of the extraction: CUDA max_memory_allocated, or on the CPU the growth of the
               process's peak resident memory (VmHWM) over the loaded model.
Batches are planned by the token budget (``--token-budget``), as the extraction plans them. Goal: ratio <= 1.15.

Bare and extraction alternate, ``--repeats`` times each; the fastest of each is kept (other load on the machine
only ever adds time, so the minimum is the least disturbed measurement). ``--wait-load X`` waits before each
model and size until the 1-minute load average is below X (up to 30 minutes), and every row records the load
average at its end (the bench itself adds about 2 on the CPU).

    python bench/resolution_overhead.py [--tokens 196,576,1369] [--images 8] [--models all] [--device auto]
        [--wait-load 0.5] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SAMPLES = BENCH.parent / "data" / "samples"


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def make_square_images(folder: Path, count: int) -> None:
    """``count`` distinct square photographs (centre squares of the samples, shifted), so that a shorter side
    of N px gives an N x N input and exactly (N / patch)² patches."""
    import numpy as np
    from PIL import Image

    sources = sorted(SAMPLES.glob("*.jpg"))
    for index in range(count):
        image = Image.open(sources[index % len(sources)]).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        array = np.roll(np.asarray(image.crop((left, top, left + side, top + side))), shift=index * 7, axis=1)
        Image.fromarray(array).save(folder / f"img_{index:03d}.jpg", quality=90)


def child(slug: str, tokens: int, count: int, repeats: int, device: str, token_budget: int) -> None:
    import torch
    from PIL import Image

    from ssl_attention.extraction import catalog_images, extract_model, plan_batches, read_catalog_records
    from ssl_attention.models.adapters import ViTAdapter
    from ssl_attention.models.loading import LoadRequest, load_model
    from ssl_attention.models.weights import CONFIG_DIR

    config = json.loads((CONFIG_DIR / slug / "config.json").read_text())
    patch = int(config.get("patch_size", 16))  # random mode builds from these files; the CNN at patch-16 sizes
    side = math.isqrt(tokens)
    adapter = load_model(slug, LoadRequest(weights="random", device=device, resolution=side * patch))
    cuda = adapter.device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(adapter.device)

    def bare(pixel_values: torch.Tensor) -> None:
        if isinstance(adapter, ViTAdapter):
            with torch.inference_mode():
                adapter.module(**adapter.model_inputs(pixel_values), output_attentions=True)
        else:
            inputs = pixel_values.detach().requires_grad_(True)
            adapter.module(inputs).max(dim=1).values.sum().backward()

    with tempfile.TemporaryDirectory(prefix="ssl_attention_res_") as workdir:
        folder = Path(workdir) / "images"
        folder.mkdir()
        make_square_images(folder, count)
        catalog = Path(workdir) / "catalog"
        catalog_images(folder, catalog)
        records = read_catalog_records(catalog, folder)
        batches = plan_batches(adapter, records, batch_size=count, token_budget=token_budget)
        pixels = [adapter.pixel_values([Image.open(r.path).convert("RGB") for r in batch]) for batch in batches]
        assert pixels[0].shape[-2:] == (side * patch, side * patch), pixels[0].shape
        loaded = _status_kib("VmRSS")
        bare(pixels[0])  # warm-up
        sync()
        bare_runs, extract_runs = [], []
        peak = 0
        for repeat in range(repeats):
            start = time.perf_counter()
            for pixel_values in pixels:
                bare(pixel_values)
            sync()
            bare_runs.append((time.perf_counter() - start) / count)
            if cuda:
                torch.cuda.reset_peak_memory_stats(adapter.device)
            start = time.perf_counter()
            report = extract_model(
                adapter, records, Path(workdir) / f"wh{repeat}", batch_size=count, token_budget=token_budget
            )
            sync()
            extract_runs.append((time.perf_counter() - start) / count)
            assert report.images_extracted == count, report
            peak = max(peak, torch.cuda.max_memory_allocated(adapter.device) if cuda else 0)
        if not cuda:
            peak = (_status_kib("VmHWM") - loaded) * 1024
        result = {
            "bare_ms": min(bare_runs) * 1e3,
            "extract_ms": min(extract_runs) * 1e3,
            "peak_mib": peak / 2**20,
            "batch": max(len(b) for b in batches),
            "device": adapter.device.type,
            "tokens": adapter.sequence_length(side * patch, side * patch),
            "load": os.getloadavg()[0],
        }
        print(json.dumps(result))


def wait_for_quiet(threshold: float, limit_s: float = 1800.0) -> None:
    """Sleep until the 1-minute load average is below ``threshold`` (or ``limit_s`` passed)."""
    deadline = time.monotonic() + limit_s
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        time.sleep(5)


def main() -> None:
    from ssl_attention.extraction import DEFAULT_TOKEN_BUDGET
    from ssl_attention.registry import parse_model_list

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="196,576,1369", help="patch counts, each a perfect square")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="all")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--token-budget", type=int, default=DEFAULT_TOKEN_BUDGET)
    parser.add_argument("--wait-load", type=float, default=None, help="wait for a 1-minute load below this")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table at the end")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.images, args.repeats, args.device, args.token_budget)
        return
    counts = [int(t) for t in args.tokens.split(",")]
    bad = [t for t in counts if math.isqrt(t) ** 2 != t]
    if bad:
        parser.error(f"--tokens must be perfect squares (a square grid), got {bad}")
    rows = []
    print(
        f"{'model':14s} {'patches':>7s} {'T':>5s} {'batch':>5s} {'bare ms/img':>11s} {'extract ms/img':>14s} "
        f"{'ratio':>6s} {'peak MiB':>9s} {'load':>5s}"
    )
    for slug in parse_model_list(args.models):
        for tokens in counts:
            command = [sys.executable, __file__, "--child", slug, str(tokens), "--images", str(args.images)]
            command += ["--repeats", str(args.repeats), "--device", args.device]
            command += ["--token-budget", str(args.token_budget)]
            if args.wait_load is not None:
                wait_for_quiet(args.wait_load)
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"{slug:14s} {tokens:7d} FAILED: {done.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            ratio = result["extract_ms"] / result["bare_ms"]
            rows.append((slug, tokens, result, ratio))
            print(
                f"{slug:14s} {tokens:7d} {result['tokens']:5d} {result['batch']:5d} {result['bare_ms']:11.1f} "
                f"{result['extract_ms']:14.1f} {ratio:6.2f} {result['peak_mib']:9.0f} {result['load']:5.1f}"
                f"  [{result['device']}]",
                flush=True,
            )
    if args.markdown:
        print("\n| model | patches | tokens T | batch | bare ms/img | extract ms/img | ratio | peak MiB | load |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for slug, tokens, result, ratio in rows:
            print(
                f"| {slug} | {tokens} | {result['tokens']} | {result['batch']} | {result['bare_ms']:.1f} "
                f"| {result['extract_ms']:.1f} | {ratio:.2f} | {result['peak_mib']:.0f} | {result['load']:.1f} |"
            )


if __name__ == "__main__":
    main()
