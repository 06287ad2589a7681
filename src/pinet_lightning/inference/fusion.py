"""Pose fusion (algorithm.md 5.7) and OKS utilities.

Conventions chosen here (the paper leaves them open; algorithm.md 5.7 records them):

- A pose is ``(K, 3)``: ``(x, y, keypoint score)`` in image pixels. Decoded proposals
  predict every keypoint, so **all K keypoints count**, both for the OKS distance and for
  the pose's extent.
- Area of a pose = ``(max x - min x) * (max y - min y)`` over its K keypoints.
- ``OKS[i, j] = mean_k exp(-d^2 / (2 s (2 sigma_k)^2))`` with ``s`` the mean of the two
  poses' areas (the published ``oks_iou``; symmetric in i and j).
- Greedy order: the given scores (decoding passes each proposal's mean keypoint score, as
  the published inference) sorted descending with a stable sort (ties: lower input index
  first). A pose joins the leader's cluster when ``OKS > oks_threshold`` (strict). Per
  keypoint, the fused pose takes the candidate with the highest keypoint score; ties go
  to the candidate that comes first in the greedy order. Fused poses come out in leader
  order (the leader has the highest pose score of its cluster).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

__all__ = ["pose_areas", "oks_matrix", "oks_nms", "greedy_clusters", "pose_fusion"]

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def _to_numpy(x: np.ndarray | torch.Tensor, dtype=np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def pose_areas(poses: np.ndarray | torch.Tensor) -> np.ndarray:
    """Area of each pose's keypoint extent: (max x - min x) * (max y - min y); (M,)."""
    p = _to_numpy(poses)
    if p.shape[0] == 0:
        return np.zeros((0,), dtype=np.float64)
    extent = p[..., :2].max(axis=1) - p[..., :2].min(axis=1)
    return extent[:, 0] * extent[:, 1]


def oks_matrix(
    poses_a: np.ndarray | torch.Tensor,
    poses_b: np.ndarray | torch.Tensor,
    sigmas: np.ndarray | torch.Tensor | list[float],
    areas_a: np.ndarray | torch.Tensor | None = None,
    areas_b: np.ndarray | torch.Tensor | None = None,
) -> np.ndarray:
    """OKS of every pose of ``poses_b`` against every pose of ``poses_a``; the scale of a
    pair is the mean of its two areas.

    Args:
        poses_a: (M, K, 2+) poses (x, y, ...).
        poses_b: (N, K, 2+) poses.
        sigmas: (K,) OKS sigmas (already /10, as ``Layout.sigmas``).
        areas_a, areas_b: (M,), (N,) areas; default: each pose's keypoint extent.

    Returns:
        (M, N) float64 numpy array.
    """
    a = _to_numpy(poses_a)
    b = _to_numpy(poses_b)
    s = _to_numpy(sigmas)
    if a.ndim != 3 or b.ndim != 3 or a.shape[1] != b.shape[1] or a.shape[1] != s.shape[0]:
        raise ValueError(
            f"fusion.oks_matrix: poses must be (M, K, 2+) and (N, K, 2+) with K = "
            f"len(sigmas); got {a.shape}, {b.shape}, {s.shape}"
        )
    area_a = pose_areas(a) if areas_a is None else _to_numpy(areas_a)
    area_b = pose_areas(b) if areas_b is None else _to_numpy(areas_b)
    scale = (area_a[:, None] + area_b[None, :]) / 2.0  # (M, N)
    var = (2.0 * s) ** 2  # (K,)
    d2 = ((a[:, None, :, :2] - b[None, :, :, :2]) ** 2).sum(-1)  # (M, N, K)
    e = d2 / var / (scale[:, :, None] + np.spacing(1)) / 2.0
    return np.exp(-e).mean(-1)


def greedy_clusters(oks: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy clustering over an OKS matrix: returns a cluster label per pose (M,),
    labels numbered in leader order. Loops over clusters only, touching precomputed rows."""
    m = scores.shape[0]
    labels = np.full(m, -1, dtype=np.int64)
    if m == 0:
        return labels
    order = np.argsort(-scores, kind="stable")
    used = np.zeros(m, dtype=bool)
    rank = 0  # position in `order` of the next candidate leader
    cluster = 0
    while True:
        free = ~used[order[rank:]]
        if not free.any():
            break
        rank += int(np.argmax(free))
        leader = order[rank]
        members = ~used & (oks[leader] > threshold)
        members[leader] = True
        labels[members] = cluster
        used |= members
        cluster += 1
    return labels


def oks_nms(
    poses: ArrayT,
    scores: ArrayT,
    sigmas: np.ndarray | list[float],
    oks_threshold: float = 0.7,
    areas: np.ndarray | None = None,
) -> np.ndarray:
    """Greedy OKS non-maximum suppression: indices of the kept poses, best first."""
    sc = _to_numpy(scores)
    oks = oks_matrix(poses, poses, sigmas, areas, areas)
    labels = greedy_clusters(oks, sc, oks_threshold)
    order = np.argsort(-sc, kind="stable")
    # The leader of each cluster is its first member in greedy order.
    _, first = np.unique(labels[order], return_index=True)
    return order[first]


def pose_fusion(
    poses: ArrayT,
    scores: ArrayT,
    sigmas: np.ndarray | torch.Tensor | list[float],
    oks_threshold: float = 0.7,
) -> tuple[ArrayT, ArrayT]:
    """Fuse proposals of one image (algorithm.md 5.7).

    Args:
        poses: (M, K, 3) (x, y, keypoint score) in image pixels, numpy or torch.
        scores: (M,) pose scores.
        sigmas: (K,) OKS sigmas.
        oks_threshold: a pose joins a cluster when its OKS to the leader is above this.

    Returns:
        fused poses (F, K, 3) and fused scores (F,) = mean keypoint score, in the input's
        type (and device / dtype for torch).
    """
    is_torch = isinstance(poses, torch.Tensor)
    p = _to_numpy(poses)
    sc = _to_numpy(scores)
    if p.ndim != 3 or p.shape[-1] != 3 or sc.shape != (p.shape[0],):
        raise ValueError(
            f"fusion.pose_fusion: poses must be (M, K, 3) and scores (M,); got {p.shape}, "
            f"{sc.shape}"
        )
    m, k = p.shape[:2]
    if m == 0:
        fused = np.zeros((0, k, 3))
        fused_scores = np.zeros((0,))
    else:
        oks = oks_matrix(p, p, sigmas)
        labels = greedy_clusters(oks, sc, oks_threshold)
        order = np.argsort(-sc, kind="stable")
        ps, ls = p[order], labels[order]  # greedy order: argmax ties pick the earliest
        # Per keypoint: sort by (cluster, keypoint score descending, greedy rank); the first
        # row of each cluster is its best candidate. Group boundaries are the same in every
        # keypoint column, so one lexsort over (M, K) keys handles all keypoints at once.
        rank = np.broadcast_to(np.arange(m)[:, None], (m, k))
        lab = np.broadcast_to(ls[:, None], (m, k))
        by_kpt = np.lexsort((rank, -ps[:, :, 2], lab), axis=0)  # (M, K) rows of ps
        starts = np.concatenate([[0], np.cumsum(np.bincount(ls))[:-1]])
        best = by_kpt[starts]  # (F, K) index into greedy order
        fused = ps[best, np.arange(k)[None, :]]  # (F, K, 3)
        fused_scores = fused[..., 2].mean(-1)
    if is_torch:
        ref = poses
        return (
            torch.as_tensor(fused, dtype=ref.dtype, device=ref.device),
            torch.as_tensor(fused_scores, dtype=ref.dtype, device=ref.device),
        )
    dtype = np.result_type(np.asarray(poses).dtype, np.float32)
    return fused.astype(dtype), fused_scores.astype(dtype)
