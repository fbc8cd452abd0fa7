"""Images/s of the Grain input pipeline (resnet_data) against torchvision's ImageFolder + DataLoader.

    python benchmarks/input_pipeline.py --images 400 --workers 2 --json input.json
    python benchmarks/input_pipeline.py --folder DIR --images 2560 --make-only   # just write a folder

Both read the same generated JPEG folder (one folder per class, photo-like images of about
500x375) with the same training transforms, RandomResizedCrop(224) + horizontal flip, to uint8
tensors (torchvision: PILToTensor; normalisation happens on the device in both cases), the same
batch size and the same number of worker processes. Both iterators stay open for the whole run
(torchvision's sampler draws one long epoch, as Grain's stream has none), and the timed passes
alternate between them, round r starting with the r-th, so load from other jobs falls on both
alike. Each pass first takes, untimed, as many batches as the loader can hold ready (its workers
filled them while the other loader was timed), then times --calls batches: steady-state rates.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a file (python benchmarks/input_pipeline.py): make the checkout importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from PIL import Image

from benchmarks.common import cpu_model

# Images/s one H200 trains ResNet-50 at in bf16 (MLPerf-class software reaches about 8,000): what
# the input pipeline must feed per GPU.
GPU_IMAGES_PER_S = 8000
# Generated images: photo-like (smooth colour fields plus sensor-like noise), ImageNet-like sizes.
WIDTHS, HEIGHTS = (400, 500), (300, 375)
JPEG_QUALITY = 90
CLASSES = 10
IMPLS = ("grain", "torchvision")
# torchvision's epoch, in passes over the folder: long enough that no run reaches its end.
LONG_EPOCH = 1000
# Batches each worker of either loader may hold ready (Grain: 2 finished + 1 in its read buffer;
# torchvision: prefetch_factor 2), plus one.
READY_PER_WORKER = 4


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", type=Path, help="image folder to read (written first when empty or missing)")
    p.add_argument("--images", type=int, default=400, help="images to generate (default 400)")
    p.add_argument("--make-only", action="store_true", help="only write the folder, measure nothing")
    p.add_argument("--workers", type=int, default=2, help="worker processes of each loader (default 2)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--size", type=int, default=224, help="crop side (default 224)")
    p.add_argument("--calls", type=int, default=8, help="batches per timed pass (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per loader; the median counts (default 3)")
    p.add_argument("--json", help="write every figure, the machine and versions to this file")
    args = p.parse_args(argv)
    if args.make_only and args.folder is None:
        p.error("--make-only needs --folder")
    return args


def write_image(root: Path, index: int, seed: int = 0) -> None:
    """Image `index` of a generated folder, in class folder index % CLASSES: a smooth field in the class's own
    colour (so that a model can learn the classes) mixed with random colours and noise, 400-500 x 300-375."""
    label = index % CLASSES
    tint = np.random.default_rng([seed, CLASSES]).integers(0, 256, (CLASSES, 3))[label]
    rng = np.random.default_rng([seed, index])
    width, height = int(rng.integers(*WIDTHS, endpoint=True)), int(rng.integers(*HEIGHTS, endpoint=True))
    colours = (rng.integers(0, 256, (12, 16, 3)) + tint) // 2
    field = Image.fromarray(colours.astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    noisy = np.asarray(field, np.float32) + rng.normal(0, 8, (height, width, 3))
    folder = root / f"class_{label:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"{index:06d}.jpg", quality=JPEG_QUALITY)


def write_folder(root: Path, indices: range, seed: int = 0) -> None:
    """Images `indices` of a generated folder (each a function of (seed, index): parts can be written apart)."""
    for i in indices:
        write_image(root, i, seed)


def grain_batches(root: Path, args: argparse.Namespace) -> Generator[Any, None, None]:
    """The trainer's pipeline: resnet_data's Grain stream over the folder."""
    import grain

    from resnet_data.folders import list_files
    from resnet_data.pipeline import BatchStream, train_batches

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = list_files(root, classes, every_class=True)
    batches = train_batches(files, args.size, True, args.batch, 0, grain.sharding.ShardOptions(0, 1))
    stream = BatchStream(batches, args.workers)
    try:
        yield from stream
    finally:
        stream.close()


def torchvision_batches(root: Path, args: argparse.Namespace) -> Generator[Any, None, None]:
    """torchvision's ImageFolder + DataLoader with the same transforms, to uint8 tensors."""
    import torch
    from torchvision import datasets, transforms

    train = transforms.Compose(
        [transforms.RandomResizedCrop(args.size), transforms.RandomHorizontalFlip(), transforms.PILToTensor()]
    )
    folder = datasets.ImageFolder(str(root), transform=train)
    loader = torch.utils.data.DataLoader(
        folder,
        batch_size=args.batch,
        sampler=torch.utils.data.RandomSampler(folder, num_samples=LONG_EPOCH * len(folder)),
        num_workers=args.workers,
        drop_last=True,
    )
    yield from loader


def machine() -> dict[str, Any]:
    """CPU model and cores, load, and the versions of the libraries measured."""
    import grain
    import PIL
    import torch
    import torchvision

    return {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "versions": {
            "python": platform.python_version(),
            "grain": grain.__version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "pillow": PIL.__version__,
        },
    }


def measure(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Alternating passes: the ready batches drained untimed, then --calls batches timed; images/s per loader."""
    sources = {"grain": grain_batches(root, args), "torchvision": torchvision_batches(root, args)}
    ready = READY_PER_WORKER * max(args.workers, 1)
    firsts = {}
    for impl, source in sources.items():  # worker start-up, timed apart
        start = time.perf_counter()
        next(source)
        firsts[impl] = time.perf_counter() - start
    rates: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for r in range(args.repeats):
        for impl in IMPLS[r % len(IMPLS) :] + IMPLS[: r % len(IMPLS)]:
            for _ in range(ready):
                next(sources[impl])
            start = time.perf_counter()
            for _ in range(args.calls):
                next(sources[impl])
            rates[impl].append(args.calls * args.batch / (time.perf_counter() - start))
    for source in sources.values():
        source.close()
    results = []
    for impl in IMPLS:
        rate = statistics.median(rates[impl])
        per_worker = rate / max(args.workers, 1)
        results.append(
            {
                "impl": impl,
                "images_per_s": rate,
                "images_per_s_per_worker": per_worker,
                "images_per_s_all": rates[impl],
                "first_batch_s": firsts[impl],
                "workers_per_gpu": math.ceil(GPU_IMAGES_PER_S / per_worker),
            }
        )
    by_impl = {r["impl"]: r["images_per_s"] for r in results}
    return {"results": results, "ratio_grain_to_torchvision": by_impl["grain"] / by_impl["torchvision"]}


def format_report(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"{s['images']} JPEGs, batch {s['batch']}, {s['workers']} workers each, RandomResizedCrop({s['size']}) + flip, "
        f"uint8; median of {s['repeats']} alternating passes of {s['calls']} batches (after the ready ones)",
        f"{'loader':<12} {'images/s':>9} {'per worker':>11} {'workers for ' + str(GPU_IMAGES_PER_S) + ' img/s':>24}",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['impl']:<12} {r['images_per_s']:9.1f} {r['images_per_s_per_worker']:11.1f} {r['workers_per_gpu']:24d}"
        )
    lines.append(f"grain / torchvision: {report['ratio_grain_to_torchvision']:.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.folder or Path(scratch) / "images"
        if not (root.exists() and any(root.iterdir())):
            write_folder(root, range(args.images))
        if args.make_only:
            print(f"wrote {args.images} JPEGs to {root}")
            return 0
        settings = {k: v for k, v in vars(args).items() if k not in ("folder", "json", "make_only")}
        settings["images"] = sum(1 for _ in root.rglob("*.jpg"))
        report = {"settings": settings, "machine": machine(), **measure(root, args)}
    print(format_report(report))
    if args.json:
        from parity.checks.report import write_json

        write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
