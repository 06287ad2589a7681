"""The training augmentation (algorithm.md 6).

Pixel-center convention: pixel ``(i, j)`` has coordinate ``(i, j)``, so a horizontal flip of a
width-``W`` image maps ``x -> W - 1 - x`` (albumentations 2.x ``HorizontalFlip`` uses the same
rule). The inference resize lives in :mod:`pinet_lightning.core.images` (importable from here too).

* :class:`TrainAugmentation` (algorithm.md 6, the published ``RandomAffineTransform`` +
  ``RandomHorizontalFlip``): fit the short side to ``input_size`` (exact, by us; area
  averaging when shrinking), then an albumentations pipeline: :class:`SquareCropAffine`
  (the training crop as one ``Affine``) and ``HorizontalFlip``; when the flip fired,
  keypoints are re-ordered by the layout's flip order. The crop is a square of side
  short side x u, u uniform in [0.75, 1.5], resized to ``input_size``: ONE scale on both
  axes, magnification 1/u (u > 1 zooms out, median 0.89); its centre is the image centre
  moved by up to +-0.2 crop sides on each axis of the image (the published +-40 in units
  of short side / 200 at u = 1, i.e. +-102 input pixels at 512 whatever u), and it is
  rotated by up to +-30 degrees about its centre.
  Keypoints leaving the square keep their coordinates (``remove_invisible=False``): the target
  encoder drops them. Box areas are multiplied by the determinant of the whole transform
  (rotation keeps area), boxes become the axis-aligned hull of their transformed corners.
  The ignore mask follows with nearest interpolation; pixels brought in from outside the
  image get mask 0 (ignored by the heatmap loss, as published: about a fifth of a crop on
  average) with ``ignore_padding=True``, the default, or 1 (plain background) with False.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.augmentations.geometric import functional as fgeometric

from pinet_lightning.core.images import check_image, fit_short_side, inference_resize

# inference_resize and fit_short_side live in images.py; importable from here too
__all__ = ["inference_resize", "TrainAugmentation", "SquareCropAffine", "fit_short_side"]


def _apply_affine(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ m[:, :2].T + m[:, 2]


class SquareCropAffine(A.Affine):
    """albumentations ``Affine`` drawing PINet's training crop (algorithm.md 6).

    A square of side ``short side x u``, ``u ~ U[min_scale, max_scale]``, centred on the
    image centre plus ``(dx, dy)`` crop sides, ``dx, dy ~ U[-max_translate, max_translate]``
    along the image's axes, rotated by ``angle ~ U[-max_rotation, max_rotation]`` degrees
    about its centre and resized to ``size`` x ``size``: one isotropic scale
    ``size / (short side x u)``. The output is the ``size`` x ``size`` crop itself (no
    separate pad / crop step). The applied parameters carry ``crop_scale`` (u) and
    ``shift`` ((dx, dy) in crop sides) besides ``Affine``'s ``matrix``, ``scale`` and
    ``rotate``.
    """

    def __init__(self, size: int, min_scale: float = 0.75, max_scale: float = 1.5,
                 max_rotation: float = 30.0, max_translate: float = 0.2,
                 fill_mask: float = 0, p: float = 1.0) -> None:
        super().__init__(rotate=(-float(max_rotation), float(max_rotation)),
                         interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                         border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=fill_mask,
                         keep_ratio=True, p=p)
        self.size = int(size)
        self.crop_scale = (float(min_scale), float(max_scale))
        self.max_translate = float(max_translate)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]
                                     ) -> dict[str, Any]:
        height, width = params["shape"][:2]
        rand = self.py_random
        u = rand.uniform(*self.crop_scale)
        angle = rand.uniform(*self.rotate)
        shift = (rand.uniform(-self.max_translate, self.max_translate),
                 rand.uniform(-self.max_translate, self.max_translate))
        side = min(height, width) * u
        zoom = self.size / side
        # The crop centre (in the image) lands on the output centre; scale and rotation
        # act about it, so the shift is in the image's axes, as the published crop.
        src = ((width - 1) / 2 + shift[0] * side, (height - 1) / 2 + shift[1] * side)
        dst = (self.size - 1) / 2
        scale = {"x": zoom, "y": zoom}
        move = {"x": dst - src[0], "y": dst - src[1]}
        no_shear = {"x": 0.0, "y": 0.0}
        matrix = fgeometric.create_affine_transformation_matrix(move, no_shear, scale, angle,
                                                                src)
        # boxes use pixel-corner coordinates: the same map shifted by half a pixel
        bbox_matrix = fgeometric.create_affine_transformation_matrix(
            move, no_shear, scale, angle, (src[0] + 0.5, src[1] + 0.5))
        return {"rotate": angle, "scale": scale, "matrix": matrix, "bbox_matrix": bbox_matrix,
                "output_shape": (self.size, self.size), "crop_scale": u, "shift": shift}


class TrainAugmentation:
    """The training augmentation of algorithm.md 6; every knob is a constructor argument.

    Call with an RGB uint8 image (H, W, 3), keypoints (N, K, 3) in image pixels, optional
    ignore mask (H, W) (0 = ignore), optional boxes (N, 4) xywh and areas (N,). Returns a dict:
    ``image`` (S, S, 3) uint8, ``keypoints`` (N, K, 3) float32 (visibility kept, order swapped
    when flipped), ``mask`` (S, S) uint8 (None when no mask was given and
    ``ignore_padding`` is False), ``boxes`` (N, 4), ``areas`` (N,), ``matrix`` (2, 3) the
    whole map original px -> output px, ``flipped`` bool, ``crop`` the drawn crop
    (``scale`` u, ``shift`` (dx, dy) in crop sides, ``rotate`` degrees).

    Args:
        flip_index: the layout's flip order.
        input_size: S.
        max_rotation: degrees, uniform in [-max_rotation, max_rotation].
        min_scale, max_scale: the crop side is the short side times u ~ U[min, max] (u > 1
            zooms out).
        max_translate: the crop centre moves by up to this many crop sides on each axis.
        flip_prob: horizontal flip probability.
        ignore_padding: mask 0 (ignored by the heatmap loss) where the crop leaves the image.
        seed: albumentations seed.
    """

    def __init__(
        self,
        flip_index: Sequence[int],
        input_size: int = 512,
        max_rotation: float = 30.0,
        min_scale: float = 0.75,
        max_scale: float = 1.5,
        max_translate: float = 0.2,
        flip_prob: float = 0.5,
        ignore_padding: bool = True,
        seed: int | None = None,
    ) -> None:
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        if not 0.0 <= max_translate < 1.0:
            raise ValueError(
                f"max_translate is a fraction of the crop side in [0, 1) (algorithm.md 6: 0.2, the "
                f"published MAX_TRANSLATE 40 in units of short side / 200), got {max_translate}")
        self.flip_index = np.asarray(flip_index, dtype=np.int64)
        self.input_size = int(input_size)
        self.ignore_padding = bool(ignore_padding)
        self.transform = A.Compose(
            [
                SquareCropAffine(self.input_size, min_scale, max_scale, max_rotation,
                                 max_translate, fill_mask=0 if self.ignore_padding else 1),
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
        check_image(image, "TrainAugmentation")
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
        elif self.ignore_padding:  # all 1: the warp marks the padding 0
            data["mask"] = np.ones(fitted.shape[:2], np.uint8)
        out = self.transform(**data)
        params = dict(out["applied_transforms"])
        flipped = "HorizontalFlip" in params
        pts = np.asarray(out["keypoints"], dtype=np.float64)[:, :2]
        new_kps = np.concatenate([pts[: n * k].reshape(n, k, 2), kps[..., 2:]], -1)
        if flipped:  # albumentations mirrors x but cannot know left from right
            new_kps = new_kps[:, self.flip_index]
        c = pts[n * k :].reshape(n, 4, 2)
        lo, hi = c.min(1), c.max(1)
        crop = params["SquareCropAffine"]
        matrix = self._total_matrix(fit, crop["matrix"], flipped)
        det = abs(np.linalg.det(matrix[:, :2]))
        return {
            "image": out["image"],
            "keypoints": new_kps.astype(np.float32),
            "mask": out.get("mask"),
            "boxes": np.concatenate([lo, hi - lo], 1).astype(np.float32),
            "areas": (np.asarray(areas, dtype=np.float64) * det).astype(np.float32),
            "matrix": matrix,
            "flipped": flipped,
            "crop": {"scale": crop["crop_scale"], "shift": crop["shift"],
                     "rotate": crop["rotate"]},
        }

    def _total_matrix(self, fit: np.ndarray, crop: np.ndarray, flipped: bool) -> np.ndarray:
        """Compose fit, crop affine and flip into one 2x3 map (original -> output px)."""
        m = np.asarray(crop, dtype=np.float64) @ np.vstack([fit, [0.0, 0.0, 1.0]])
        if flipped:
            m = np.array([[-1.0, 0.0, self.input_size - 1.0], [0, 1, 0], [0, 0, 1]]) @ m
        return m[:2]
