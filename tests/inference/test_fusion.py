"""Pose fusion and OKS: against slow, obviously-correct loop references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pinet_lightning.core.layouts import get_layout
from pinet_lightning.inference.fusion import oks_matrix, oks_nms, pose_areas, pose_fusion

SIGMAS = np.asarray(get_layout("crowdpose").sigmas)


def _area(pose: np.ndarray) -> float:
    xs, ys = pose[:, 0], pose[:, 1]
    return (max(xs) - min(xs)) * (max(ys) - min(ys))


def _ref_oks(ref: np.ndarray, other: np.ndarray, sigmas: np.ndarray) -> float:
    """The published oks_iou, one keypoint at a time: the scale is the MEAN of the two
    poses' areas."""
    area = (_area(ref) + _area(other)) / 2
    total = 0.0
    for k in range(len(sigmas)):
        d2 = (ref[k, 0] - other[k, 0]) ** 2 + (ref[k, 1] - other[k, 1]) ** 2
        total += math.exp(-d2 / ((2 * sigmas[k]) ** 2) / (area + np.spacing(1)) / 2)
    return total / len(sigmas)


def _ref_fusion(poses, scores, sigmas, thr):
    """The greedy definition of algorithm.md 5.7, one pose at a time."""
    m, k = poses.shape[:2]
    order = sorted(range(m), key=lambda i: (-scores[i], i))
    used = [False] * m
    fused, fused_scores = [], []
    for i in order:
        if used[i]:
            continue
        cluster = []
        for j in order:
            if not used[j] and (j == i or _ref_oks(poses[i], poses[j], sigmas) > thr):
                cluster.append(j)
        for j in cluster:
            used[j] = True
        pose = np.zeros((k, 3))
        for kk in range(k):
            best = cluster[0]
            for j in cluster:  # cluster is in greedy order: strict > keeps the first on ties
                if poses[j, kk, 2] > poses[best, kk, 2]:
                    best = j
            pose[kk] = poses[best, kk]
        fused.append(pose)
        fused_scores.append(pose[:, 2].mean())
    return np.asarray(fused).reshape(-1, k, 3), np.asarray(fused_scores)


def _random_poses(rng: np.random.Generator, m: int, k: int, ties: bool) -> tuple:
    """Random people around a few centres so that clusters form, plus jittered copies."""
    centres = rng.uniform(0, 200, size=(max(1, m // 4), 2))
    base = rng.normal(0, 20, size=(len(centres), k, 2)) + centres[:, None]
    pick = rng.integers(0, len(centres), size=m)
    xy = base[pick] + rng.normal(0, rng.choice([0.5, 3.0, 10.0]), size=(m, k, 2))
    if ties:  # quantized scores: many equal pose and keypoint scores
        kpt = rng.integers(0, 3, size=(m, k)).astype(float) / 2
        scores = rng.integers(0, 3, size=m).astype(float) / 2
    else:
        kpt = rng.uniform(0, 1, size=(m, k))
        scores = rng.uniform(0, 1, size=m)
    return np.concatenate([xy, kpt[..., None]], -1), scores


def test_oks_matrix_matches_reference():
    rng = np.random.default_rng(0)
    a, _ = _random_poses(rng, 7, 14, False)
    b, _ = _random_poses(rng, 5, 14, False)
    got = oks_matrix(a, b, SIGMAS)
    want = np.array([[_ref_oks(a[i], b[j], SIGMAS) for j in range(5)] for i in range(7)])
    assert got.shape == (7, 5)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(np.diag(oks_matrix(a, a, SIGMAS)), 1.0)
    np.testing.assert_allclose(pose_areas(a[:1]), [np.ptp(a[0, :, 0]) * np.ptp(a[0, :, 1])])
    np.testing.assert_allclose(got, oks_matrix(b, a, SIGMAS).T, rtol=1e-12)  # symmetric


def test_oks_uses_the_mean_of_the_two_areas():
    """A pose and a copy shifted 2 px right and stretched 2x down: the OKS scale is the mean
    of the two areas (published oks_iou), not the first pose's."""
    small = np.zeros((14, 2))
    small[:, 0] = np.linspace(0, 10, 14)
    small[:, 1] = np.linspace(0, 10, 14)  # extent 10 x 10: area 100
    large = np.stack([small[:, 0] + 2.0, small[:, 1] * 2.0], -1)  # extent 10 x 20: area 200
    d2 = (2.0**2) + (small[:, 1] - large[:, 1]) ** 2
    scale = (100.0 + 200.0) / 2
    want = np.mean(np.exp(-d2 / (2 * SIGMAS) ** 2 / (scale + np.spacing(1)) / 2))
    got = oks_matrix(small[None], large[None], SIGMAS)[0, 0]
    assert got == pytest.approx(want, rel=1e-12)
    leader_only = np.mean(np.exp(-d2 / (2 * SIGMAS) ** 2 / 100.0 / 2))
    assert abs(got - leader_only) > 1e-3  # the old rule (leader's area) is measurably off


@pytest.mark.parametrize("seed", range(40))
def test_pose_fusion_equals_greedy_reference(seed):
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, 40))
    poses, scores = _random_poses(rng, m, 14, ties=seed % 2 == 1)
    thr = float(rng.choice([0.3, 0.5, 0.7, 0.9]))
    fused, fused_scores = pose_fusion(poses, scores, SIGMAS, thr)
    want, want_scores = _ref_fusion(poses, scores, SIGMAS, thr)
    assert fused.shape == want.shape
    np.testing.assert_array_equal(fused, want)
    np.testing.assert_allclose(fused_scores, want_scores, rtol=1e-12)


def test_pose_fusion_clusters_duplicates_and_keeps_best_keypoints():
    rng = np.random.default_rng(3)
    person = rng.uniform(0, 100, size=(14, 2))
    far = person + 500.0
    copies = np.stack([person, person + 0.5, person - 0.5, far])
    kpt = np.full((4, 14), 0.2)
    kpt[1, 3] = 0.9  # second copy has the best keypoint 3
    poses = np.concatenate([copies, kpt[..., None]], -1)
    scores = np.array([0.9, 0.5, 0.4, 0.8])
    fused, fused_scores = pose_fusion(poses, scores, SIGMAS, 0.7)
    assert fused.shape == (2, 14, 3)
    np.testing.assert_array_equal(fused[0, 3], poses[1, 3])
    np.testing.assert_array_equal(fused[0, 0], poses[0, 0])
    np.testing.assert_array_equal(fused[1], poses[3])
    np.testing.assert_allclose(fused_scores, [(13 * 0.2 + 0.9) / 14, 0.2])


def test_pose_fusion_torch_and_empty():
    rng = np.random.default_rng(1)
    poses, scores = _random_poses(rng, 12, 14, False)
    fused_np, s_np = pose_fusion(poses, scores, SIGMAS)
    fused_t, s_t = pose_fusion(torch.tensor(poses), torch.tensor(scores), SIGMAS)
    assert isinstance(fused_t, torch.Tensor) and fused_t.dtype == torch.float64
    np.testing.assert_allclose(fused_t.numpy(), fused_np)
    np.testing.assert_allclose(s_t.numpy(), s_np)
    f32, _ = pose_fusion(torch.tensor(poses, dtype=torch.float32), torch.tensor(scores), SIGMAS)
    assert f32.dtype == torch.float32
    empty, empty_scores = pose_fusion(np.zeros((0, 14, 3)), np.zeros(0), SIGMAS)
    assert empty.shape == (0, 14, 3) and empty_scores.shape == (0,)
    with pytest.raises(ValueError, match="pose_fusion"):
        pose_fusion(np.zeros((2, 14, 2)), np.zeros(2), SIGMAS)


@pytest.mark.parametrize("seed", range(10))
def test_oks_nms_keeps_cluster_leaders(seed):
    rng = np.random.default_rng(100 + seed)
    poses, scores = _random_poses(rng, int(rng.integers(1, 30)), 14, ties=seed % 2 == 0)
    keep = oks_nms(poses, scores, SIGMAS, 0.7)
    # Reference NMS: walk in greedy order, keep a pose unless a kept one overlaps it.
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    suppressed, want = set(), []
    for i in order:
        if i in suppressed:
            continue
        want.append(i)
        for j in order:
            if j not in suppressed and j != i and _ref_oks(poses[i], poses[j], SIGMAS) > 0.7:
                suppressed.add(j)
    assert list(keep) == want
