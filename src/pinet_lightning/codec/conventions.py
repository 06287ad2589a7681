"""Cell/pixel conventions: where an output cell sits in the network input, how the flip test
mirrors the input, where the refinement network reads features and how keypoint scores are
read off the heatmaps. A trained network depends on them (its targets were built with one), so
a model records its convention (``PINet(convention=...)``) and every stage asks this module:
the data pipeline (input pixels -> cells), the network (feature sampling), decoding and the
predictor (input resizing, mirroring, cells -> pixels, keypoint scores).

Two conventions (docs/algorithm.md, "Conventions"):

- ``cell_center`` (ours, the default): cell ``x`` is input pixel ``stride * x + (stride - 1) / 2``,
  the center of the ``stride`` pixels it covers (pixel centers at integers). Mirroring the input
  (``x -> W - 1 - x``) is then exactly mirroring the output map (``x -> w - 1 - x``). Features and
  keypoint scores are read bilinearly at the point itself (corners off the map count 0). The
  inference input is the image resized with its short side to S, zero padded right/bottom.
- ``published`` (kennethwdk/PINet, whose released weights assume it): cell ``x`` is input pixel
  ``stride * x``; the mirrored input is shifted ``stride - 1`` pixels left so that mirrored cells
  align; the refinement reads features at ``x * w / (w - 1) - 0.5`` (its grid normalization by
  ``(w - 1) / 2`` under ``align_corners=False``), zero padded; keypoint scores come from the
  averaged heatmap upsampled ``stride`` times (corner-aligned, edge-replicated), read with the
  point's coordinates truncated toward zero and 0 when a corner leaves it; the inference input is
  the image warped (bilinear, centered, zero border) so its short side is S rounded up to 64.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from torch import Tensor

from pinet_lightning.core.constants import IMAGENET_MEAN
from pinet_lightning.core.images import inference_resize
from pinet_lightning.core.sampling import sample_maps

__all__ = ["Convention", "CellCenter", "Published", "get_convention", "CONVENTIONS",
           "cells_to_input", "input_to_image", "cells_to_image"]


class Convention:
    """Base class; see the module docstring. ``stride`` is the network's output stride."""

    name: str = ""

    def cell_to_input(self, xy: Tensor, stride: int) -> Tensor:
        """Output cells (..., 2) -> network-input pixels."""
        raise NotImplementedError

    def input_to_cell(self, xy: np.ndarray, stride: int) -> np.ndarray:
        """Network-input pixels (..., 2) -> output cells (training targets)."""
        raise NotImplementedError

    def mirror(self, images: Tensor, stride: int) -> Tensor:
        """The mirrored input (B, 3, H, W) of the flip test (0..255 values, maybe float),
        aligned so that output cell ``x`` of the mirror is cell ``w - 1 - x`` of the image."""
        raise NotImplementedError

    def feature_points(self, xy: Tensor, height: int, width: int) -> Tensor:
        """Where the refinement network reads the features of keypoints at cells ``xy``."""
        raise NotImplementedError

    def keypoint_scores(self, heatmaps: Tensor, xy: Tensor, channels: Tensor,
                        stride: int) -> Tensor:
        """Heatmap values (B, M) of ``heatmaps`` (B, K, h, w) at cells ``xy`` (B, M, 2), each in
        channel ``channels`` (M,) or (B, M)."""
        raise NotImplementedError

    def resize(self, image: np.ndarray, input_size: int,
               multiple: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Inference input of an RGB image: (resized (H', W', 3) with sides multiples of
        ``multiple``, float64 2x3 affine from network-input pixels back to the image's)."""
        raise NotImplementedError

    def fit(self, image: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
        """Inference input of a fixed ``side x side`` size (an exported graph's): the image
        scaled so its long side is ``side``, placed as ``resize`` places it; (input, 2x3
        affine back to the image's pixels). A square image gets what ``resize`` gives it."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"Convention({self.name!r})"


class CellCenter(Convention):
    """Ours: cell ``x`` at input pixel ``stride * x + (stride - 1) / 2``."""

    name = "cell_center"

    def cell_to_input(self, xy: Tensor, stride: int) -> Tensor:
        return xy * stride + (stride - 1) / 2

    def input_to_cell(self, xy: np.ndarray, stride: int) -> np.ndarray:
        return (xy - (stride - 1) / 2) / stride

    def mirror(self, images: Tensor, stride: int) -> Tensor:
        return images.flip(-1)

    def feature_points(self, xy: Tensor, height: int, width: int) -> Tensor:
        return xy

    def keypoint_scores(self, heatmaps: Tensor, xy: Tensor, channels: Tensor,
                        stride: int) -> Tensor:
        return sample_maps(heatmaps, xy, channels)

    def resize(self, image: np.ndarray, input_size: int,
               multiple: int = 64) -> tuple[np.ndarray, np.ndarray]:
        return inference_resize(image, input_size, multiple)

    def fit(self, image: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
        h, w = image.shape[:2]
        # short side side * min / max puts the long side at side; a multiple of side pads
        # the short one to side (right / bottom, as resize does)
        return inference_resize(image, side * min(h, w) / max(h, w), multiple=side)


class Published(Convention):
    """kennethwdk/PINet's: cell ``x`` at input pixel ``stride * x`` (see the module docstring)."""

    name = "published"

    def cell_to_input(self, xy: Tensor, stride: int) -> Tensor:
        return xy * stride

    def input_to_cell(self, xy: np.ndarray, stride: int) -> np.ndarray:
        return xy / stride

    def mirror(self, images: Tensor, stride: int) -> Tensor:
        # Mirrored pixel c shows original pixel W - stride - c: cell x <-> cell w - 1 - x. The
        # published code pads the normalized image with 0, i.e. with the mean pixel here.
        shift = stride - 1
        flipped = images.flip(-1).float()
        if shift == 0:
            return flipped
        mean = flipped.new_tensor(IMAGENET_MEAN).view(3, 1, 1) * 255.0
        out = mean.expand_as(flipped).clone()
        out[..., :-shift] = flipped[..., shift:]
        return out

    def feature_points(self, xy: Tensor, height: int, width: int) -> Tensor:
        size = xy.new_tensor([width, height])
        return xy * size / (size - 1).clamp_min(1) - 0.5

    def keypoint_scores(self, heatmaps: Tensor, xy: Tensor, channels: Tensor,
                        stride: int) -> Tensor:
        h, w = heatmaps.shape[-2:]
        px = xy.float() * stride  # pixels of the upsampled map (= input pixels)
        base = torch.trunc(px)  # toward zero, as int(): x in (-1, 0) reads corner 0
        frac = px - base
        ok = ((base >= 0) & (base + 1 < base.new_tensor([stride * w, stride * h]))).all(-1)
        # The upsampled map at integer pixel p is the heatmap at min(p, stride (n - 1)) / stride
        # (corner-aligned bilinear, then the last stride - 1 rows/columns replicated).
        last = base.new_tensor([stride * (w - 1), stride * (h - 1)])
        value = torch.zeros_like(frac[..., 0])
        for dx in (0, 1):
            for dy in (0, 1):
                corner = torch.minimum(base + base.new_tensor([dx, dy]), last) / stride
                weight = ((frac[..., 0] if dx else 1 - frac[..., 0])
                          * (frac[..., 1] if dy else 1 - frac[..., 1]))
                value = value + sample_maps(heatmaps, corner, channels) * weight
        return torch.where(ok, value, torch.zeros_like(value))

    def resize(self, image: np.ndarray, input_size: int,
               multiple: int = 64) -> tuple[np.ndarray, np.ndarray]:
        h, w = image.shape[:2]
        if min(h, w) < 1:
            raise ValueError(f"resize: the image is empty ({h}x{w}); pass an image with pixels")
        short = math.ceil(input_size / multiple) * multiple

        def rounded_up(x: float) -> int:
            return int((x + multiple - 1) // multiple * multiple)

        if w < h:
            out_w, out_h = short, rounded_up(short / w * h)
            side = float(w)  # the crop side that maps onto out_w
        else:
            out_w, out_h = rounded_up(short / h * w), short
            side = out_w / out_h * h
        return _centred_warp(image, out_w, out_h, side)

    def fit(self, image: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
        return _centred_warp(image, side, side, float(max(image.shape[:2])))


def _centred_warp(image: np.ndarray, out_w: int, out_h: int,
                  side: float) -> tuple[np.ndarray, np.ndarray]:
    """The published input warp: the image's centre to the output's, a crop of width ``side``
    onto ``out_w`` (bilinear, zero border); (warped, 2x3 affine back)."""
    h, w = image.shape[:2]
    # Three points of the similarity: the centre (rounded half up, as the published code
    # does), half a side above it, and half a side above-left; float32 like cv2 expects.
    cx, cy = float(int(w / 2 + 0.5)), float(int(h / 2 + 0.5))

    def triangle(x: float, y: float, half: float) -> np.ndarray:
        return np.array([[x, y], [x, y - half], [x - half, y - half]], dtype=np.float32)

    src = triangle(cx, cy, side * 0.5)
    dst = triangle(out_w * 0.5, out_h * 0.5, out_w * 0.5)
    forward = cv2.getAffineTransform(src, dst)
    resized = cv2.warpAffine(image, forward, (out_w, out_h))
    return resized, cv2.getAffineTransform(dst, src)


CONVENTIONS: dict[str, Convention] = {c.name: c for c in (CellCenter(), Published())}


def get_convention(spec: str | Convention | None) -> Convention:
    """A convention by name (``cell_center``, ``published``); None gives ``cell_center``."""
    if spec is None:
        return CONVENTIONS["cell_center"]
    if isinstance(spec, Convention):
        return spec
    try:
        return CONVENTIONS[str(spec).lower()]
    except KeyError:
        raise ValueError(f"unknown convention '{spec}'; known: {sorted(CONVENTIONS)}") from None


def cells_to_input(poses: Tensor, convention: str | Convention | None = None, stride: int = 4,
                   input_scale: tuple[float, float] = (1.0, 1.0)) -> Tensor:
    """Output cells -> network-input pixels (the convention's mapping; extra columns kept).

    Args:
        poses: (..., 2+) with x, y in output cells.
        input_scale: (sx, sy) = base input size / this scale's input size (multi-scale);
            pixel centers stay aligned: x_base = (x + 0.5) * sx - 0.5.
    """
    xy = get_convention(convention).cell_to_input(poses[..., :2], stride)
    if input_scale != (1.0, 1.0):
        scale = xy.new_tensor(input_scale)
        xy = (xy + 0.5) * scale - 0.5
    return torch.cat([xy, poses[..., 2:]], -1)


def input_to_image(poses: Tensor, back_transforms: Tensor) -> Tensor:
    """Network-input pixels -> original pixels: poses (B, N, K, 2+) (extra columns kept),
    ``back_transforms`` (B, 2, 3) affine."""
    a = back_transforms.to(device=poses.device, dtype=torch.float32)
    mapped = torch.einsum("bij,bnkj->bnki", a[:, :, :2], poses[..., :2]) + a[:, None, None, :, 2]
    return torch.cat([mapped, poses[..., 2:]], -1)


def cells_to_image(poses: Tensor, back_transforms: Tensor,
                   convention: str | Convention | None = None, stride: int = 4,
                   input_scale: tuple[float, float] = (1.0, 1.0)) -> Tensor:
    """Output cells -> network-input pixels (:func:`cells_to_input`) -> original pixels
    (:func:`input_to_image`).

    Args:
        poses: (B, N, K, 2+) with x, y in output cells (extra columns kept).
        back_transforms: (B, 2, 3) affine, network-input pixels -> original pixels.
        input_scale: as for :func:`cells_to_input`.
    """
    return input_to_image(cells_to_input(poses, convention, stride, input_scale),
                          back_transforms)
