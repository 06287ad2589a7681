"""Input pipeline speed: dense vs sparse training targets, from the loader workers to the
device (issue 12).

Writes ``--images`` synthetic crowd JPEGs of 512 x 512 (``generate_synthetic_crowd``, 10-14
people an image, CrowdPose layout) to a temporary folder, builds ``PINetDataModule``'s train
loader on them (batch 20, augmentation on) once per target format, ``codec.sparse``
false (dense maps) and true (Omega's entries and the Gaussian windows), and prints, side by
side:

1. per format and number of workers (0, 1, 2): samples/s through the loader (the first
   batch, with the worker start-up, not counted), the bytes per sample of the collated batch
   (what crosses the worker boundary when there are workers: the collate runs in the worker),
   and the main process's CPU time per batch (with workers: receiving the batch; with 0
   workers it also loads the samples).
2. the main-process time per batch of 20, timed on 20 samples loaded beforehand (median of
   ``--repeat``): ``train_collate`` + pin memory, and the host-to-device copy on a GPU. On a
   machine without CUDA memory cannot be pinned: a plain copy of every tensor stands in for
   it (the same bytes moved, without page locking) and host-to-device is "not measured".

    python scripts/bench_loader.py                          # 512 images, 0/1/2 workers
    python scripts/bench_loader.py --images 100 --batches 3 --workers 0 2   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pinet_lightning.codec.batch import train_collate
from pinet_lightning.codec.codec import PINetCodec
from pinet_lightning.data.datamodule import PINetDataModule
from pinet_lightning.data.synthetic import generate_synthetic_crowd

BAR_BYTES = 0.2e6  # bytes of targets per sample at 512
BAR_RATIO = 10.0  # main-process time per batch, dense / sparse
FORMATS = {"dense": False, "sparse": True}


def tensor_bytes(batch: dict[str, Any], skip: tuple[str, ...] = ()) -> int:
    """Bytes of the tensors of a batch (what pickling it through a worker queue moves)."""
    return sum(v.numel() * v.element_size() for k, v in batch.items()
               if isinstance(v, torch.Tensor) and k not in skip)


def pin(batch: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """Pinned copies of the batch's tensors (a plain copy without CUDA, see the docstring)."""
    if cuda:
        return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
           for k, v in batch.items()}
    torch.cuda.synchronize(device)
    return out


def main_process_time(samples: list[dict], repeat: int, device: torch.device | None
                      ) -> dict[str, float]:
    """Median ms of collate, pin (or its stand-in) and host-to-device for one batch."""
    parts: dict[str, list[float]] = {"collate": [], "pin": [], "h2d": []}
    cuda = device is not None
    for _ in range(repeat + 1):  # the first pass warms allocators up, not counted
        t0 = time.perf_counter()
        batch = train_collate(samples)
        t1 = time.perf_counter()
        pinned = pin(batch, cuda)
        t2 = time.perf_counter()
        if cuda:
            to_device(pinned, device)
        t3 = time.perf_counter()
        for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            parts[key].append(value * 1e3)
        del batch, pinned
    return {key: statistics.median(v[1:]) for key, v in parts.items()}


def run_loader(dm: PINetDataModule, workers: int, batches: int) -> dict[str, float]:
    """Samples/s, bytes per sample and main-process CPU ms per batch of the train loader."""
    dm.num_workers = workers
    loader = dm.train_dataloader()
    it = iter(loader)
    first = next(it)  # worker start-up and the first batch are not counted
    size = first["image"].shape[0]
    total, targets = tensor_bytes(first) / size, tensor_bytes(first, ("image",)) / size
    del first
    n = 0
    cpu, wall = time.process_time(), time.perf_counter()
    for _, batch in zip(range(batches), it, strict=False):
        n += batch["image"].shape[0]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    del it, loader
    return {"samples_s": n / wall, "bytes": total, "target_bytes": targets,
            "cpu_ms": cpu / max(n / size, 1) * 1e3, "batches": n // size}


def fmt_mb(value: float) -> str:
    return f"{value / 1e6:.3f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="synthetic 512 images to write")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--batches", type=int, default=None,
                        help="timed batches per loader run (default: all after the first)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeat", type=int, default=10, help="collate + pin timings (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, args.threads))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else None
    batches = args.batches or max(args.images // args.batch_size - 1, 1)
    gpu = f"GPU {torch.cuda.get_device_name()}" if cuda else "no GPU"
    steps = ("collate + pin memory + host-to-device" if cuda else
             "collate + a copy standing in for pin memory (no CUDA: host-to-device not measured)")

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        annotations = generate_synthetic_crowd(tmp, num_images=args.images, image_size=512,
                                               min_people=10, max_people=14, overlap=0.5,
                                               layout="crowdpose", seed=args.seed)
        data = json.loads(Path(annotations).read_text())
        people = len(data["annotations"]) / max(len(data["images"]), 1)
        print(f"bench_loader: {args.images} synthetic 512 x 512 JPEGs on disk ({people:.1f} "
              f"people an image, CrowdPose layout; written in {time.perf_counter() - t:.1f} s), "
              f"batch {args.batch_size}, torch threads {torch.get_num_threads()}, "
              f"{os.cpu_count()} CPUs, {gpu}")
        modules = {}
        for name, sparse in FORMATS.items():
            dm = PINetDataModule(codec=PINetCodec("crowdpose", input_size=512, sparse=sparse),
                                 train={"images": Path(tmp) / "images", "annotations": annotations},
                                 batch_size=args.batch_size, num_workers=0, pin_memory=cuda,
                                 persistent_workers=False)
            dm.setup("fit")
            modules[name] = dm

        print(f"\n1. train loader, {batches} timed batches a run (pin_memory={cuda})")
        print(f"   {'format':7} {'workers':>7} {'samples/s':>10} {'bytes/sample':>14} "
              f"{'of it targets':>14} {'main CPU ms/batch':>18}")
        rows: dict[tuple[str, int], dict[str, float]] = {}
        for workers in args.workers:
            for name, dm in modules.items():
                torch.manual_seed(args.seed)
                r = rows[name, workers] = run_loader(dm, workers, batches)
                print(f"   {name:7} {workers:7d} {r['samples_s']:10.1f} {fmt_mb(r['bytes']):>14} "
                      f"{fmt_mb(r['target_bytes']):>14} {r['cpu_ms']:18.1f}", flush=True)
        for workers in args.workers:
            d, s = rows["dense", workers], rows["sparse", workers]
            speed = s["samples_s"] / d["samples_s"]
            print(f"   {workers} workers: sparse / dense samples/s {speed:.2f}; bytes per "
                  f"sample dense / sparse {d['bytes'] / s['bytes']:.1f}x "
                  f"(targets alone {d['target_bytes'] / s['target_bytes']:.0f}x)")

        print(f"\n2. main-process time per batch of {args.batch_size} (median of {args.repeat}; "
              f"{steps})")
        times = {}
        for name, dm in modules.items():
            torch.manual_seed(args.seed)
            ds = dm.train_dataset
            samples = [ds[i % len(ds)] for i in range(args.batch_size)]
            times[name] = tm = main_process_time(samples, args.repeat, device)
            total = sum(tm.values())
            h2d = f", host-to-device {tm['h2d']:.2f}" if cuda else ""
            print(f"   {name:7} {total:8.2f} ms (collate {tm['collate']:.2f}, "
                  f"{'pin' if cuda else 'copy'} {tm['pin']:.2f}{h2d})", flush=True)
            del samples
        dense_ms, sparse_ms = (sum(times[n].values()) for n in ("dense", "sparse"))
        ratio = dense_ms / sparse_ms

        first = args.workers[0]
        target_bytes = rows["sparse", first]["target_bytes"]
        print("\nacceptance (issue 12):")
        print(f"   targets per sample, sparse: {fmt_mb(target_bytes)} "
              f"(bar {fmt_mb(BAR_BYTES)}: {'met' if target_bytes <= BAR_BYTES else 'NOT met'}); "
              f"with the uint8 image: {fmt_mb(rows['sparse', first]['bytes'])} "
              f"(dense {fmt_mb(rows['dense', first]['bytes'])})")
        print(f"   main-process time per batch, dense / sparse: {ratio:.1f}x "
              f"(bar {BAR_RATIO:.0f}x: {'met' if ratio >= BAR_RATIO else 'NOT met'})")
        if not cuda:
            print("   host-to-device: not measured (no GPU)")


if __name__ == "__main__":
    main()
