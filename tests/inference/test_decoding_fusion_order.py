"""Pose fusion's order (algorithm.md 5.7): proposals lead their clusters by their MEAN
keypoint score. The poses here have unequal keypoint scores, so that the mean and the max
(or any single keypoint) disagree on who leads; the clusters, and so the people found,
depend on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pinet_lightning.core.layouts import get_layout
from pinet_lightning.inference.decoding import fuse_batch
from pinet_lightning.inference.fusion import oks_matrix


def test_the_mean_keypoint_score_not_the_max_orders_the_fusion():
    layout = get_layout("crowdpose")
    k = layout.num_keypoints
    base = np.stack([np.linspace(0, 60, k), np.linspace(0, 120, k)], -1)
    poses = np.stack([base, base + [6.0, 0.0], base + [12.0, 0.0]])  # A, B, C
    oks = oks_matrix(poses, poses, np.asarray(layout.sigmas))
    assert oks[0, 1] > 0.7 and oks[1, 2] > 0.7 and oks[0, 2] <= 0.7  # a chain A - B - C
    scores = np.array([[0.1] * k, [0.5] * k, [0.3] * k])
    scores[0, 0] = 0.99  # A: the best single keypoint (max 0.99) but a mean of 0.16
    proposals = np.concatenate([poses, scores[..., None]], -1)
    (fused, fused_scores), = fuse_batch(torch.from_numpy(proposals)[None].float(),
                                        torch.ones(1, 3, dtype=torch.bool), layout.sigmas)
    # B (mean 0.5) leads and takes A and C: one person. Ordered by the max, A would lead
    # {A, B} and leave C alone: two.
    assert fused.shape == (1, k, 3)
    expected = proposals[1].copy()
    expected[0] = proposals[0, 0]  # per keypoint the cluster's best: A's keypoint 0
    np.testing.assert_allclose(fused[0].numpy(), expected, atol=1e-6)
    assert float(fused_scores[0]) == pytest.approx((0.99 + 0.5 * (k - 1)) / k, abs=1e-6)
