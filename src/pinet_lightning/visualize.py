"""Draw poses on images (skeleton lines and keypoint dots, one colour per person) and tile
several images into one picture.

Poses are ``(F, K, 3)``: ``(x, y, s)`` in image pixels, ``s`` a keypoint score (predictions)
or a visibility flag (ground truth, 0 absent). A keypoint is drawn when ``s > threshold``;
an edge when both ends are. Each person is drawn with two OpenCV calls (all its limbs, all
its dots), so drawing costs no Python loop over keypoints or edges.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pinet_lightning.layouts import Layout, get_layout

__all__ = ["person_colors", "draw_poses", "make_grid", "save_image", "to_hwc_uint8"]


def person_colors(n: int, saturation: float = 0.85, value: float = 1.0) -> np.ndarray:
    """``n`` well separated RGB colours (uint8, (n, 3)): hues spaced by the golden ratio."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    hsv = np.stack([hues * 180.0, np.full(n, saturation * 255.0), np.full(n, value * 255.0)],
                   axis=-1).astype(np.uint8)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0] if n else np.zeros((0, 3), np.uint8)


def to_hwc_uint8(image: Any) -> np.ndarray:
    """A (H, W, 3) uint8 copy of ``image``: numpy or torch, HWC or CHW, uint8 or 0..255."""
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = image.transpose(1, 2, 0)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected an (H, W, 3) or (3, H, W) image, got shape "
                         f"{image.shape}")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image).copy()


def draw_poses(
    image: Any,
    poses: Any,
    layout: Layout | str | Mapping[str, Any],
    scores: Any = None,
    threshold: float = 0.2,
    min_score: float = 0.0,
    colors: np.ndarray | None = None,
    thickness: int | None = None,
    radius: int | None = None,
) -> np.ndarray:
    """Return a copy of ``image`` with ``poses`` drawn.

    Args:
        image: (H, W, 3) or (3, H, W), uint8 or float 0..255 (numpy or torch).
        poses: (F, K, 3) ``(x, y, score or visibility)`` in image pixels.
        layout: keypoint layout (its skeleton gives the lines).
        scores: (F,) pose scores; poses scoring below ``min_score`` are skipped and the
            drawing order is worst first, so the best poses end on top.
        threshold: a keypoint is drawn when its third value is above this.
        colors: (F, 3) RGB per person (default: :func:`person_colors`).
        thickness, radius: line width and dot radius (default: from the image size).
    """
    layout = get_layout(layout)
    canvas = to_hwc_uint8(image)
    if hasattr(poses, "detach"):
        poses = poses.detach().cpu().numpy()
    poses = np.asarray(poses, dtype=np.float64)
    if poses.size == 0:
        return canvas
    if poses.ndim != 3 or poses.shape[1:] != (layout.num_keypoints, 3):
        raise ValueError(f"poses must be (F, {layout.num_keypoints}, 3) for "
                         f"layout '{layout.name}', got {poses.shape}")
    n = poses.shape[0]
    order = np.arange(n)
    if scores is not None:
        if hasattr(scores, "detach"):
            scores = scores.detach().cpu().numpy()
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if scores.shape[0] != n:
            raise ValueError(f"{n} poses but {scores.shape[0]} scores")
        order = np.argsort(scores, kind="stable")
        order = order[scores[order] >= min_score]
    colors = person_colors(n) if colors is None else np.asarray(colors, dtype=np.uint8)
    side = min(canvas.shape[:2])
    thickness = thickness or max(1, int(round(side / 200)))
    radius = radius or max(2, int(round(side / 130)))
    edges = np.asarray(layout.skeleton, dtype=np.int64).reshape(-1, 2)
    shift = 2  # fixed-point bits: sub-pixel positions
    fixed = np.rint(poses[..., :2] * (1 << shift)).astype(np.int32)
    shown = (poses[..., 2] > threshold) & np.isfinite(poses[..., :2]).all(-1)
    for i in order.tolist():
        color = tuple(int(c) for c in colors[i % len(colors)])
        if len(edges):
            keep = shown[i, edges[:, 0]] & shown[i, edges[:, 1]]
            segments = fixed[i][edges[keep]]  # (E, 2, 2)
            if len(segments):
                cv2.polylines(canvas, list(segments), False, color, thickness, cv2.LINE_AA,
                              shift)
        dots = fixed[i][shown[i]]
        if len(dots):
            # a zero-length round-capped line is a filled dot: all dots in one call
            cv2.polylines(canvas, list(np.repeat(dots[:, None], 2, axis=1)), False, color,
                          2 * radius, cv2.LINE_AA, shift)
            cv2.polylines(canvas, list(np.repeat(dots[:, None], 2, axis=1)), False,
                          (255, 255, 255), max(1, radius), cv2.LINE_AA, shift)
    return canvas


def make_grid(images: Sequence[Any], columns: int | None = None, cell_size: int | None = None,
              pad: int = 4, background: int = 255) -> np.ndarray:
    """Tile images (any sizes) into one RGB picture; each is fitted into a square cell.

    Args:
        images: (H, W, 3) / (3, H, W) images.
        columns: images per row (default: about a square grid).
        cell_size: cell side in pixels (default: the largest image side, at most 512).
        pad: pixels between cells and around the grid.
    """
    tiles = [to_hwc_uint8(im) for im in images]
    if not tiles:
        raise ValueError("make_grid needs at least one image")
    n = len(tiles)
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    cell = cell_size or min(512, max(max(t.shape[:2]) for t in tiles))
    grid = np.full((rows * cell + (rows + 1) * pad, columns * cell + (columns + 1) * pad, 3),
                   background, np.uint8)
    for i, tile in enumerate(tiles):
        h, w = tile.shape[:2]
        scale = cell / max(h, w)
        nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        tile = cv2.resize(tile, (nw, nh), interpolation=interp)
        r, c = divmod(i, columns)
        y = pad + r * (cell + pad) + (cell - nh) // 2
        x = pad + c * (cell + pad) + (cell - nw) // 2
        grid[y:y + nh, x:x + nw] = tile
    return grid


def save_image(path: str | Path, image: Any) -> Path:
    """Write an RGB image (png / jpg by the suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(to_hwc_uint8(image), cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path} (unknown suffix or no access)")
    return path
