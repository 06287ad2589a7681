"""Bilinear sampling on maps, shared by the refinement network and decoding.

Pixel centers sit at integer coordinates: a point ``(x, y)`` reads the four cells around it,
and a corner that falls outside the map contributes 0 (as ``grid_sample`` with zeros
padding and ``align_corners=True``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bilinear_corners", "sample_maps"]


def bilinear_corners(points: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """The four bilinear corners of ``points`` (*S, 2) (x, y), in the order (0,0), (1,0),
    (0,1), (1,1): their flat cells ``y * width + x`` (4, *S), clamped into the map, and their
    weights (4, *S) float32, 0 for corners outside the map."""
    pts = points.float()
    x0 = pts[..., 0].floor()
    y0 = pts[..., 1].floor()
    fx = pts[..., 0] - x0
    fy = pts[..., 1] - y0
    x0 = x0.long()
    y0 = y0.long()
    # Corner c is (x0 + c % 2, y0 + c // 2); arange, not a host list: no host->device copy.
    corner = torch.arange(4, device=pts.device).view(4, *([1] * (pts.dim() - 1)))
    xi = x0[None] + corner % 2  # (4, *S)
    yi = y0[None] + corner // 2
    weight = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy])
    inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
    cell = yi.clamp(0, height - 1) * width + xi.clamp(0, width - 1)
    return cell, weight * inside


def sample_maps(maps: Tensor, points: Tensor, channels: Tensor) -> Tensor:
    """Bilinear value of ``maps`` (B, C, h, w) at ``points`` (B, M, 2) (x, y), each in its
    own channel ``channels`` (B, M) or (M,) -> (B, M) float32; corners outside the map
    count 0."""
    b, c, h, w = maps.shape
    m = points.shape[1]
    flat = maps.reshape(b, c * h * w)
    channels = channels.expand(b, m) if channels.dim() == 1 else channels
    cells, weights = bilinear_corners(points, h, w)  # (4, B, M) each
    out = torch.zeros((b, m), dtype=torch.float32, device=maps.device)
    for cell, weight in zip(cells, weights, strict=True):
        out = out + flat.gather(1, channels * (h * w) + cell).float() * weight
    return out
