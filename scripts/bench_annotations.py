"""Speed of the validation pass (pinet_lightning.core.annotations) and of the start-up image check.

    python scripts/bench_annotations.py                  # CrowdPose val + a COCO-sized dict
    python scripts/bench_annotations.py --annotations 150000 --images 64000 --files 5000

Prints: the validation of ../shared/data/crowdpose_val.json (when present), of a synthetic
COCO-train-sized dict (17 keypoints; a few records left without bbox / num_keypoints so the
fill-in path runs too), pycocotools' own indexing of the same dict for scale, and the start-up
check of image files (present, not a folder, JPEG end marker) per 1000 files.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from pycocotools.coco import COCO

from pinet_lightning.core.annotations import validate_coco_keypoints
from pinet_lightning.data.datasets import check_image_files

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "crowdpose_val.json"


def synthetic_dict(num_annotations: int, num_images: int, k: int = 17, seed: int = 0) -> dict:
    """A COCO-train-like dict: random people spread over the images."""
    rng = np.random.default_rng(seed)
    images = [{"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "height": 480, "width": 640}
              for i in range(num_images)]
    xy = rng.uniform(0, 600, (num_annotations, k, 2)).round(1)
    vis = rng.integers(0, 3, (num_annotations, k, 1)).astype(float)
    kps = np.concatenate([xy, vis], 2).reshape(num_annotations, -1).tolist()
    image_ids = rng.integers(1, num_images + 1, num_annotations).tolist()
    anns = []
    for i in range(num_annotations):
        anns.append({"id": i + 1, "image_id": image_ids[i], "category_id": 1, "iscrowd": 0,
                     "keypoints": kps[i], "num_keypoints": int((vis[i] > 0).sum()),
                     "bbox": [10.0, 20.0, 100.0, 200.0], "area": 20000.0})
    for ann in anns[::1000]:  # the fill-in path
        del ann["bbox"], ann["num_keypoints"]
    cats = [{"id": 1, "name": "person", "keypoints": [f"k{i}" for i in range(k)]}]
    return {"images": images, "annotations": anns, "categories": cats}


def timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", type=int, default=150_000)
    parser.add_argument("--images", type=int, default=64_000)
    parser.add_argument("--files", type=int, default=5000, help="image files to check")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    if SHARED.is_file():
        data = json.loads(SHARED.read_text())
        t = timed(lambda: validate_coco_keypoints(data, SHARED.name, 14), args.repeat)
        print(f"crowdpose_val.json ({len(data['images'])} images, {len(data['annotations'])} "
              f"annotations): validation {t * 1000:.0f} ms")
    data = synthetic_dict(args.annotations, args.images)
    t = timed(lambda: validate_coco_keypoints(data, "synthetic", 17), args.repeat)
    print(f"synthetic dict ({args.images} images, {args.annotations} annotations, K=17): "
          f"validation {t:.2f} s")

    def index() -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO()
            coco.dataset = data
            coco.createIndex()

    print(f"  for scale, pycocotools createIndex of the same dict: "
          f"{timed(index, args.repeat):.2f} s")


    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        jpeg = cv2.imencode(".jpg", np.full((480, 640, 3), 90, np.uint8))[1].tobytes()
        records = []
        for i in range(args.files):
            (folder / f"{i}.jpg").write_bytes(jpeg)
            records.append({"id": i, "file_name": f"{i}.jpg"})
        t = timed(lambda: check_image_files(folder, records, "bench"), args.repeat)
        print(f"start-up image check: {t / args.files * 1e6:.0f} us a file "
              f"({t / args.files * 1000 * 1000:.0f} ms per 1000 files, warm page cache)")


if __name__ == "__main__":
    main()
