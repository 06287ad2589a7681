"""Pose Refinement's construction by hand: the published initialization laws (algorithm.md 3), the
graph conv's single bias, the defaults (3 residual blocks, the cell_center convention), the
adjacency's dtype and shape checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pinet_lightning.codec.conventions import Published
from pinet_lightning.model.refinement import (
    GraphBlock,
    MaskedBatchNorm1d,
    PoseRefinement,
    normalized_adjacency,
)


def test_graph_conv_init_laws():
    torch.manual_seed(0)
    block = GraphBlock(300, 500)
    assert block.linear.bias is None  # b is the block's own parameter, added after A (X W)
    assert sorted(n for n, _ in block.named_parameters()) == [
        "bias", "linear.weight", "norm.bias", "norm.weight"]
    w_bound = 1.414 * math.sqrt(6 / (300 + 500))  # Xavier-uniform, gain 1.414
    w = block.linear.weight.detach()
    assert w.abs().max() <= w_bound and w.abs().max() > 0.99 * w_bound
    assert abs(float(w.std()) - w_bound / math.sqrt(3)) < 0.01 * w_bound
    b_bound = 1 / math.sqrt(500)  # uniform in +-1/sqrt(out features)
    b = block.bias.detach()
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
        with pytest.raises(ValueError, match=r"adjacency must be \(K, K\), got"):
            PoseRefinement(4, bad)


def _reference_bn(x, rows, weight, bias, eps):
    sel = x[rows]
    mean, var = sel.mean(0), sel.var(0, unbiased=False)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias, mean, sel.var(0, unbiased=True)


@pytest.mark.parametrize("momentum", [0.3, None])
def test_masked_batch_norm_statistics_by_hand(momentum):
    torch.manual_seed(0)
    bn = MaskedBatchNorm1d(5, eps=0.1, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.5, 2.0)
    start_mean, start_var = bn.running_mean.clone(), bn.running_var.clone()
    mom = 0.1 if momentum is None else momentum
    x = torch.randn(6, 5) * 3 + 1
    for rows in ([0, 3], [0, 1, 2, 3, 4, 5]):  # exactly two rows are enough for statistics
        mask = torch.zeros(6, dtype=torch.bool)
        mask[rows] = True
        bn.running_mean.copy_(start_mean)
        bn.running_var.copy_(start_var)
        y = bn(x, mask if len(rows) < 6 else None)
        want, mean, unbiased = _reference_bn(x, rows, bn.weight, bn.bias, 0.1)
        if len(rows) == 6 and momentum is None:
            continue  # nn.BatchNorm1d's own cumulative average
        assert torch.allclose(y, want, atol=1e-5)
        assert torch.allclose(bn.running_mean, (1 - mom) * start_mean + mom * mean, atol=1e-6)
        assert torch.allclose(bn.running_var, (1 - mom) * start_var + mom * unbiased, atol=1e-5)
    # No mask and two rows: the batch's statistics too.
    y = bn(x[:2])
    assert torch.allclose(y, _reference_bn(x[:2], [0, 1], bn.weight, bn.bias, 0.1)[0], atol=1e-5)
    # One row: the running statistics, unchanged (eps 0.1 is the module's, not the default).
    bn.running_mean.copy_(start_mean)
    bn.running_var.copy_(start_var)
    y = bn(x[:1])
    want = (x[:1] - start_mean) / torch.sqrt(start_var + 0.1) * bn.weight + bn.bias
    assert torch.allclose(y, want, atol=1e-5) and torch.equal(bn.running_mean, start_mean)


def test_masked_batch_norm_without_affine_or_running_statistics():
    torch.manual_seed(1)
    x = torch.randn(5, 3, requires_grad=True)
    mask = torch.tensor([True, True, False, True, True])
    for bn in (MaskedBatchNorm1d(3, affine=False), MaskedBatchNorm1d(3, affine=False,
                                                                     track_running_stats=False)):
        y = bn(x, mask)
        want = _reference_bn(x.detach(), mask, 1.0, 0.0, bn.eps)[0]
        assert torch.allclose(y, want, atol=1e-5)
        # Gradient: the batch-norm gradient over the rows in the statistics.
        g = torch.randn(5, 3)
        (grad,) = torch.autograd.grad((y * g).sum(), x)
        xr = x.detach().clone().requires_grad_()
        sel = xr[mask]
        ref = (xr - sel.mean(0)) / torch.sqrt(sel.var(0, unbiased=False) + bn.eps)
        (want_grad,) = torch.autograd.grad((ref * g).sum(), xr)
        assert torch.allclose(grad, want_grad, atol=1e-5)
