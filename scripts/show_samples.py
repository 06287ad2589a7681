"""Draw raw synthetic images and augmented training samples with their keypoints, skeleton and
part-heatmap targets; save a PNG grid.

    python scripts/show_samples.py [--out outputs/samples.png] [--data DIR] [--num 4]

Top row: raw synthetic images (green: visible, red: occluded keypoints). Bottom row: the same
images after the training augmentation (keypoints re-ordered after flips; the left side of
each person is drawn in orange, the right in blue) with the part heatmaps tinted in, the
pixels the heatmap loss ignores (padding, ignore regions) tinted red, and the drawn crop
written in the corner: u (crop side / short side; magnification 1/u) and the shift of its
centre in crop sides.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import torch

from pinet_lightning.codec.codec import PINetCodec
from pinet_lightning.core.layouts import Layout
from pinet_lightning.data.datasets import CocoKeypointDataset
from pinet_lightning.data.synthetic import generate_synthetic_crowd

LEFT, RIGHT, MID = (255, 140, 0), (0, 120, 255), (255, 255, 255)


def draw_people(image: np.ndarray, keypoints: np.ndarray, layout: Layout) -> np.ndarray:
    """Skeleton lines coloured by side, keypoints coloured by visibility (RGB image)."""
    out = image.copy()
    side = [LEFT if n.startswith("left") else RIGHT if n.startswith("right") else MID
            for n in layout.names]
    for kp in keypoints:
        for a, b in layout.skeleton:
            if kp[a, 2] > 0 and kp[b, 2] > 0:
                colour = side[a] if side[a] == side[b] else MID
                cv2.line(out, tuple(int(v) for v in kp[a, :2]), tuple(int(v) for v in kp[b, :2]),
                         colour, 2, cv2.LINE_AA)
        for x, y, v in kp:
            if v > 0:
                cv2.circle(out, (int(x), int(y)), 3, (0, 255, 0) if v == 2 else (255, 0, 0), -1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/samples.png")
    parser.add_argument("--data", default="outputs/synthetic_preview")
    parser.add_argument("--num", type=int, default=4)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--layout", default="crowdpose")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)

    ann = generate_synthetic_crowd(args.data, num_images=args.num, image_size=args.size,
                                   layout=args.layout, seed=args.seed)
    codec = PINetCodec(args.layout, input_size=args.size, sparse=False)  # the dense maps
    ds = CocoKeypointDataset(Path(args.data) / "images", ann, codec=codec, train=True)
    ds.augment.reseed(args.seed)
    raw_row, aug_row = [], []
    for i in range(min(args.num, len(ds))):
        image, _, anns = ds.load(i)
        kps, boxes, mask = ds.people(anns, *image.shape[:2])
        raw_row.append(draw_people(image, kps, ds.layout))
        out = ds.augment(image, kps, mask=mask, boxes=boxes)
        ignored = out["mask"] == 0 if out["mask"] is not None else None
        cells = out["keypoints"].copy()
        cells[..., :2] = ds.convention.input_to_cell(cells[..., :2], ds.output_stride)
        targets = ds.codec.encode(cells, out["areas"])
        heat = cv2.resize(targets["part_heatmaps"].max(0), (args.size, args.size))
        tinted = out["image"].astype(np.float32)
        tinted[..., 1] = np.clip(tinted[..., 1] + 180 * heat, 0, 255)
        if ignored is not None:
            tinted[ignored] = 0.5 * tinted[ignored] + [110, 0, 0]
        drawn = draw_people(tinted.astype(np.uint8), out["keypoints"], ds.layout)
        crop = out["crop"]
        text = f"u {crop['scale']:.2f} shift {crop['shift'][0]:+.2f},{crop['shift'][1]:+.2f}"
        if out["flipped"]:
            text += " flipped"
        cv2.putText(drawn, text, (5, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, MID, 2)
        aug_row.append(drawn)
    grid = np.concatenate([np.concatenate(raw_row, 1), np.concatenate(aug_row, 1)], 0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(args.out, cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    print(f"wrote {args.out} ({grid.shape[1]}x{grid.shape[0]})")


if __name__ == "__main__":
    main()
