"""Training proposal sampling (algorithm.md 4), vectorized over the batch, with no host sync.

For each part, every output cell is scored by the part target heatmap times the largest of
that part's offset weights; each image keeps its top m cells per part, with
m = min(cap, fewest positive cells of any image in the batch), and m = cap (40) for every
image when that fewest is 0, i.e. when any image of the batch lacks the part (the published
trainer, lib/core/trainer.py). The proposals of such a batch include cells with score 0:
they still run through the refinement network and its batch-norm statistics, and their
offset weights (0 where no person claimed the cell) decide what they add to the loss.

m depends on the data, and a data-dependent ``topk`` size would need a host sync (and give
dynamic shapes). So we always take the top ``max_per_part`` (cap) cells of every image and
part and mark the first m of them valid. The refine loss and the refinement's batch norm
statistics only see valid proposals, which makes this equal to sampling exactly m, at a
fixed cost of B * P * cap proposals.

``empty_cells=False`` (``model.loss.proposals_at_empty_cells``) is the other choice: only
cells with a positive score are valid, so a part missing from one image no longer brings
zero-score cells into the batch-norm statistics (the loss is the same: those cells carry
no offset weight).

The offset weights come dense (B, P*K*2, h, w) or as Omega's entries
(:class:`~pinet_lightning.codec.batch.OmegaBatch`, what the sparse loader sends): the scores, and
so the proposals, are the same (the largest weight of a part at a cell is a max either way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pinet_lightning.codec.batch import OmegaBatch

__all__ = ["Proposals", "sample_proposals", "proposal_scores", "gather_at_cells"]


@dataclass
class Proposals:
    """Sampled training proposals, N = B * P * k in (image, part, rank) order.

    cells: (N, 2) long, the source cell (x, y) in output cells.
    batch_index: (N,) long image index. part_index: (N,) long part index.
    valid: (N,) bool, whether the proposal counts (rank < m; with ``empty_cells=False``
        also a positive score).
    """

    cells: Tensor
    batch_index: Tensor
    part_index: Tensor
    valid: Tensor

    def __len__(self) -> int:
        return self.cells.shape[0]


def proposal_scores(part_heatmaps: Tensor, offset_weights: Tensor | OmegaBatch,
                    num_keypoints: int) -> Tensor:
    """(B, P, h, w) score: part target heatmap x max of that part's offset weights (dense
    maps or Omega)."""
    b, p, h, w = part_heatmaps.shape
    if isinstance(offset_weights, OmegaBatch):
        if offset_weights.shape != (b, p, num_keypoints, h, w):
            raise ValueError(
                f"Omega of shape (B, P, K, h, w) = {offset_weights.shape} does "
                f"not match part heatmaps {tuple(part_heatmaps.shape)} and K = {num_keypoints}")
        return part_heatmaps * offset_weights.part_weights()
    if offset_weights.shape != (b, p * num_keypoints * 2, h, w):
        raise ValueError(
            f"offset_weights {tuple(offset_weights.shape)} should be "
            f"(B, P*K*2, h, w) = {(b, p * num_keypoints * 2, h, w)} for part heatmaps "
            f"{tuple(part_heatmaps.shape)} and K = {num_keypoints}")
    weight = offset_weights.view(b, p, num_keypoints * 2, h, w).amax(dim=2)
    return part_heatmaps * weight


def sample_proposals(part_heatmaps: Tensor, offset_weights: Tensor | OmegaBatch,
                     num_keypoints: int, max_per_part: int = 40, empty_cells: bool = True
                     ) -> Proposals:
    """Sample the training proposals of a batch (algorithm.md 4) from its targets.

    Args:
        part_heatmaps: (B, P, h, w) part target heatmaps.
        offset_weights: (B, P*K*2, h, w) target offset weights, or Omega's entries.
        num_keypoints: K.
        max_per_part: the cap on proposals per image and part (40).
        empty_cells: True (published): the first m cells are valid whatever their score;
            False: only those with a positive score.
    """
    score = proposal_scores(part_heatmaps, offset_weights, num_keypoints)
    b, p, h, w = score.shape
    flat = score.reshape(b, p, h * w)
    k = min(max_per_part, h * w)
    values, index = flat.topk(k, dim=-1, sorted=True)  # (B, P, k)
    fewest = (flat > 0).sum(dim=-1).amin(dim=0)  # (P,) fewest positive cells of any image
    m = torch.where(fewest == 0, torch.full_like(fewest, k), fewest.clamp_max(k))
    rank = torch.arange(k, device=score.device)
    valid = (rank[None, None, :] < m[None, :, None]).expand(b, p, k)
    if not empty_cells:
        valid = valid & (values > 0)
    cells = torch.stack([index % w, index // w], dim=-1)  # (B, P, k, 2) as (x, y)
    batch_index = torch.arange(b, device=score.device).view(b, 1, 1).expand(b, p, k)
    part_index = torch.arange(p, device=score.device).view(1, p, 1).expand(b, p, k)
    return Proposals(
        cells=cells.reshape(-1, 2),
        batch_index=batch_index.reshape(-1),
        part_index=part_index.reshape(-1),
        valid=valid.reshape(-1),
    )


def gather_at_cells(maps: Tensor, cells: Tensor, batch_index: Tensor, part_index: Tensor,
                    num_keypoints: int) -> Tensor:
    """Read per-part offset maps at proposal cells.

    Args:
        maps: (B, P*K*2, h, w) offsets, target offsets or offset weights (channel
            ``(p * K + k) * 2 + c``).
        cells: (N, 2) integer cells (x, y); batch_index, part_index: (N,).
    Returns:
        (N, K, 2): the K (x, y) values of the proposal's own part at its cell.
    """
    b, c, h, w = maps.shape
    if c % (num_keypoints * 2):
        raise ValueError(f"{c} offset channels are not P * K * 2 for K = "
                         f"{num_keypoints}")
    p = c // (num_keypoints * 2)
    cells = cells.long()
    view = maps.view(b, p, num_keypoints, 2, h, w)
    # Advanced indices split by slices: the indexed dimension N comes first -> (N, K, 2).
    return view[batch_index, part_index, :, :, cells[:, 1], cells[:, 0]]
