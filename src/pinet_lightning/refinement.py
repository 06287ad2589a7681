"""Pose Refinement (PR, SPEC 3): a graph network over the K keypoints of each proposal.

Node features are the backbone features sampled bilinearly at the proposal's K coarse
keypoints; the graph is the layout skeleton plus self loops, symmetrically normalized and
kept learnable. One graph block, then L residual blocks of two graph blocks; the readout
(mean and max over nodes, plus the source-cell feature) predicts a correction to the coarse
offsets: refined offset = coarse offset + correction.

Batch norm layout: node features are (N, K, C) and normalized as N*K rows of C channels
(BatchNorm1d(C)); the readout normalizes N rows. With a ``valid`` mask (training proposals
beyond the count m of SPEC 4), only valid proposals enter the batch statistics; invalid rows
are normalized with those statistics and their loss is masked by the caller. When fewer than
two rows are valid (e.g. N = 1 in training), the running statistics are used and not updated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pinet_lightning.layouts import Layout, get_layout

__all__ = ["PoseRefinement", "normalized_adjacency", "sample_features", "MaskedBatchNorm1d"]


def normalized_adjacency(adjacency: np.ndarray | Tensor) -> Tensor:
    """D^-1/2 (A + I) D^-1/2 of a symmetric 0/1 (K, K) adjacency without self loops."""
    a = torch.as_tensor(np.asarray(adjacency), dtype=torch.float32)
    a = a + torch.eye(a.shape[0])
    d = a.sum(dim=1).rsqrt()
    return d[:, None] * a * d[None, :]


def sample_features(features: Tensor, points: Tensor, batch_index: Tensor) -> Tensor:
    """Bilinear sampling of ``features`` (B, C, h, w) at ``points`` (N, M, 2) (x, y) in
    cells of image ``batch_index`` (N,) -> (N, M, C).

    Same values as ``grid_sample(align_corners=True, padding_mode="zeros")`` with the grid
    ``x / (w - 1) * 2 - 1`` (pixel centers at integer coordinates), but gathered from the
    flattened map, so proposals of different images share one call without copying a
    feature map per proposal.
    """
    b, c, h, w = features.shape
    n, m, _ = points.shape
    flat = features.permute(0, 2, 3, 1).reshape(b * h * w, c)
    pts = points.detach().float()
    x0 = pts[..., 0].floor()
    y0 = pts[..., 1].floor()
    fx = pts[..., 0] - x0
    fy = pts[..., 1] - y0
    x0 = x0.long()
    y0 = y0.long()
    base = (batch_index.long() * (h * w))[:, None]
    out = features.new_zeros((n, m, c))
    for dx, dy, weight in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                           (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi = x0 + dx
        yi = y0 + dy
        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        index = base + yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)
        weight = (weight * inside).to(features.dtype)
        out = out + flat[index.reshape(-1)].view(n, m, c) * weight[..., None]
    return out


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over rows (M, C) whose training statistics can skip masked-out rows."""

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if not self.training:
            return super().forward(x)
        if mask is None:
            if x.shape[0] > 1:
                return super().forward(x)
            # One row has no batch statistics: use the running ones, leave them unchanged.
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                self.bias, False, 0.0, self.eps)
        w = mask.to(torch.float32)[:, None]
        xf = x.float()
        count = w.sum()
        mean = (xf * w).sum(0) / count.clamp_min(1)
        var = ((xf - mean) ** 2 * w).sum(0) / count.clamp_min(1)
        enough = count > 1
        if self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                unbiased = var * count / (count - 1).clamp_min(1)
                mom = self.momentum if self.momentum is not None else 0.1
                new_mean = (1 - mom) * self.running_mean + mom * mean
                new_var = (1 - mom) * self.running_var + mom * unbiased
                self.running_mean.copy_(torch.where(enough, new_mean, self.running_mean))
                self.running_var.copy_(torch.where(enough, new_var, self.running_var))
                if self.num_batches_tracked is not None:
                    self.num_batches_tracked.add_(enough.long())
            mean = torch.where(enough, mean, self.running_mean)
            var = torch.where(enough, var, self.running_var)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


class GraphBlock(nn.Module):
    """Graph conv A (X W) + b (A passed in: one learnable matrix shared by all blocks),
    batch norm over channels, ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, out_channels, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.norm = MaskedBatchNorm1d(out_channels)

    def forward(self, x: Tensor, adjacency: Tensor, mask: Tensor | None) -> Tensor:
        n, k, _ = x.shape
        y = torch.matmul(adjacency.to(x.dtype), self.linear(x)) + self.bias.to(x.dtype)
        node_mask = None if mask is None else mask[:, None].expand(n, k).reshape(-1)
        y = self.norm(y.reshape(n * k, -1), node_mask).view(n, k, -1)
        return F.relu(y)


class ResidualGraphBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block1 = GraphBlock(channels, channels)
        self.block2 = GraphBlock(channels, channels)

    def forward(self, x: Tensor, adjacency: Tensor, mask: Tensor | None) -> Tensor:
        return x + self.block2(self.block1(x, adjacency, mask), adjacency, mask)


class PoseRefinement(nn.Module):
    """PR graph network (SPEC 3), batched over all proposals of all images.

    Args:
        in_channels: C of the backbone features (480 for HRNet-W32).
        layout: a Layout (or name / mapping) whose skeleton gives the graph, or a (K, K) 0/1
            adjacency array.
        num_layers: L residual blocks (3 CrowdPose, 2 COCO/OCHuman).
        hidden_channels: width of the graph layers (default ``in_channels``).
        init_std: std of the last layer's weights (0.001, biases 0): corrections start near
            zero so the coarse poses are not disturbed early in training.
    """

    def __init__(self, in_channels: int, layout: Layout | str | Mapping[str, Any] | np.ndarray,
                 num_layers: int = 3, hidden_channels: int | None = None,
                 init_std: float = 0.001) -> None:
        super().__init__()
        if isinstance(layout, (np.ndarray, Tensor)):
            adjacency = np.asarray(layout, dtype=np.float32)
        else:
            adjacency = get_layout(layout).adjacency()
        if adjacency.ndim != 2 or adjacency.shape[0] != adjacency.shape[1]:
            raise ValueError(f"refinement.py: adjacency must be (K, K), got {adjacency.shape}")
        self.num_keypoints = adjacency.shape[0]
        hidden = hidden_channels or in_channels
        self.adjacency = nn.Parameter(normalized_adjacency(adjacency))
        self.input_block = GraphBlock(in_channels, hidden)
        self.blocks = nn.ModuleList(ResidualGraphBlock(hidden) for _ in range(num_layers))
        self.readout = nn.Linear(2 * hidden + in_channels, hidden)
        self.readout_norm = MaskedBatchNorm1d(hidden)
        self.output = nn.Linear(hidden, 2 * self.num_keypoints)
        nn.init.normal_(self.output.weight, std=init_std)
        nn.init.zeros_(self.output.bias)

    def forward(self, features: Tensor, poses: Tensor, cells: Tensor, batch_index: Tensor,
                valid: Tensor | None = None) -> Tensor:
        """Correction (N, K, 2) to the coarse offsets of N proposals.

        Args:
            features: (B, C, h, w) backbone features.
            poses: (N, K, 2) coarse poses (x, y) in output cells.
            cells: (N, 2) source cells (x, y). batch_index: (N,) image of each proposal.
            valid: optional (N,) bool; only valid proposals shape the batch statistics.
        """
        n, k = poses.shape[0], self.num_keypoints
        if poses.ndim != 3 or poses.shape[1:] != (k, 2):
            raise ValueError(f"refinement.py: poses must be (N, {k}, 2), got "
                             f"{tuple(poses.shape)}")
        if n == 0:
            return features.new_zeros((0, k, 2))
        nodes = sample_features(features, poses, batch_index)  # (N, K, C)
        source = sample_features(features, cells[:, None, :].to(poses.dtype), batch_index)[:, 0]
        x = self.input_block(nodes, self.adjacency, valid)
        for block in self.blocks:
            x = block(x, self.adjacency, valid)
        pooled = torch.cat([x.mean(dim=1), x.amax(dim=1), source.to(x.dtype)], dim=1)
        y = F.relu(self.readout_norm(self.readout(pooled), valid))
        return self.output(y).view(n, k, 2)
