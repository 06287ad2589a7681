"""Pose Refinement (PR, algorithm.md 3): a graph network over the K keypoints of each proposal.

Node features are the backbone features sampled bilinearly at the proposal's K coarse
keypoints; the graph is the layout skeleton plus self loops, symmetrically normalized and
kept learnable. One graph block, then L residual blocks of two graph blocks; the readout
(mean and max over nodes, plus the source-cell feature) predicts a correction to the coarse
offsets: refined offset = coarse offset + correction.

Memory layout: inside the network node features are node-major, (K, N, C), so the adjacency
product A (X W) is ONE (K, K) x (K, N*C) matrix product on a view (no copy). In the
proposal-major (N, K, C) layout ``matmul`` needs a transposed copy and a product per proposal
(timings: scripts/bench_refinement.py). The product gives bitwise the same values either
way; the module's parameters and outputs are unchanged (up to float rounding: the batch norm
statistics sum the rows in another order).

Batch norm layout: node features are normalized as K*N rows of C channels (BatchNorm1d(C));
the readout normalizes N rows. With a ``valid`` mask (training proposals beyond the count m
of algorithm.md 4), only valid proposals enter the batch statistics; invalid rows
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

from pinet_lightning.codec.conventions import Convention, get_convention
from pinet_lightning.core.layouts import Layout, get_layout
from pinet_lightning.core.sampling import bilinear_corners

__all__ = ["PoseRefinement", "normalized_adjacency", "sample_features", "MaskedBatchNorm1d"]


def normalized_adjacency(adjacency: np.ndarray | Tensor) -> Tensor:
    """D^-1/2 (A + I) D^-1/2 of a symmetric 0/1 (K, K) adjacency without self loops."""
    a = torch.as_tensor(np.asarray(adjacency), dtype=torch.float32)
    a = a + torch.eye(a.shape[0])
    d = a.sum(dim=1).rsqrt()
    return d[:, None] * a * d[None, :]


def _bilinear_gather(features: Tensor, points: Tensor, batch_index: Tensor) -> Tensor:
    """Bilinear samples of ``features`` (B, C, h, w) at ``points`` (*S, 2) (x, y) in cells of
    images ``batch_index`` (*S,) -> (*S, C); zero outside the map (pixel-center convention).

    The four corners of every point are read with ONE gather from the (B*h*w, C) view of the
    map: its backward is one accumulating ``index_put_`` into one zero gradient map, instead
    of one per corner and call (each as large as the whole feature map). Indexing, not
    ``index_select``: on CUDA its backward sums duplicate indices in float32 and
    deterministically, where ``index_add_`` would add bf16 atomics. The corners are summed in
    the fixed order (0,0), (1,0), (0,1), (1,1).
    """
    b, c, h, w = features.shape
    shape = points.shape[:-1]
    # A free view for channels-last maps (the usual training layout), one copy otherwise.
    flat = features.permute(0, 2, 3, 1).reshape(b * h * w, c)
    cell, weight = bilinear_corners(points.detach(), h, w)
    weight = weight.to(features.dtype)
    index = (batch_index.long() * (h * w))[None] + cell
    # unbind, not corners[i]: the backward of unbind stacks the four gradients once, that
    # of indexing would zero-fill a (4, *S, C) gradient per corner.
    c0, c1, c2, c3 = flat[index.reshape(-1)].view(4, *shape, c).unbind(0)
    w0, w1, w2, w3 = weight[..., None].unbind(0)
    return c0 * w0 + c1 * w1 + c2 * w2 + c3 * w3


def sample_features(features: Tensor, points: Tensor, batch_index: Tensor) -> Tensor:
    """Bilinear sampling of ``features`` (B, C, h, w) at ``points`` (N, M, 2) (x, y) in
    cells of image ``batch_index`` (N,) -> (N, M, C).

    Same values as ``grid_sample(align_corners=True, padding_mode="zeros")`` with the grid
    ``x / (w - 1) * 2 - 1`` (pixel centers at integer coordinates), but gathered from the
    flattened map, so proposals of different images share one call without copying a
    feature map per proposal.
    """
    n, m, _ = points.shape
    return _bilinear_gather(features, points, batch_index[:, None].expand(n, m))


class _MaskedNorm(torch.autograd.Function):
    """y = (x - mean) * invstd * weight + bias with statistics taken over weighted rows.

    ``mean`` and ``invstd`` come in detached; the backward adds their dependence on x
    analytically (the batch norm gradient restricted to the rows that made the statistics):

        dx_m = invstd * (dxhat_m - row_m * (sum_j dxhat_j + xhat_m * sum_j dxhat_j xhat_j))

    with dxhat = dy * weight and ``row_m`` = 1 / count for rows in the statistics, 0 for the
    others and everywhere when the running statistics were used. Autograd through the
    statistics would keep and re-read about a dozen (rows, C) temporaries per norm; this
    keeps x and reads it twice.
    """

    @staticmethod
    def forward(ctx, x: Tensor, row: Tensor, mean: Tensor, invstd: Tensor,  # type: ignore[override]
                weight: Tensor | None, bias: Tensor | None) -> Tensor:
        dtype = row.dtype
        scale = invstd if weight is None else invstd * weight.to(dtype)
        shift = -mean * scale if bias is None else bias.to(dtype) - mean * scale
        ctx.save_for_backward(x, row, mean, invstd, weight)
        ctx.has_bias = bias is not None
        with torch.autocast(x.device.type, enabled=False):
            return torch.addcmul(shift, x.to(dtype), scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, row, mean, invstd, weight = ctx.saved_tensors
        dtype = row.dtype
        with torch.autocast(x.device.type, enabled=False):
            g = grad.to(dtype)
            xhat = (x.to(dtype) - mean) * invstd
            grad_bias = g.sum(0)
            grad_weight = (g * xhat).sum(0)
            w = None if weight is None else weight.to(dtype)
            sum_dxhat = grad_bias if w is None else grad_bias * w
            sum_dxhat_xhat = grad_weight if w is None else grad_weight * w
            # dx = g * (invstd * weight) - row * invstd * (sum_dxhat + xhat * sum_dxhat_xhat)
            correction = torch.addcmul(sum_dxhat, xhat, sum_dxhat_xhat) * (invstd * row[:, None])
            scale = invstd if w is None else invstd * w
            grad_x = torch.addcmul(-correction, g, scale).to(x.dtype)
        if weight is None:
            return grad_x, None, None, None, None, None
        return (grad_x, None, None, None, grad_weight.to(weight.dtype),
                grad_bias.to(weight.dtype) if ctx.has_bias else None)


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over rows (M, C) whose training statistics can skip masked-out rows.

    With a mask (training): statistics (in float32, also under autocast) over the rows where
    the mask is true; the running statistics are updated only when at least two rows count,
    and are used instead when fewer do. All rows are normalized with those statistics.
    """

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if not self.training:
            return super().forward(x)
        if mask is None:
            if x.shape[0] > 1:
                return super().forward(x)
            # One row has no batch statistics: use the running ones, leave them unchanged.
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                self.bias, False, 0.0, self.eps)
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            w = mask.to(dtype)
            xf = x.to(dtype)
            count = w.sum()
            inv_count = 1 / count.clamp_min(1)
            # Column sums, not mv(x.t(), w): torch's pairwise summation keeps float32
            # statistics of 10^4..10^5 rows as accurate as the reference (BLAS gemv
            # accumulates sequentially; measured ~3x larger errors).
            mean = (xf * w[:, None]).sum(0) * inv_count
            var = ((xf - mean).square() * w[:, None]).sum(0) * inv_count
            enough = count > 1
            if self.running_mean is not None and self.running_var is not None:
                unbiased = var * count / (count - 1).clamp_min(1)
                mom = self.momentum if self.momentum is not None else 0.1
                new_mean = (1 - mom) * self.running_mean + mom * mean
                new_var = (1 - mom) * self.running_var + mom * unbiased
                self.running_mean.copy_(torch.where(enough, new_mean, self.running_mean))
                self.running_var.copy_(torch.where(enough, new_var, self.running_var))
                if self.num_batches_tracked is not None:
                    self.num_batches_tracked.add_(enough.long())
                mean = torch.where(enough, mean, self.running_mean.to(dtype))
                var = torch.where(enough, var, self.running_var.to(dtype))
            else:
                enough = torch.ones_like(enough)  # no running statistics: always the batch's
            invstd = torch.rsqrt(var + self.eps)
            # Rows in the statistics carry 1 / count in the gradient; none do when the
            # (constant) running statistics were used.
            row = w * torch.where(enough, inv_count, torch.zeros_like(inv_count))
        weight, bias = (self.weight, self.bias) if self.affine else (None, None)
        return _MaskedNorm.apply(x, row, mean, invstd, weight, bias)


class GraphBlock(nn.Module):
    """Graph conv A (X W) + b (A passed in: one learnable matrix shared by all blocks),
    batch norm over channels, ReLU, on node-major features (K, N, C)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, out_channels, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.norm = MaskedBatchNorm1d(out_channels)
        # The published graph convolution's start (algorithm.md 3): W Xavier-uniform with gain 1.414
        # (symmetric in fan-in and fan-out, so stored (out, in) it is the same law), b uniform
        # in +-1/sqrt(out features).
        nn.init.xavier_uniform_(self.linear.weight, gain=1.414)
        bound = 1.0 / out_channels**0.5
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, adjacency: Tensor, mask: Tensor | None) -> Tensor:
        """x (K, N, C_in) -> (K, N, C_out); ``mask`` (N,) selects the rows of the BN stats."""
        k, n, _ = x.shape
        y = self.linear(x)
        # One (K, K) x (K, N*C) product on a view: A mixes the nodes of every proposal.
        y = torch.mm(adjacency.to(y.dtype), y.view(k, -1)).view(k, n, -1) + self.bias.to(y.dtype)
        node_mask = None if mask is None else mask[None, :].expand(k, n).reshape(-1)
        y = self.norm(y.view(k * n, -1), node_mask).view(k, n, -1)
        return F.relu(y)


class ResidualGraphBlock(nn.Module):
    """Two graph blocks with a skip connection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block1 = GraphBlock(channels, channels)
        self.block2 = GraphBlock(channels, channels)

    def forward(self, x: Tensor, adjacency: Tensor, mask: Tensor | None) -> Tensor:
        return x + self.block2(self.block1(x, adjacency, mask), adjacency, mask)


class PoseRefinement(nn.Module):
    """PR graph network (algorithm.md 3), batched over all proposals of all images.

    Args:
        in_channels: C of the backbone features (480 for HRNet-W32).
        layout: a Layout (or name / mapping) whose skeleton gives the graph, or a (K, K) 0/1
            adjacency array.
        num_layers: L residual blocks (3 CrowdPose and OCHuman, 2 COCO).
        hidden_channels: width of the graph layers (default ``in_channels``).
        convention: cell/pixel convention (:mod:`pinet_lightning.codec.conventions`); it decides
            where the keypoints' features are read.

    The readout's two linear layers keep PyTorch's default initialization, as the published
    network's 1x1 convolutions do.
    """

    def __init__(self, in_channels: int, layout: Layout | str | Mapping[str, Any] | np.ndarray,
                 num_layers: int = 3, hidden_channels: int | None = None,
                 convention: str | Convention | None = None) -> None:
        super().__init__()
        self.convention = get_convention(convention)
        if isinstance(layout, (np.ndarray, Tensor)):
            adjacency = np.asarray(layout, dtype=np.float32)
        else:
            adjacency = get_layout(layout).adjacency()
        if adjacency.ndim != 2 or adjacency.shape[0] != adjacency.shape[1]:
            raise ValueError(f"adjacency must be (K, K), got {adjacency.shape}")
        self.num_keypoints = adjacency.shape[0]
        hidden = hidden_channels or in_channels
        self.adjacency = nn.Parameter(normalized_adjacency(adjacency))
        self.input_block = GraphBlock(in_channels, hidden)
        self.blocks = nn.ModuleList(ResidualGraphBlock(hidden) for _ in range(num_layers))
        self.readout = nn.Linear(2 * hidden + in_channels, hidden)
        self.readout_norm = MaskedBatchNorm1d(hidden)
        self.output = nn.Linear(hidden, 2 * self.num_keypoints)

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
            raise ValueError(f"poses must be (N, {k}, 2), got "
                             f"{tuple(poses.shape)}")
        if n == 0:
            return features.new_zeros((0, k, 2))
        # The K keypoints and the source cell of every proposal in one gather, node-major:
        # (K + 1, N, 2) points -> (K + 1, N, C) features.
        at = self.convention.feature_points(poses, *features.shape[-2:])
        points = torch.cat([at.transpose(0, 1), cells[None].to(at.dtype)], dim=0)
        sampled = _bilinear_gather(features, points, batch_index[None].expand(k + 1, n))
        nodes, source = sampled[:k], sampled[k]  # (K, N, C), (N, C)
        x = self.input_block(nodes, self.adjacency, valid)
        for block in self.blocks:
            x = block(x, self.adjacency, valid)
        pooled = torch.cat([x.mean(dim=0), x.amax(dim=0), source.to(x.dtype)], dim=1)
        y = F.relu(self.readout_norm(self.readout(pooled), valid))
        # The correction is added to float32 offsets: the last layer runs in float32 also
        # under bf16 autocast (bf16's 8 significant bits: errors up to c / 256 on c cells).
        with torch.autocast(y.device.type, enabled=False):
            return self.output(y.float()).view(n, k, 2)
