"""Image geometry for training and inference.

Pixel-center convention (docs/architecture.md): pixel ``(i, j)`` has coordinate ``(i, j)``, so a
horizontal flip of a width-``W`` image maps ``x -> W - 1 - x`` (albumentations 2.x
``HorizontalFlip`` uses the same rule), and a resize by ``s`` maps ``x -> (x + 0.5) s - 0.5``
(what ``cv2.resize`` does).

* :func:`inference_resize` (SPEC 5.1): short side to ``input_size``, long side rounded up to a
  multiple of 64, aspect kept; the rounding is zero padding on the right / bottom.
* :class:`TrainAugmentation` (SPEC 6): fit the short side to ``input_size`` (exact, by us), then
  an albumentations pipeline: ``Affine`` (rotation, scale, translation about the image
  center), ``PadIfNeeded`` + ``CenterCrop`` to a centred ``input_size`` square, and
  ``HorizontalFlip``; when the flip fired, keypoints are re-ordered by the layout's flip order.
  Keypoints leaving the square keep their coordinates (``remove_invisible=False``): the target
  encoder drops them. Box areas are multiplied by the determinant of the whole transform
  (rotation keeps area), boxes become the axis-aligned hull of their transformed corners.
  The ignore mask follows with nearest interpolation; pixels brought in from outside the image
  get mask 1 (plain background): inference pads with black too, so the network should learn
  that padding holds no people.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np

__all__ = ["inference_resize", "TrainAugmentation", "fit_short_side"]


def _resize_matrix(sx: float, sy: float) -> np.ndarray:
    """2x3 affine of ``cv2.resize`` by (sx, sy) in pixel-center coordinates."""
    return np.array([[sx, 0.0, 0.5 * (sx - 1.0)], [0.0, sy, 0.5 * (sy - 1.0)]])


def _invert(m: np.ndarray) -> np.ndarray:
    return cv2.invertAffineTransform(np.asarray(m, dtype=np.float64))


def _resize(image: np.ndarray, width: int, height: int, interp: int | None = None) -> np.ndarray:
    if interp is None:  # area averaging when shrinking avoids aliasing
        interp = cv2.INTER_AREA if width < image.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interp)


def _check_image(image: np.ndarray, where: str) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        got = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"{where}: expected an (H, W, 3) numpy image, got {got}")


def inference_resize(
    image: np.ndarray, input_size: int = 512, multiple: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Resize for inference (SPEC 5.1).

    Returns the network input (H', W', 3), both sides multiples of ``multiple`` (short side
    ``input_size`` rounded up), and the float64 2x3 affine mapping network-input pixels back to
    original pixels. The content fills the top-left ``round(w s) x round(h s)``; the rest is 0.
    """
    _check_image(image, "inference_resize")
    if input_size < 1 or multiple < 1:
        raise ValueError(f"input_size and multiple must be positive ({input_size}, {multiple})")
    h, w = image.shape[:2]
    scale = input_size / min(h, w)
    cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
    out_w = math.ceil(cw / multiple) * multiple
    out_h = math.ceil(ch / multiple) * multiple
    resized = _resize(image, cw, ch)
    if (out_h, out_w) != (ch, cw):
        canvas = np.zeros((out_h, out_w, 3), dtype=image.dtype)
        canvas[:ch, :cw] = resized
        resized = canvas
    # cv2.resize scales each axis by the integer size ratio, not exactly by ``scale``
    back = _invert(_resize_matrix(cw / w, ch / h))
    return resized, back


def fit_short_side(image: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize so the short side is ``size`` (aspect kept); returns the image and the forward
    2x3 affine original px -> resized px."""
    h, w = image.shape[:2]
    scale = size / min(h, w)
    cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
    return _resize(image, cw, ch), _resize_matrix(cw / w, ch / h)


def _apply_affine(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ m[:, :2].T + m[:, 2]


class TrainAugmentation:
    """SPEC training augmentation; every knob is a constructor argument (SPEC defaults).

    Call with an RGB uint8 image (H, W, 3), keypoints (N, K, 3) in image pixels, optional
    ignore mask (H, W) (0 = ignore), optional boxes (N, 4) xywh and areas (N,). Returns a dict:
    ``image`` (S, S, 3) uint8, ``keypoints`` (N, K, 3) float32 (visibility kept, order swapped
    when flipped), ``mask`` (S, S) uint8 or None, ``boxes`` (N, 4), ``areas`` (N,),
    ``matrix`` (2, 3) the whole map original px -> output px, ``flipped`` bool.
    """

    def __init__(
        self,
        flip_index: Sequence[int],
        input_size: int = 512,
        max_rotation: float = 30.0,
        min_scale: float = 0.75,
        max_scale: float = 1.5,
        max_translate: float = 40.0,
        flip_prob: float = 0.5,
        seed: int | None = None,
    ) -> None:
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.flip_index = np.asarray(flip_index, dtype=np.int64)
        self.input_size = int(input_size)
        t = int(round(max_translate))
        s = self.input_size
        self.transform = A.Compose(
            [
                A.Affine(
                    rotate=(-float(max_rotation), float(max_rotation)),
                    scale=(float(min_scale), float(max_scale)),
                    translate_px={"x": (-t, t), "y": (-t, t)},
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=cv2.INTER_NEAREST,
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=0,
                    fill_mask=1,
                    p=1.0,
                ),
                A.PadIfNeeded(s, s, position="center", border_mode=cv2.BORDER_CONSTANT,
                              fill=0, fill_mask=1),  # fmt: skip
                A.CenterCrop(s, s),
                A.HorizontalFlip(p=float(flip_prob)),
            ],
            keypoint_params=A.KeypointParams(format="xy", remove_invisible=False),
            save_applied_params=True,
            seed=seed,
        )

    def reseed(self, seed: int) -> None:
        """Reseed the random generators (call once per data-loader worker)."""
        self.transform.set_random_seed(int(seed) % (2**32))

    def __call__(
        self,
        image: np.ndarray,
        keypoints: np.ndarray,
        mask: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        areas: np.ndarray | None = None,
    ) -> dict[str, Any]:
        _check_image(image, "TrainAugmentation")
        kps = np.asarray(keypoints, dtype=np.float64).reshape(-1, len(self.flip_index), 3)
        n, k = kps.shape[:2]
        if boxes is None:  # hull of the labelled keypoints
            boxes = np.zeros((n, 4))
            for i in np.flatnonzero((kps[..., 2] > 0).any(1)):
                lab = kps[i, kps[i, :, 2] > 0, :2]
                boxes[i, :2], boxes[i, 2:] = lab.min(0), lab.max(0) - lab.min(0)
        boxes = np.asarray(boxes, dtype=np.float64).reshape(n, 4)
        if areas is None:
            areas = boxes[:, 2] * boxes[:, 3]
        fitted, fit = fit_short_side(image, self.input_size)
        x0, y0, bw, bh = boxes.T
        corners = np.stack([np.stack([x0, y0], -1), np.stack([x0 + bw, y0], -1),
                            np.stack([x0, y0 + bh], -1), np.stack([x0 + bw, y0 + bh], -1)], 1)
        points = np.concatenate([kps[..., :2].reshape(-1, 2), corners.reshape(-1, 2)], 0)
        data: dict[str, Any] = {"image": fitted, "keypoints": _apply_affine(fit, points)}
        if mask is not None:
            m = np.asarray(mask, dtype=np.uint8)
            data["mask"] = cv2.resize(m, fitted.shape[1::-1], interpolation=cv2.INTER_NEAREST)
        out = self.transform(**data)
        params = dict(out["applied_transforms"])
        flipped = "HorizontalFlip" in params
        pts = np.asarray(out["keypoints"], dtype=np.float64)[:, :2]
        new_kps = np.concatenate([pts[: n * k].reshape(n, k, 2), kps[..., 2:]], -1)
        if flipped:  # albumentations mirrors x but cannot know left from right
            new_kps = new_kps[:, self.flip_index]
        c = pts[n * k :].reshape(n, 4, 2)
        lo, hi = c.min(1), c.max(1)
        matrix = self._total_matrix(fit, params, flipped)
        det = abs(np.linalg.det(matrix[:, :2]))
        return {
            "image": out["image"],
            "keypoints": new_kps.astype(np.float32),
            "mask": out.get("mask") if mask is not None else None,
            "boxes": np.concatenate([lo, hi - lo], 1).astype(np.float32),
            "areas": (np.asarray(areas, dtype=np.float64) * det).astype(np.float32),
            "matrix": matrix,
            "flipped": flipped,
        }

    def _total_matrix(self, fit: np.ndarray, params: dict, flipped: bool) -> np.ndarray:
        """Compose fit, affine, pad, crop and flip into one 2x3 map (original -> output px)."""
        m = np.vstack([fit, [0.0, 0.0, 1.0]])
        m = np.asarray(params["Affine"]["matrix"], dtype=np.float64) @ m
        pad = params.get("PadIfNeeded", {})
        shift = np.eye(3)
        shift[0, 2] = pad.get("pad_left", 0)
        shift[1, 2] = pad.get("pad_top", 0)
        crop = params["CenterCrop"]["crop_coords"]
        shift[0, 2] -= crop[0]
        shift[1, 2] -= crop[1]
        m = shift @ m
        if flipped:
            m = np.array([[-1.0, 0.0, self.input_size - 1.0], [0, 1, 0], [0, 0, 1]]) @ m
        return m[:2]
