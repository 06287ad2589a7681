"""Pose fusion and OKS at their edges: the strict OKS threshold, the default threshold,
given areas, degenerate poses, dtypes and input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pinet_lightning.core.layouts import get_layout
from pinet_lightning.inference.fusion import (
    greedy_clusters,
    oks_matrix,
    oks_nms,
    pose_areas,
    pose_fusion,
)

SIGMAS = np.asarray(get_layout("crowdpose").sigmas)


def _pair(shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Two poses (2, 14, 3): the second is the first moved by ``shift`` along x."""
    rng = np.random.default_rng(3)
    base = np.c_[rng.uniform(0, 1, (14, 2)) * [40, 80] + 100, rng.uniform(0.2, 1, 14)]
    other = base.copy()
    other[:, 0] += shift
    other[:, 2] = base[:, 2][::-1]  # each pose holds some of the best keypoints
    return np.stack([base, other]), np.array([0.9, 0.8])


def test_threshold_is_strict_at_exactly_the_oks():
    poses, scores = _pair(4.0)
    oks = oks_matrix(poses, poses, SIGMAS)[0, 1]
    assert 0.3 < oks < 0.99
    fused, _ = pose_fusion(poses, scores, SIGMAS, oks_threshold=oks)
    assert len(fused) == 2  # OKS == threshold: not merged
    fused, _ = pose_fusion(poses, scores, SIGMAS, oks_threshold=np.nextafter(oks, 0))
    assert len(fused) == 1
    assert len(oks_nms(poses, scores, SIGMAS, oks_threshold=oks)) == 2
    assert list(oks_nms(poses, scores, SIGMAS, oks_threshold=np.nextafter(oks, 0))) == [0]
    table = np.array([[1.0, 0.7], [0.7, 1.0]])
    assert list(greedy_clusters(table, np.array([1.0, 0.5]), 0.7)) == [0, 1]
    assert list(greedy_clusters(table, np.array([1.0, 0.5]), 0.69)) == [0, 0]


def test_default_threshold_is_0_7():
    poses, scores = _pair(6.0)
    oks = oks_matrix(poses, poses, SIGMAS)[0, 1]
    assert 0.7 < oks < 0.8  # merged by the default 0.7, kept apart by 0.8
    assert len(pose_fusion(poses, scores, SIGMAS)[0]) == 1
    assert len(pose_fusion(poses, scores, SIGMAS, 0.8)[0]) == 2
    assert list(oks_nms(poses, scores, SIGMAS)) == [0]
    assert list(oks_nms(poses, scores, SIGMAS, 0.8)) == [0, 1]


def test_given_areas_replace_the_keypoint_extent():
    poses, scores = _pair(6.0)
    extent = pose_areas(poses)
    assert oks_matrix(poses, poses, SIGMAS, extent, extent) == pytest.approx(
        oks_matrix(poses, poses, SIGMAS))
    # Four times the area: every exponent is divided by 4.
    big = 4 * extent
    d2 = ((poses[0, :, :2] - poses[1, :, :2]) ** 2).sum(-1)
    expected = np.exp(-d2 / (2 * SIGMAS) ** 2 / (big.mean() * 2)).mean()
    got = oks_matrix(poses, poses, SIGMAS, big, big)
    assert got[0, 1] == pytest.approx(expected) and got[1, 0] == pytest.approx(expected)
    # Only one side given: the pair's scale is the mean of the given and the extent.
    half = oks_matrix(poses[:1], poses[1:], SIGMAS, areas_a=big[:1])[0, 0]
    expected_half = np.exp(-d2 / (2 * SIGMAS) ** 2 / ((big[0] + extent[1]) / 2 * 2)).mean()
    assert half == pytest.approx(expected_half)
    half_b = oks_matrix(poses[:1], poses[1:], SIGMAS, areas_b=big[1:])[0, 0]
    assert half_b == pytest.approx(np.exp(-d2 / (2 * SIGMAS) ** 2
                                          / ((extent[0] + big[1]) / 2 * 2)).mean())
    # oks_nms scales both poses by the given areas: a threshold between the OKS with both
    # areas given and the OKS with one given (and one extent) tells them apart.
    both = got[0, 1]
    mixed = max(half, half_b)
    assert mixed < both
    thr = (mixed + both) / 2
    assert list(oks_nms(poses, scores, SIGMAS, thr, areas=big)) == [0]
    assert list(oks_nms(poses, scores, SIGMAS, thr)) == [0, 1]


def test_zero_area_poses():
    """Both poses collapsed to one point each: no scale, OKS 1 when they coincide and 0
    (not NaN or inf) when they do not."""
    a = np.zeros((1, 14, 2)) + [5.0, 7.0]
    b = a + [1.0, 0.0]
    assert pose_areas(a) == pytest.approx([0.0])
    assert oks_matrix(a, a, SIGMAS)[0, 0] == pytest.approx(1.0)
    assert oks_matrix(a, b, SIGMAS)[0, 0] == 0.0


def test_empty_and_dtypes():
    empty = pose_areas(np.zeros((0, 14, 3)))
    assert empty.shape == (0,) and empty.dtype == np.float64
    poses, scores = _pair(4.0)
    got = oks_matrix(poses.astype(np.float32), torch.from_numpy(poses), SIGMAS)
    assert got.dtype == np.float64 and got.shape == (2, 2)
    assert pose_areas(torch.from_numpy(poses).half()).dtype == np.float64
    fused, fused_scores = pose_fusion(poses.astype(np.float32), scores, SIGMAS, 0.8)
    assert fused.dtype == np.float32 and fused_scores.dtype == np.float32
    fused, fused_scores = pose_fusion(poses.astype(np.int64), scores, SIGMAS, 0.8)
    assert fused.dtype == np.float64 and fused_scores.dtype == np.float64
    t_fused, t_scores = pose_fusion(torch.from_numpy(poses).float(), torch.from_numpy(scores),
                                    SIGMAS, 0.8)
    assert t_fused.dtype == torch.float32 and t_scores.dtype == torch.float32
    t_fused, t_scores = pose_fusion(torch.from_numpy(poses), torch.from_numpy(scores),
                                    SIGMAS, 0.8)
    assert t_fused.dtype == torch.float64 and t_scores.dtype == torch.float64
    # Fused score: the mean keypoint score of the fused pose.
    assert t_scores.numpy() == pytest.approx(t_fused[..., 2].mean(-1).numpy())


@pytest.mark.parametrize("shapes", [((2, 14, 2), (3, 13, 2)), ((2, 14, 2), (14, 2)),
                                    ((14, 2), (3, 14, 2)), ((2, 13, 2), (3, 13, 2)),
                                    ((2, 14), (3, 14, 2))])
def test_oks_matrix_rejects_bad_shapes(shapes):
    a, b = (np.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=r"fusion.oks_matrix: poses must be \(M, K, 2\+\)"):
        oks_matrix(a, b, SIGMAS)
