"""Heatmap, offset and refine losses, and the PINet total (algorithm.md 4)."""

from __future__ import annotations

import math

import pytest
import torch

from pinet_lightning.training.losses import (
    HeatmapLoss,
    OffsetLoss,
    PINetLoss,
    RefineLoss,
    weighted_smooth_l1,
)
from pinet_lightning.training.proposals import sample_proposals

B, K, P, H, W, C = 2, 3, 2, 8, 8, 5
BETA = 1 / 9


class ZeroRefineNet(torch.nn.Module):
    """A stand-in network whose PR correction is ``scale`` times a feature mean."""

    def __init__(self, scale: float = 0.0) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale))
        self.calls: list[dict] = []

    def refine(self, features, poses, cells, batch_index, valid=None):
        self.calls.append({"poses": poses, "cells": cells, "valid": valid})
        return self.scale * torch.ones_like(poses) + 0 * features.mean()


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    targets = {
        "heatmaps": torch.rand(B, K, H, W, generator=g),
        "heatmap_mask": torch.where(torch.rand(B, K, H, W, generator=g) > 0.5, 1.0, 0.1),
        "part_heatmaps": torch.zeros(B, P, H, W),
        "part_mask": torch.ones(B, P, H, W),
        "offsets": torch.zeros(B, P * K * 2, H, W),
        "offset_weights": torch.zeros(B, P * K * 2, H, W),
    }
    # Part 0: a 2x2 window per image (4 positive cells), distinct heatmap scores.
    for b in range(B):
        ys, xs = slice(2 + b, 4 + b), slice(3, 5)
        targets["part_heatmaps"][b, 0, ys, xs] = torch.tensor([[0.9, 0.8], [0.7, 0.6]])
        targets["offsets"][b, : K * 2, ys, xs] = torch.randn(K * 2, 2, 2, generator=g)
        targets["offset_weights"][b, : K * 2, ys, xs] = 0.1 * (b + 1)
    outputs = {
        "features": torch.randn(B, C, H, W, generator=g, requires_grad=True),
        "heatmaps": targets["heatmaps"].clone().requires_grad_(),
        "part_heatmaps": targets["part_heatmaps"].clone().requires_grad_(),
        "offsets": targets["offsets"].clone().requires_grad_(),
    }
    return outputs, targets


def test_zero_on_perfect_predictions_positive_otherwise():
    outputs, targets = _batch()
    losses = PINetLoss()(outputs, targets, ZeroRefineNet(0.0))
    assert set(losses) == {"loss", "heatmap", "offset", "refine"}
    for value in losses.values():
        assert value.dtype == torch.float32 and value.ndim == 0
        assert value.item() == 0.0
    outputs["heatmaps"] = outputs["heatmaps"] + 0.1
    outputs["offsets"] = outputs["offsets"] + 0.5
    losses = PINetLoss()(outputs, targets, ZeroRefineNet(0.3))
    assert losses["heatmap"] > 0 and losses["offset"] > 0 and losses["refine"] > 0
    expected = losses["heatmap"] + 0.03 * losses["offset"] + 0.03 * losses["refine"]
    assert torch.isclose(losses["loss"], expected)


def test_heatmap_loss_value_and_mask():
    outputs, targets = _batch()
    pred_h = targets["heatmaps"] + 1.0
    pred_p = targets["part_heatmaps"].clone()
    loss = HeatmapLoss()(pred_h, pred_p, targets)
    # Mean over K + P channels together of the mask (the error is 1 on keypoint channels).
    total = targets["heatmap_mask"].sum() / (B * (K + P) * H * W)
    assert torch.isclose(loss, total)
    with pytest.raises(ValueError, match=r"heatmap predictions \(2, 4, 8, 8\) do not match"):
        HeatmapLoss()(pred_h[:, :2], pred_p, targets)


def test_offset_loss_normalization_and_omega():
    target = torch.zeros(1, 4, 3, 3)
    weights = torch.zeros(1, 4, 3, 3)
    weights[0, 0, 1, 1] = 0.5
    weights[0, 1, 1, 1] = 0.5
    pred = torch.zeros(1, 4, 3, 3)
    pred[0, 0, 1, 1] = 2.0  # |d| = 2 >= beta: 2 - beta / 2
    pred[0, 1, 1, 1] = 0.05  # |d| < beta: 0.5 d^2 / beta
    loss = OffsetLoss(BETA)(pred, target, weights)
    expected = 0.5 * ((2 - BETA / 2) + 0.5 * 0.05**2 / BETA) / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    # Cells outside Omega do not matter, whatever the prediction there.
    changed = pred.clone()
    changed[0, 2:, :, :] = 100.0
    changed[0, :2, 0, 0] = -7.0
    assert torch.equal(OffsetLoss(BETA)(changed, target, weights), loss)
    # No weighted entry: the sum is divided by 1, not 0.
    assert OffsetLoss(BETA)(pred, target, torch.zeros_like(weights)).item() == 0.0


def test_refine_loss_matches_manual_computation_on_valid_proposals():
    outputs, targets = _batch(1)
    # Image 1 gets 2 extra positive cells for part 0: m stays 4 (image 0 has 4).
    targets["part_heatmaps"][1, 0, 6, 6:8] = 0.95
    targets["offset_weights"][1, : K * 2, 6, 6:8] = 0.3
    outputs["offsets"] = outputs["offsets"] + 0.2  # coarse error 0.2 everywhere
    net = ZeroRefineNet(0.0)
    losses = PINetLoss(proposals_per_part=40)(outputs, targets, net)
    props = sample_proposals(targets["part_heatmaps"], targets["offset_weights"], K, 40)
    valid = props.valid
    # 4 per image for part 0; part 1 has no cell in any image: 40 per image, all weight 0
    assert int(valid.sum()) == 8 + 2 * 40
    # Image 1 keeps its 4 best cells: the two 0.95 cells and the 0.9, 0.8 ones.
    sel = valid & (props.batch_index == 1) & (props.part_index == 0)
    assert {tuple(c) for c in props.cells[sel].tolist()} == {(6, 6), (7, 6), (3, 3), (4, 3)}
    w = torch.zeros(len(props), K, 2)
    for n in torch.nonzero(valid).flatten().tolist():
        b, x, y = int(props.batch_index[n]), *props.cells[n].tolist()
        part = int(props.part_index[n])
        w[n] = targets["offset_weights"][b, part * K * 2 : (part + 1) * K * 2, y, x].view(K, 2)
    per_entry = 0.5 * 0.2**2 / BETA if 0.2 < BETA else 0.2 - BETA / 2
    expected = (per_entry * w).sum() / (w > 0).sum()
    assert torch.isclose(losses["refine"], expected)
    # The PR got the coarse poses (cell - predicted offset), detached, and the mask.
    call = net.calls[-1]
    assert not call["poses"].requires_grad
    n = int(torch.nonzero(valid)[0])
    b, x, y = int(props.batch_index[n]), *props.cells[n].tolist()
    coarse = outputs["offsets"][b, : K * 2, y, x].view(K, 2)
    assert torch.allclose(call["poses"][n], torch.tensor([x, y]) - coarse)
    assert torch.equal(call["valid"], valid)


def _smooth_l1(d: torch.Tensor) -> torch.Tensor:
    """The published smooth L1 (lib/loss/refineloss.py's formula), beta = 1/9."""
    d = d.abs()
    return torch.where(d < BETA, 0.5 * d**2 / BETA, d - 0.5 * BETA)


def test_image_lacking_a_part_still_refines_40_proposals_per_image():
    outputs, targets = _batch(3)
    # Image 1 loses part 0: the fewest positive cells is 0, so m = 40 for every image.
    targets["part_heatmaps"][1, 0] = 0.0
    targets["offset_weights"][1] = 0.0
    targets["offsets"][1] = 0.0
    g = torch.Generator().manual_seed(5)
    outputs["offsets"] = (targets["offsets"] + 0.3 * torch.randn(targets["offsets"].shape,
                                                                 generator=g)).requires_grad_()
    net = ZeroRefineNet(0.05)
    losses = PINetLoss(proposals_per_part=40)(outputs, targets, net)
    call = net.calls[-1]
    props = sample_proposals(targets["part_heatmaps"], targets["offset_weights"], K, 40)
    for image in (0, 1):
        block = (props.batch_index == image) & (props.part_index == 0)
        assert int(block.sum()) == 40 and bool(call["valid"][block].all())
    # By hand, the published definition: image 0's 4 part-0 cells carry every weighted
    # entry (the other 36 proposals of image 0 and all 40 of image 1 have weight 0);
    # loss = sum(smooth L1(coarse + correction - target) * weight) / #(weight > 0).
    num = torch.zeros(())
    count = 0
    for y in (2, 3):
        for x in (3, 4):
            coarse = outputs["offsets"][0, : K * 2, y, x].detach()
            target = targets["offsets"][0, : K * 2, y, x]
            weight = targets["offset_weights"][0, : K * 2, y, x]
            num = num + (_smooth_l1(coarse + 0.05 - target) * weight).sum()
            count += int((weight > 0).sum())
    assert count == 4 * K * 2
    assert torch.isclose(losses["refine"], num / count, rtol=1e-5)
    assert losses["refine"] > 0


def test_refine_loss_gradients_reach_refine_and_not_coarse_offsets():
    outputs, targets = _batch(2)
    net = ZeroRefineNet(0.1)
    loss = PINetLoss(heatmap_weight=0.0, offset_weight=0.0)(outputs, targets, net)["loss"]
    loss.backward()
    assert net.scale.grad is not None and net.scale.grad.abs() > 0
    # Offset loss weight 0 and detached coarse poses: no gradient to the offsets.
    assert outputs["offsets"].grad is None or outputs["offsets"].grad.abs().sum() == 0


def test_refine_loss_class_and_missing_keys():
    assert isinstance(RefineLoss(), OffsetLoss)
    outputs, targets = _batch()
    del targets["offset_weights"]
    with pytest.raises(KeyError, match="offset_weights"):
        PINetLoss()(outputs, targets, ZeroRefineNet())


def test_bf16_outputs_give_float32_losses():
    outputs, targets = _batch()
    outputs = {k: v.detach().to(torch.bfloat16) for k, v in outputs.items()}
    losses = PINetLoss()(outputs, targets, ZeroRefineNet(0.0))
    assert all(v.dtype == torch.float32 for v in losses.values())


# The refine loss with a non-zero refinement correction: refined offset = coarse offset +
# correction. A correction that exactly undoes the coarse error gives zero loss, the
# opposite sign doubles the error, and the gradient points the right way.
ERROR = 0.5  # coarse offsets = target - ERROR on every weighted entry
# Every weighted entry has the same error, so a loss is smooth_l1(error) times the mean
# weight of the weighted entries: (0.1 + 0.2) / 2 (both images have 4 cells x K x 2).
MEAN_WEIGHT = 0.15


def _coarse_error_batch():
    outputs, targets = _batch()
    error = ERROR * (targets["offset_weights"] > 0)
    outputs["offsets"] = (targets["offsets"] - error).requires_grad_()
    return outputs, targets


def _sl1(d: float) -> float:
    d = abs(d)
    return 0.5 * d * d / BETA if d < BETA else d - 0.5 * BETA


@pytest.mark.parametrize(("correction", "residual"),
                         [(ERROR, 0.0), (0.0, -ERROR), (2 * ERROR, ERROR), (-ERROR, -2 * ERROR)])
def test_refine_loss_of_a_known_correction(correction, residual):
    outputs, targets = _coarse_error_batch()
    losses = PINetLoss()(outputs, targets, ZeroRefineNet(correction))
    assert float(losses["refine"]) == pytest.approx(MEAN_WEIGHT * _sl1(residual), abs=1e-6)
    assert float(losses["offset"]) == pytest.approx(MEAN_WEIGHT * _sl1(ERROR), abs=1e-6)
    assert float(losses["heatmap"]) == pytest.approx(0.0, abs=1e-12)
    assert float(losses["loss"].detach()) == pytest.approx(
        0.03 * float(losses["offset"]) + 0.03 * float(losses["refine"]), abs=1e-7)


def test_refine_gradient_moves_the_correction_toward_the_error():
    outputs, targets = _coarse_error_batch()
    net = ZeroRefineNet(0.0)
    PINetLoss()(outputs, targets, net)["loss"].backward()
    # d loss / d correction = 0.03 * mean weight * smooth_l1'(-ERROR) = 0.03 * 0.15 * (-1)
    assert float(net.scale.grad) == pytest.approx(-0.03 * MEAN_WEIGHT, rel=1e-5)


def test_weighted_smooth_l1_and_heatmap_loss_by_hand():
    pred = torch.tensor([0.5, 2.0, 7.0])
    target = torch.zeros(3)
    one = weighted_smooth_l1(pred, target, torch.tensor([0.0, 0.5, 0.0]), BETA)
    assert float(one) == pytest.approx(0.5 * (2.0 - 0.5 * BETA))  # one weighted entry: / 1
    none = weighted_smooth_l1(pred, target, torch.zeros(3), BETA)
    assert float(none) == 0.0
    # Heatmap loss: squared error (sign-free) times the mask, one mean over both map kinds.
    heat = torch.tensor([[[[-0.5, 1.0]]]])
    parts = torch.tensor([[[[0.25, -2.0]]]])
    targets = {"heatmaps": torch.zeros(1, 1, 1, 2), "part_heatmaps": torch.zeros(1, 1, 1, 2),
               "heatmap_mask": torch.tensor([[[[1.0, 0.1]]]]),
               "part_mask": torch.ones(1, 1, 1, 2)}
    want = (0.25 * 1.0 + 1.0 * 0.1 + 0.0625 + 4.0) / 4
    assert float(HeatmapLoss()(heat, parts, targets)) == pytest.approx(want)


def test_offset_loss_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"offsets \(1, 4, 2, 2\), targets "
                                         r"\(1, 4, 2, 3\) and weights \(1, 4, 2, 2\) differ"):
        OffsetLoss()(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 3), torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match=r"and weights \(1, 4, 2, 3\) differ"):
        OffsetLoss()(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 3))


def test_the_proposal_cap_reaches_the_refinement():
    outputs, targets = _batch()
    net = ZeroRefineNet(0.0)
    PINetLoss(proposals_per_part=3)(outputs, targets, net)
    assert [len(call["poses"]) for call in net.calls] == [B * P * 3]
