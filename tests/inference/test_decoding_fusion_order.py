"""Pose fusion's order (algorithm.md 5.7): proposals lead their clusters by their MEAN
keypoint score, not by their part-heatmap peak nor by their best keypoint. Three poses form a
chain, A - B - C (A and C do not overlap), so whoever leads decides the clusters and so the
people found."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pinet_lightning.core.layouts import get_layout
from pinet_lightning.inference.decoding import fuse_batch
from pinet_lightning.inference.fusion import oks_matrix, pose_fusion

LAYOUT = get_layout("crowdpose")


def _chain() -> np.ndarray:
    """Poses A, B, C (3, K, 2): A overlaps B, B overlaps C, A and C do not (OKS 0.7)."""
    k = LAYOUT.num_keypoints
    base = np.stack([np.linspace(0, 60, k), np.linspace(0, 120, k)], -1)
    poses = np.stack([base, base + [6.0, 0.0], base + [12.0, 0.0]])
    oks = oks_matrix(poses, poses, np.asarray(LAYOUT.sigmas))
    assert oks[0, 1] > 0.7 and oks[1, 2] > 0.7 and oks[0, 2] <= 0.7
    return poses


def _fuse(proposals: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    (fused, scores), = fuse_batch(torch.from_numpy(proposals)[None].float(),
                                  torch.ones(1, len(proposals), dtype=torch.bool),
                                  LAYOUT.sigmas)
    return fused, scores


def test_fusion_order_is_the_mean_keypoint_score_not_the_peak():
    """B has the best mean keypoint score, A the best part-heatmap peak."""
    poses, k = _chain(), LAYOUT.num_keypoints
    kpt = np.array([0.5, 0.8, 0.3])[:, None].repeat(k, 1)
    with_scores = np.concatenate([poses, kpt[..., None]], -1)
    peaks = np.array([0.9, 0.2, 0.1])
    by_peak, _ = pose_fusion(with_scores, peaks, np.asarray(LAYOUT.sigmas), 0.7)
    assert len(by_peak) == 2  # A leads {A, B}, C alone
    fused, scores = _fuse(with_scores)
    assert fused.shape == (1, k, 3)  # B leads and takes A and C
    assert torch.allclose(fused[0, :, :2], torch.from_numpy(poses[1]).float())
    assert float(scores[0]) == pytest.approx(0.8)


def test_the_mean_keypoint_score_not_the_max_orders_the_fusion():
    """Unequal keypoint scores: the mean and the max (or any single keypoint) disagree."""
    poses, k = _chain(), LAYOUT.num_keypoints
    scores = np.array([[0.1] * k, [0.5] * k, [0.3] * k])
    scores[0, 0] = 0.99  # A: the best single keypoint (max 0.99) but a mean of 0.16
    proposals = np.concatenate([poses, scores[..., None]], -1)
    fused, fused_scores = _fuse(proposals)
    # B (mean 0.5) leads and takes A and C: one person. Ordered by the max, A would lead
    # {A, B} and leave C alone: two.
    assert fused.shape == (1, k, 3)
    expected = proposals[1].copy()
    expected[0] = proposals[0, 0]  # per keypoint the cluster's best: A's keypoint 0
    np.testing.assert_allclose(fused[0].numpy(), expected, atol=1e-6)
    assert float(fused_scores[0]) == pytest.approx((0.99 + 0.5 * (k - 1)) / k, abs=1e-6)
