"""Target generation speed: ``encode_targets`` on real crowded CrowdPose people, and one data
loader worker (augmentation + targets) on synthetic 512 images.

1. ``encode_targets`` on the N most crowded images of the CrowdPose validation annotations
   (most people, about 13 each for N = 200), keypoints scaled so the longer image side spans
   the 128-cell output map, areas in 512-input pixels. Prints ms per sample (wall, best of
   ``--repeat`` passes, and the CPU time of that pass) against the published implementation's
   ~40 ms per sample and the 2 ms bar, the memory floor (allocating and zeroing the ~13 MB
   of dense outputs alone, which bounds any dense encoder on a busy machine) and the
   ``offsets_format="omega"`` variant that returns Omega's entries instead.
2. One loader worker: ``CocoKeypointDataset`` (train mode: read, augment, ignore mask,
   targets) on ``generate_synthetic_crowd`` images of 512, in process and through a
   ``DataLoader`` with ``num_workers=1``; prints samples/s and the share spent in targets.

    python scripts/bench_targets.py
    python scripts/bench_targets.py --annotations ../shared/data/crowdpose_val.json \
        --images 200 --repeat 5 --synthetic 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from pinet_lightning.codec.codec import PINetCodec
from pinet_lightning.codec.targets import PINetTargetCodec, encode_targets
from pinet_lightning.core.layouts import get_layout
from pinet_lightning.core.people import is_person
from pinet_lightning.data.datasets import CocoKeypointDataset
from pinet_lightning.data.synthetic import generate_synthetic_crowd

PUBLISHED_MS = 40.0  # the published implementation, per sample (loop-based target code)
BAR_MS = 2.0
REPO = Path(__file__).resolve().parents[1]


def crowded_samples(path: Path, count: int, output: int = 128, stride: int = 4):
    """(keypoints in output cells, areas in input pixels) of the ``count`` images with the
    most annotated people (ties: higher crowdIndex)."""
    data = json.loads(path.read_text())
    anns = defaultdict(list)
    for a in data["annotations"]:
        if is_person(a):  # the training rule (CrowdPose val: its 106 crowd regions are not)
            anns[a["image_id"]].append(a)
    k = len(data["categories"][0]["keypoints"])
    images = sorted(data["images"],
                    key=lambda im: (-len(anns[im["id"]]), -im.get("crowdIndex", 0), im["id"]))
    samples = []
    for im in images[:count]:
        scale = output / max(im["width"], im["height"])
        kp = np.array([a["keypoints"] for a in anns[im["id"]]], np.float64).reshape(-1, k, 3)
        kp[..., :2] *= scale
        areas = np.array([a["bbox"][2] * a["bbox"][3] for a in anns[im["id"]]]) * (
            stride * scale
        ) ** 2
        samples.append((kp, areas))
    return samples


def _blank_outputs(k: int, p: int, size: int) -> list[np.ndarray]:
    """Zeroed outputs of encode_targets' sizes, every memory page written once (the kernel
    or the allocator zeroes a page when it is first used)."""
    hw = size * size
    out = [np.zeros((k + p) * hw, np.float32), np.full((k + p) * hw, 0.1, np.float32),
           np.zeros(p * k * 2 * hw, np.float32), np.zeros(p * k * 2 * hw, np.float32)]
    for a in out:
        a[::1024] = 0.0  # one float32 per 4 KiB page
    return out


def bench_encode(path: Path, count: int, repeat: int) -> float:
    layout = get_layout("crowdpose")
    samples = crowded_samples(path, count)
    people = np.mean([len(kp) for kp, _ in samples])
    visible = np.mean([(kp[..., 2] > 0).sum() for kp, _ in samples])
    for kp, areas in samples[:10]:  # warm up (allocator, caches)
        encode_targets(kp, areas, layout, (128, 128))
    walls, cpus, floors, omegas = [], [], [], []
    for _ in range(repeat):
        c, t = time.process_time(), time.perf_counter()
        for kp, areas in samples:
            encode_targets(kp, areas, layout, (128, 128))
        walls.append((time.perf_counter() - t) / len(samples) * 1e3)
        cpus.append((time.process_time() - c) / len(samples) * 1e3)
        # The floor any dense encoder pays: filling the 6 output arrays (about 13 MB a
        # sample, 11 MB of them offsets and weights) with zeros / the background weight.
        c, t = time.process_time(), time.perf_counter()
        for _ in samples:
            _blank_outputs(layout.num_keypoints, layout.num_parts, 128)
        floors.append(((time.perf_counter() - t) / len(samples) * 1e3,
                       (time.process_time() - c) / len(samples) * 1e3))
        c, t = time.process_time(), time.perf_counter()
        for kp, areas in samples:
            encode_targets(kp, areas, layout, (128, 128), offsets_format="omega")
        omegas.append(((time.perf_counter() - t) / len(samples) * 1e3,
                       (time.process_time() - c) / len(samples) * 1e3))
    best = min(walls)
    print(f"encode_targets: {len(samples)} most crowded images of {path.name}, "
          f"{people:.2f} people and {visible:.1f} labelled keypoints each, 128 x 128 map")
    print(f"  ms/sample  best {best:.3f}   median {statistics.median(walls):.3f}   "
          f"cpu (that pass) {cpus[walls.index(best)]:.3f}   ({repeat} passes)")
    floor, floor_cpu = min(floors)
    cpu = cpus[walls.index(best)]
    print(f"  memory floor (zeroed dense outputs alone, ~13 MB): {floor:.3f} ms "
          f"(cpu {floor_cpu:.3f}); above it, computing the targets: {best - floor:.3f} ms "
          f"(cpu {cpu - floor_cpu:.3f})")
    omega, omega_cpu = min(omegas)
    print(f"  offsets_format='omega' (Omega entries instead of the 11 MB dense offsets and "
          f"weights): {omega:.3f} ms (cpu {omega_cpu:.3f}), {PUBLISHED_MS / omega:.0f}x the "
          f"published; bar {'met' if omega <= BAR_MS else 'NOT met'}")
    print(f"  vs published ~{PUBLISHED_MS:.0f} ms/sample: {PUBLISHED_MS / best:.1f}x faster; "
          f"bar {BAR_MS} ms: {'met' if best <= BAR_MS else 'NOT met'} "
          f"({best / BAR_MS:.2f} of the bar)")
    return best


def bench_worker(num_images: int, passes: int) -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        ann = generate_synthetic_crowd(tmp, num_images=num_images, image_size=512, min_people=2,
                                       max_people=8, overlap=0.5, layout="crowdpose", seed=0)
        print(f"loader worker: {num_images} synthetic 512 images "
              f"(generated in {time.perf_counter() - t:.1f} s), augmentation on")
        ds = CocoKeypointDataset(Path(tmp) / "images", ann, codec=PINetCodec("crowdpose"),
                                 train=True)

        # time spent in the codec, measured by wrapping the dataset's codec
        spent = [0.0]
        codec: PINetTargetCodec = ds.codec

        class Timed:
            def encode(self, *args, **kwargs):
                s = time.perf_counter()
                out = codec.encode(*args, **kwargs)
                spent[0] += time.perf_counter() - s
                return out

        ds.codec = Timed()
        ds[0]
        spent[0] = 0.0
        t = time.perf_counter()
        n = 0
        for _ in range(passes):
            for i in range(len(ds)):
                ds[i]
                n += 1
        wall = time.perf_counter() - t
        print(f"  in process: {n / wall:.1f} samples/s ({wall / n * 1e3:.2f} ms/sample, "
              f"targets {spent[0] / n * 1e3:.2f} ms = {spent[0] / wall:.0%})")
        ds.codec = codec

        loader = DataLoader(ds, batch_size=8, num_workers=1, shuffle=False,
                            persistent_workers=False)
        it = iter(loader)
        next(it)  # worker start-up and first batch are not counted
        t = time.perf_counter()
        n = 0
        for batch in it:
            n += batch["image"].shape[0]
        for _ in range(passes - 1):
            for batch in loader:
                n += batch["image"].shape[0]
        wall = time.perf_counter() - t
        print(f"  DataLoader(num_workers=1, batch 8): {n / wall:.1f} samples/s "
              f"(includes worker start-up of later passes and collation)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotations", type=Path,
                        default=REPO.parent / "shared" / "data" / "crowdpose_val.json",
                        help="CrowdPose-format json (default ../shared/data/crowdpose_val.json)")
    parser.add_argument("--images", type=int, default=200, help="most crowded images to encode")
    parser.add_argument("--repeat", type=int, default=5, help="timed passes over them")
    parser.add_argument("--synthetic", type=int, default=32,
                        help="synthetic 512 images for the loader worker (0: skip)")
    parser.add_argument("--passes", type=int, default=2, help="passes over synthetic images")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (2 at most here)")
    args = parser.parse_args()

    torch.set_num_threads(max(1, min(args.threads, 2)))
    if not args.annotations.is_file():
        raise SystemExit(f"{args.annotations} not found: pass --annotations <CrowdPose json>")
    bench_encode(args.annotations, args.images, args.repeat)
    if args.synthetic > 0:
        bench_worker(args.synthetic, args.passes)


if __name__ == "__main__":
    main()
