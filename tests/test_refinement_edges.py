"""Pose Refinement's construction by hand: the published initialization laws (SPEC 3), the
graph conv's single bias, the defaults (3 residual blocks, the cell_center convention), the
adjacency's dtype and shape checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pinet_lightning.conventions import Published
from pinet_lightning.refinement import GraphBlock, PoseRefinement, normalized_adjacency


def test_graph_conv_init_laws():
    torch.manual_seed(0)
    block = GraphBlock(300, 500)
    assert block.linear.bias is None  # b is the block's own parameter, added after A (X W)
    assert sorted(n for n, _ in block.named_parameters()) == [
        "bias", "linear.weight", "norm.bias", "norm.weight"]
    w_bound = 1.414 * math.sqrt(6 / (300 + 500))  # Xavier-uniform, gain 1.414
    w = block.linear.weight
    assert w.abs().max() <= w_bound and w.abs().max() > 0.99 * w_bound
    assert abs(float(w.std()) - w_bound / math.sqrt(3)) < 0.01 * w_bound
    b_bound = 1 / math.sqrt(500)  # uniform in +-1/sqrt(out features)
    b = block.bias
    assert b.max() <= b_bound and b.max() > 0.95 * b_bound
    assert b.min() >= -b_bound and b.min() < -0.95 * b_bound


def test_defaults_and_convention():
    net = PoseRefinement(8, "crowdpose")
    assert len(net.blocks) == 3 and net.num_keypoints == 14
    assert net.convention.name == "cell_center"
    assert isinstance(PoseRefinement(8, "crowdpose", convention="published").convention,
                      Published)


def test_adjacency_parameter_is_float32_and_checked():
    a = np.zeros((3, 3), np.int64)
    a[0, 1] = a[1, 0] = 1
    assert normalized_adjacency(a).dtype == torch.float32
    for layout in ("coco", a, torch.from_numpy(a)):
        assert PoseRefinement(4, layout).adjacency.dtype == torch.float32
    for bad in (np.zeros((3, 4)), np.zeros((2, 3, 3)), np.zeros(3)):
        with pytest.raises(ValueError, match=r"refinement.py: adjacency must be \(K, K\), got"):
            PoseRefinement(4, bad)
