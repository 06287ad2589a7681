"""PINet training losses (algorithm.md 4).

Contract for the LightningModule::

    criterion = PINetLoss(heatmap_weight=1.0, offset_weight=0.03, refine_weight=0.03,
                          beta=1 / 9, proposals_per_part=40, proposals_at_empty_cells=True)
    outputs = net(batch["image"])          # PINet.forward dict
    losses = criterion(outputs, batch, net)  # batch: from datamodule.train_collate, dense or
                                             # sparse targets (extra keys ok)
    losses["loss"].backward()
    # losses: {"loss", "heatmap", "offset", "refine"}: float32 scalar tensors; "loss" is the
    # weighted total, the others are unweighted (log them as they are).

``net`` is anything with ``refine(features, poses, cells, batch_index, valid=None)``: the
PINet (or the un-compiled ``_orig_mod`` of a compiled one). Everything runs on the device of
the outputs without host syncs: the proposal count m of algorithm.md 4 is applied as a mask over a
fixed top-``proposals_per_part`` selection (see :mod:`pinet_lightning.training.proposals`), so the
shapes are static. Losses are computed in float32 even under bf16 autocast.

Sparse batches (``codec.sparse``, the default): the heatmap targets are rendered on
the device from their Gaussian windows (:func:`~pinet_lightning.codec.batch.heatmap_targets`,
equal to the dense ones bit for bit), and the offset loss, the proposal scores and the refine
targets read Omega's entries (:class:`~pinet_lightning.codec.batch.OmegaBatch`) by gathers and
sorted searches: the same values as the dense maps, no dense offset map is built.

Refine loss, as the published trainer computes it: all valid proposals (B * m per part; m is
the cap for every image when one image of the batch lacks the part) are refined, and the
smooth L1 of (refined - target offsets) is weighted by the target offset weights at the
proposals' cells, summed and divided by the number of weighted entries. Proposals on cells no
person claimed carry weight 0: they add nothing to the loss but shape the refinement's
batch-norm statistics.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pinet_lightning.codec.batch import OmegaBatch, heatmap_targets
from pinet_lightning.training.proposals import Proposals, gather_at_cells, sample_proposals

__all__ = ["HeatmapLoss", "OffsetLoss", "RefineLoss", "PINetLoss", "weighted_smooth_l1"]


def weighted_smooth_l1(pred: Tensor, target: Tensor, weights: Tensor, beta: float) -> Tensor:
    """Smooth L1 of ``pred - target`` times ``weights``, summed and divided by the number of
    weighted entries (Omega = weights > 0), at least 1."""
    pred = pred.float()
    weights = weights.float()
    loss = F.smooth_l1_loss(pred, target.float(), beta=beta, reduction="none") * weights
    count = (weights > 0).sum().clamp_min(1)
    return loss.sum() / count


class HeatmapLoss(nn.Module):
    """Masked squared error over keypoint and part heatmaps together (one mean over all)."""

    def forward(self, heatmaps: Tensor, part_heatmaps: Tensor, targets: Mapping[str, Tensor]
                ) -> Tensor:
        pred = torch.cat([heatmaps.float(), part_heatmaps.float()], dim=1)
        target = torch.cat([targets["heatmaps"], targets["part_heatmaps"]], dim=1).float()
        mask = torch.cat([targets["heatmap_mask"], targets["part_mask"]], dim=1).float()
        if pred.shape != target.shape:
            raise ValueError(f"heatmap predictions {tuple(pred.shape)} do not match "
                             f"the targets {tuple(target.shape)}; check the layout and the "
                             "output size (input size / 4) of the data module")
        return ((pred - target) ** 2 * mask).mean()


class OffsetLoss(nn.Module):
    """Smooth L1 on the offset maps, on Omega alone (algorithm.md 4).

    ``forward(offsets, target, weights)`` with dense targets and weights of the offsets'
    shape, or ``forward(offsets, omega)`` with an :class:`OmegaBatch`: the predictions are
    read at Omega's entries, each entry counting twice (x and y), as the dense weights do.
    """

    def __init__(self, beta: float = 1 / 9) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, offsets: Tensor, target: Tensor | OmegaBatch,
                weights: Tensor | None = None) -> Tensor:
        if isinstance(target, OmegaBatch):
            b, p, k, h, w = target.shape
            if tuple(offsets.shape) != (b, p * k * 2, h, w):
                raise ValueError(f"offsets {tuple(offsets.shape)} do not match "
                                 f"Omega's (B, P*K*2, h, w) = {(b, p * k * 2, h, w)}")
            return weighted_smooth_l1(target.at_entries(offsets), target.offsets,
                                      target.weights[:, None].expand(-1, 2), self.beta)
        if weights is None or offsets.shape != target.shape or target.shape != weights.shape:
            raise ValueError(f"offsets {tuple(offsets.shape)}, targets "
                             f"{tuple(target.shape)} and weights "
                             f"{None if weights is None else tuple(weights.shape)} differ")
        return weighted_smooth_l1(offsets, target, weights, self.beta)


class RefineLoss(OffsetLoss):
    """The offset loss on the sampled proposals: refined vs target offsets, (N, K, 2).

    Pass ``weights`` already multiplied by the proposals' validity mask.
    """


class PINetLoss(nn.Module):
    """Total PINet loss: heatmap + offset + refine, weighted (algorithm.md 4).

    Args:
        heatmap_weight, offset_weight, refine_weight: loss weights (1.0, 0.03, 0.03).
        beta: smooth L1 transition point (1/9).
        proposals_per_part: the cap 40 on training proposals per part and image.
        proposals_at_empty_cells: True (published): when an image of the batch lacks a
            part, every image refines ``proposals_per_part`` proposals of it, zero-score
            cells included (they enter the batch-norm statistics); False: only cells with a
            positive score count (:func:`~pinet_lightning.training.proposals.sample_proposals`).
    """

    def __init__(self, heatmap_weight: float = 1.0, offset_weight: float = 0.03,
                 refine_weight: float = 0.03, beta: float = 1 / 9,
                 proposals_per_part: int = 40, proposals_at_empty_cells: bool = True) -> None:
        super().__init__()
        self.proposals_at_empty_cells = bool(proposals_at_empty_cells)
        self.heatmap_weight = heatmap_weight
        self.offset_weight = offset_weight
        self.refine_weight = refine_weight
        self.proposals_per_part = proposals_per_part
        self.heatmap_loss = HeatmapLoss()
        self.offset_loss = OffsetLoss(beta)
        self.refine_loss = RefineLoss(beta)

    def forward(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Any], net: Any
                ) -> dict[str, Tensor]:
        heat = heatmap_targets(targets)
        omega = self._omega(outputs, targets)
        heatmap = self.heatmap_loss(outputs["heatmaps"], outputs["part_heatmaps"], heat)
        if omega is None:
            offset = self.offset_loss(outputs["offsets"], targets["offsets"],
                                      targets["offset_weights"])
        else:
            offset = self.offset_loss(outputs["offsets"], omega)
        refine = self.refine(outputs, targets, net, heat=heat, omega=omega)
        total = (self.heatmap_weight * heatmap + self.offset_weight * offset
                 + self.refine_weight * refine)
        return {"loss": total, "heatmap": heatmap.detach(), "offset": offset.detach(),
                "refine": refine.detach()}

    @staticmethod
    def _omega(outputs: Mapping[str, Tensor], targets: Mapping[str, Any]) -> OmegaBatch | None:
        """Omega of a sparse batch, None for dense offset targets."""
        if "offsets" in targets and "offset_weights" in targets:
            return None
        return OmegaBatch.from_batch(targets, outputs["offsets"].shape[0])

    def training_proposals(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Any],
                           heat: Mapping[str, Tensor] | None = None,
                           omega: OmegaBatch | None = None) -> dict[str, Any]:
        """The sampled proposals and what the refine loss compares at them.

        Returns ``proposals`` (:class:`Proposals`), ``coarse`` (N, K, 2) offsets predicted
        at their cells (detached), ``target`` (N, K, 2) target offsets and ``weights``
        (N, K, 2) target offset weights times the proposals' validity.
        """
        num_keypoints = outputs["heatmaps"].shape[1]
        if heat is None:
            heat = heatmap_targets(targets)
        if omega is None:
            omega = self._omega(outputs, targets)
        weight_source = targets["offset_weights"] if omega is None else omega
        props: Proposals = sample_proposals(heat["part_heatmaps"], weight_source, num_keypoints,
                                            self.proposals_per_part,
                                            empty_cells=self.proposals_at_empty_cells)
        # The coarse poses come from the predicted offsets, detached (algorithm.md 4).
        coarse = gather_at_cells(outputs["offsets"].detach(), props.cells, props.batch_index,
                                 props.part_index, num_keypoints)
        if omega is None:
            target = gather_at_cells(targets["offsets"], props.cells, props.batch_index,
                                     props.part_index, num_keypoints)
            weights = gather_at_cells(targets["offset_weights"], props.cells,
                                      props.batch_index, props.part_index, num_keypoints)
        else:
            target, weights = omega.at_cells(props.cells, props.batch_index, props.part_index)
        weights = weights.float() * props.valid[:, None, None]
        return {"proposals": props, "coarse": coarse, "target": target, "weights": weights}

    def refine(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Any], net: Any,
               heat: Mapping[str, Tensor] | None = None, omega: OmegaBatch | None = None
               ) -> Tensor:
        """Sample the training proposals, refine them with ``net.refine``, return the loss."""
        sampled = self.training_proposals(outputs, targets, heat, omega)
        props, coarse = sampled["proposals"], sampled["coarse"]
        cells = props.cells.to(coarse.dtype)
        poses = cells[:, None, :] - coarse
        correction = net.refine(outputs["features"], poses, props.cells, props.batch_index,
                                valid=props.valid)
        refined = coarse.float() + correction.float()
        return self.refine_loss(refined, sampled["target"], sampled["weights"])
