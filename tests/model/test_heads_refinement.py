"""PPG heads and the Pose Refinement graph network (algorithm.md 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pinet_lightning.core.layouts import get_layout
from pinet_lightning.model.heads import PPGHeads
from pinet_lightning.model.refinement import (
    MaskedBatchNorm1d,
    PoseRefinement,
    normalized_adjacency,
    sample_features,
)

C, H, W = 16, 10, 12


def test_heads_shapes_and_init():
    heads = PPGHeads(C, 14, 3)
    hm, phm, off = heads(torch.randn(2, C, H, W))
    assert hm.shape == (2, 14, H, W) and phm.shape == (2, 3, H, W)
    assert off.shape == (2, 3 * 14 * 2, H, W)
    heads = PPGHeads(480, 17, 3)
    for conv in (heads.heatmap, heads.part_heatmap, heads.offset):
        assert conv.kernel_size == (1, 1)
        assert torch.all(conv.bias == 0)
        assert 0.0007 < conv.weight.std().item() < 0.0013
        assert abs(conv.weight.mean().item()) < 0.0003


def test_sample_features_matches_grid_sample_align_corners():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, C, H, W, generator=g)
    # Points inside, on the border and outside the map.
    pts = torch.rand(7, 5, 2, generator=g) * torch.tensor([W + 3.0, H + 3.0]) - 1.5
    pts[0, 0] = torch.tensor([W - 1.0, H - 1.0])
    pts[0, 1] = torch.tensor([0.0, 0.0])
    batch_index = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    out = sample_features(feats, pts, batch_index)
    grid = torch.stack([pts[..., 0] / (W - 1) * 2 - 1, pts[..., 1] / (H - 1) * 2 - 1], dim=-1)
    ref = F.grid_sample(feats[batch_index], grid[:, None], align_corners=True)
    ref = ref[:, :, 0].permute(0, 2, 1)
    assert out.shape == (7, 5, C)
    assert torch.allclose(out, ref, atol=1e-5)
    # Integer points read the cell itself.
    assert torch.allclose(out[0, 0], feats[0, :, H - 1, W - 1])


def test_adjacency_init_is_symmetric_normalized_skeleton():
    layout = get_layout("crowdpose")
    pr = PoseRefinement(C, layout, num_layers=1)
    a = layout.adjacency() + np.eye(14)
    deg = a.sum(1)
    expected = a / np.sqrt(deg[:, None] * deg[None, :])
    assert isinstance(pr.adjacency, torch.nn.Parameter)
    assert torch.allclose(pr.adjacency.detach(), torch.tensor(expected, dtype=torch.float32))
    # A 3-node chain by hand: degrees (2, 3, 2).
    chain = normalized_adjacency(np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]]))
    s6 = 1 / np.sqrt(6)
    hand = torch.tensor([[0.5, s6, 0], [s6, 1 / 3, s6], [0, s6, 0.5]], dtype=torch.float32)
    assert torch.allclose(chain, hand)
    # One shared learnable matrix, stored once.
    assert sum(k.endswith("adjacency") for k in pr.state_dict()) == 1


def _proposals(n: int, k: int = 14, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, C, H, W, generator=g, requires_grad=True)
    poses = torch.rand(n, k, 2, generator=g) * torch.tensor([W - 1.0, H - 1.0])
    cells = torch.stack([torch.randint(0, W, (n,), generator=g),
                         torch.randint(0, H, (n,), generator=g)], dim=1)
    batch_index = torch.randint(0, 2, (n,), generator=g)
    return feats, poses, cells, batch_index


@pytest.mark.parametrize("layout, layers", [("crowdpose", 3), ("coco", 2)])
def test_refinement_changes_poses_and_gets_gradients(layout, layers):
    k = get_layout(layout).num_keypoints
    pr = PoseRefinement(C, layout, num_layers=layers).train()
    assert len(pr.blocks) == layers
    feats, poses, cells, batch_index = _proposals(6, k)
    corr = pr(feats, poses, cells, batch_index)
    assert corr.shape == (6, k, 2)
    assert corr.abs().sum() > 0
    refined = poses - corr
    assert not torch.allclose(refined, poses, atol=0, rtol=0)
    corr.pow(2).sum().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    for name, param in pr.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_refinement_empty_and_single_proposal():
    pr = PoseRefinement(C, "crowdpose").train()
    feats, poses, cells, batch_index = _proposals(0)
    assert pr(feats, poses, cells, batch_index).shape == (0, 14, 2)
    pr.eval()
    assert pr(feats, poses, cells, batch_index).shape == (0, 14, 2)
    pr.train()
    running = pr.readout_norm.running_mean.clone()
    feats, poses, cells, batch_index = _proposals(1)
    corr = pr(feats, poses, cells, batch_index)  # BN with one row: running statistics
    assert corr.shape == (1, 14, 2) and torch.isfinite(corr).all()
    assert torch.equal(pr.readout_norm.running_mean, running)
    with pytest.raises(ValueError, match=r"poses must be \(N, 14, 2\), got"):
        pr(feats, poses[:, :5], cells, batch_index)


def test_invalid_proposals_do_not_touch_batch_statistics():
    torch.manual_seed(0)
    pr = PoseRefinement(C, "crowdpose", num_layers=1).train()
    feats, poses, cells, batch_index = _proposals(9)
    valid = torch.tensor([1, 1, 0, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    ref_pr = PoseRefinement(C, "crowdpose", num_layers=1).train()
    ref_pr.load_state_dict(pr.state_dict())
    masked = pr(feats, poses, cells, batch_index, valid)
    subset = ref_pr(feats, poses[valid], cells[valid], batch_index[valid])
    assert torch.allclose(masked[valid], subset, atol=1e-5)
    for (name, a), b in zip(pr.named_buffers(), ref_pr.buffers(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name
    # No valid proposal at all: finite outputs and unchanged running statistics.
    before = pr.readout_norm.running_var.clone()
    out = pr(feats, poses, cells, batch_index, torch.zeros(9, dtype=torch.bool))
    assert torch.isfinite(out).all()
    assert torch.equal(pr.readout_norm.running_var, before)


def test_refinement_from_adjacency_array_and_eval_determinism():
    adj = np.zeros((4, 4), dtype=np.float32)
    adj[0, 1] = adj[1, 0] = adj[1, 2] = adj[2, 1] = 1
    pr = PoseRefinement(C, adj, num_layers=1).eval()
    feats, poses, cells, batch_index = _proposals(3, k=4)
    a = pr(feats, poses, cells, batch_index)
    b = pr(feats, poses, cells, batch_index)
    assert a.shape == (3, 4, 2) and torch.equal(a, b)


@pytest.mark.parametrize("num_valid", [7, 1, 0])
def test_masked_batch_norm_gradients(num_valid):
    """Masked rows: the hand-written backward equals autograd of the plain formula (float64),
    including the path through the statistics, and with running statistics when < 2 rows."""
    g = torch.Generator().manual_seed(num_valid)
    bn = MaskedBatchNorm1d(5).double().train()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(5, generator=g, dtype=torch.float64))
        bn.bias.copy_(torch.randn(5, generator=g, dtype=torch.float64))
        bn.running_mean.fill_(0.3)
        bn.running_var.fill_(2.0)
    x = (torch.randn(12, 5, generator=g, dtype=torch.float64) * 3 + 1).requires_grad_()
    mask = torch.zeros(12, dtype=torch.bool)
    mask[torch.randperm(12, generator=g)[:num_valid]] = True
    assert torch.autograd.gradcheck(lambda t: bn(t, mask), (x,))
    grad = torch.randn(12, 5, generator=g, dtype=torch.float64)
    bn.zero_grad()
    bn(x, mask).backward(grad)
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, bn.weight, bn.bias))
    if num_valid > 1:
        w = mask.double()[:, None]
        mean = (xr * w).sum(0) / w.sum()
        var = ((xr - mean) ** 2 * w).sum(0) / w.sum()
    else:
        mean, var = bn.running_mean, bn.running_var
    ((xr - mean) / torch.sqrt(var + bn.eps) * wr + br).backward(grad)
    assert torch.allclose(x.grad, xr.grad, atol=1e-12)
    assert torch.allclose(bn.weight.grad, wr.grad, atol=1e-12)
    assert torch.allclose(bn.bias.grad, br.grad, atol=1e-12)


def test_refinement_matches_proposal_major_reference():
    """PR keeps node features node-major (K, N, C); check it against algorithm.md 3 written directly
    in the proposal-major layout (N, K, C), eval mode, non-trivial running statistics."""
    torch.manual_seed(0)
    pr = PoseRefinement(C, "crowdpose", num_layers=2).eval()
    with torch.no_grad():
        for module in pr.modules():
            if isinstance(module, MaskedBatchNorm1d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        pr.adjacency.add_(0.05 * torch.randn_like(pr.adjacency))  # learnt: not symmetric
        pr.output.weight.normal_(std=0.1)  # outputs of order 1, not ~0.001
    feats, poses, cells, batch_index = _proposals(5)

    def block(x, gb):
        y = torch.matmul(pr.adjacency, gb.linear(x)) + gb.bias
        return F.relu(gb.norm(y.reshape(-1, y.shape[-1])).view(y.shape))

    x = block(sample_features(feats, poses, batch_index), pr.input_block)
    for res in pr.blocks:
        x = x + block(block(x, res.block1), res.block2)
    source = sample_features(feats, cells[:, None].float(), batch_index)[:, 0]
    pooled = torch.cat([x.mean(1), x.amax(1), source], dim=1)
    ref = pr.output(F.relu(pr.readout_norm(pr.readout(pooled)))).view(5, 14, 2)
    out = pr(feats, poses, cells, batch_index)
    assert ref.abs().max() > 0.1
    assert torch.allclose(out, ref, atol=1e-5)


def test_heads_keep_float32_offsets_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    heads = PPGHeads(C, 14, 3)
    with torch.no_grad():  # offsets of about 50 cells, as for a person far from its part
        heads.offset.weight.normal_(0.0, 0.05, generator=g)
        heads.offset.bias.uniform_(45.0, 55.0, generator=g)
    features = torch.randn(2, C, H, W, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # the backbone's features arrive in bf16 under autocast
        outputs = heads(features.to(torch.bfloat16))
    exact = heads(features.to(torch.bfloat16).float())  # float32 throughout
    for out, same_input in zip(outputs, exact, strict=True):
        assert out.dtype == torch.float32
        assert torch.allclose(out, same_input, rtol=0, atol=1e-5)
    # bf16 would put 50-cell offsets on a 0.25-cell grid: the check above can tell
    offsets = exact[2]
    assert (offsets.bfloat16().float() - offsets).abs().max() > 0.05


def test_refinement_output_is_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(1)
    pr = PoseRefinement(C, get_layout("crowdpose"), num_layers=1)
    with torch.no_grad():
        pr.output.weight.normal_(0.0, 0.1, generator=g)
        pr.output.bias.uniform_(45.0, 55.0, generator=g)
    seen = {}
    pr.output.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    feats = torch.randn(2, C, H, W, generator=g)
    poses = torch.rand(6, 14, 2, generator=g) * torch.tensor([W - 1.0, H - 1.0])
    cells = torch.randint(0, H, (6, 2), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pr(feats, poses, cells, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert out.dtype == torch.float32
    expected = F.linear(seen["x"].float(), pr.output.weight, pr.output.bias).view(6, 14, 2)
    assert torch.allclose(out, expected, rtol=0, atol=1e-5)
    assert (expected.bfloat16().float() - expected).abs().max() > 0.05
