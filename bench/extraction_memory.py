"""Peak memory of an extraction against the number of images, per model, measured in one run.

Memory must not grow with the number of images: one batch's attentions at a time (plus at most one batch
waiting for the writer). For each model (base-size architecture, seeded random init) and each image count, a
fresh process loads the model, extracts every image into an empty warehouse and reports its resident memory
after loading the model and its peak (VmHWM) over the whole run. The growth of the peak over the loaded model
should stay flat as the count triples (the first batches warm up allocator pools, so compare the larger counts).

    python bench/extraction_memory.py [--counts 16,64,192] [--models clip,dinov2,resnet50] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def child(slug: str, count: int, batch_size: int) -> None:
    sys.path.insert(0, str(BENCH))
    from extraction_overhead import make_images

    from ssl_attention.extraction import catalog_images, extract_model, read_catalog_records
    from ssl_attention.models.loading import LoadRequest, load_model

    with tempfile.TemporaryDirectory(prefix="ssl_attention_mem_") as workdir:
        folder = Path(workdir) / "images"
        folder.mkdir()
        make_images(folder, count)
        warehouse = Path(workdir) / "warehouse"
        catalog_images(folder, warehouse)
        records = read_catalog_records(warehouse, folder)
        adapter = load_model(slug, LoadRequest(weights="random", device="cpu"))
        loaded = _status_kib("VmRSS")
        report = extract_model(adapter, records, warehouse, batch_size=batch_size)
        assert report.images_extracted == count, report
        print(json.dumps({"loaded_kib": loaded, "peak_kib": _status_kib("VmHWM"), "rows": report.rows_extracted}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="16,64,192")
    parser.add_argument("--models", default="clip,dinov2,resnet50")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.batch_size)
        return

    counts = [int(c) for c in args.counts.split(",")]
    print(f"batch {args.batch_size}, CPU, one fresh process per (model, count); MiB")
    print(f"{'model':9s} {'images':>6s} {'rows':>7s} {'loaded':>7s} {'peak':>7s} {'growth':>7s}")
    for slug in args.models.split(","):
        growth = {}
        for count in counts:
            command = [sys.executable, __file__, "--child", slug, str(count), "--batch-size", str(args.batch_size)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            loaded, peak = result["loaded_kib"] / 1024, result["peak_kib"] / 1024
            growth[count] = peak - loaded
            print(
                f"{slug:9s} {count:6d} {result['rows']:7d} {loaded:7.0f} {peak:7.0f} {peak - loaded:7.0f}", flush=True
            )
        for low, high in itertools.pairwise(counts):
            ratio = growth[high] / growth[low]
            print(f"{slug:9s} growth over the loaded model, {high} vs {low} images ({high / low:.0f}x): {ratio:.2f}x")


if __name__ == "__main__":
    main()
