"""The refine loss with a non-zero refinement correction: refined offset = coarse offset +
correction (docs/architecture.md). A correction that exactly undoes the coarse error gives
zero loss, the opposite sign doubles the error, and the gradient points the right way."""

from __future__ import annotations

import pytest
import torch

from pinet_lightning.losses import PINetLoss

B, K, P, H, W, C = 2, 3, 2, 8, 8, 4
BETA = 1 / 9
ERROR = 0.5  # coarse offsets = target - ERROR on every weighted entry


class ConstantCorrection(torch.nn.Module):
    """A refinement whose correction is ``value`` on every keypoint coordinate."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = torch.nn.Parameter(torch.tensor(float(value)))

    def refine(self, features, poses, cells, batch_index, valid=None):
        return self.value * torch.ones_like(poses) + 0 * features.sum()


def _batch() -> tuple[dict, dict]:
    """Part 0 of each image: a 2 x 2 block of positive cells, offset weights 0.1 (image 0)
    and 0.2 (image 1); part 1 absent. Predicted offsets = target - ERROR."""
    g = torch.Generator().manual_seed(0)
    targets = {
        "heatmaps": torch.zeros(B, K, H, W), "heatmap_mask": torch.ones(B, K, H, W),
        "part_heatmaps": torch.zeros(B, P, H, W), "part_mask": torch.ones(B, P, H, W),
        "offsets": torch.zeros(B, P * K * 2, H, W),
        "offset_weights": torch.zeros(B, P * K * 2, H, W),
    }
    for b in range(B):
        rows, cols = slice(2 + b, 4 + b), slice(3, 5)
        targets["part_heatmaps"][b, 0, rows, cols] = torch.tensor([[0.9, 0.8], [0.7, 0.6]])
        targets["offsets"][b, : K * 2, rows, cols] = torch.randn(K * 2, 2, 2, generator=g)
        targets["offset_weights"][b, : K * 2, rows, cols] = 0.1 * (b + 1)
    outputs = {
        "features": torch.randn(B, C, H, W, generator=g),
        "heatmaps": targets["heatmaps"].clone(),
        "part_heatmaps": targets["part_heatmaps"].clone(),
        "offsets": targets["offsets"] - ERROR * (targets["offset_weights"] > 0),
    }
    return outputs, targets


def _smooth_l1(d: float) -> float:
    d = abs(d)
    return 0.5 * d * d / BETA if d < BETA else d - 0.5 * BETA


# Every weighted entry has the same error, so the loss is smooth_l1(error) times the mean
# weight of the weighted entries: (0.1 + 0.2) / 2 (both images have 4 cells x K x 2).
MEAN_WEIGHT = 0.15


@pytest.mark.parametrize(("correction", "residual"),
                         [(ERROR, 0.0), (0.0, -ERROR), (2 * ERROR, ERROR), (-ERROR, -2 * ERROR)])
def test_refine_loss_of_a_known_correction(correction, residual):
    outputs, targets = _batch()
    losses = PINetLoss()(outputs, targets, ConstantCorrection(correction))
    assert float(losses["refine"]) == pytest.approx(MEAN_WEIGHT * _smooth_l1(residual), abs=1e-6)
    assert float(losses["offset"]) == pytest.approx(MEAN_WEIGHT * _smooth_l1(ERROR), abs=1e-6)
    assert float(losses["loss"].detach()) == pytest.approx(
        0.03 * float(losses["offset"]) + 0.03 * float(losses["refine"]), abs=1e-7)


def test_refine_gradient_moves_the_correction_toward_the_error():
    outputs, targets = _batch()
    net = ConstantCorrection(0.0)
    PINetLoss()(outputs, targets, net)["loss"].backward()
    # d loss / d correction = 0.03 * mean weight * smooth_l1'(-ERROR) = 0.03 * 0.15 * (-1)
    assert float(net.value.grad) == pytest.approx(-0.03 * MEAN_WEIGHT, rel=1e-5)


def test_weighted_smooth_l1_and_heatmap_loss_by_hand():
    from pinet_lightning.losses import HeatmapLoss, weighted_smooth_l1

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
    from pinet_lightning.losses import OffsetLoss

    with pytest.raises(ValueError, match=r"offsets \(1, 4, 2, 2\), targets "
                                         r"\(1, 4, 2, 3\) and weights \(1, 4, 2, 2\) differ"):
        OffsetLoss()(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 3), torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match=r"and weights \(1, 4, 2, 3\) differ"):
        OffsetLoss()(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 3))


def test_the_proposal_cap_reaches_the_refinement():
    outputs, targets = _batch()
    seen = []

    class Count(ConstantCorrection):
        def refine(self, features, poses, cells, batch_index, valid=None):
            seen.append(len(poses))
            return super().refine(features, poses, cells, batch_index, valid)

    PINetLoss(proposals_per_part=3)(outputs, targets, Count(0.0))
    assert seen == [B * P * 3]
