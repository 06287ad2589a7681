"""Training proposals: the default cap of 40 and the shape errors, by hand."""

from __future__ import annotations

import pytest
import torch

from pinet_lightning.training.proposals import gather_at_cells, sample_proposals


def test_default_proposal_cap_is_40_and_shape_errors():
    part = torch.zeros(1, 1, 8, 8)
    part[0, 0, :6, :] = torch.rand(6, 8) + 0.1  # 48 positive cells
    weights = torch.zeros(1, 1 * 2 * 2, 8, 8)
    weights[:, :, :6, :] = 0.5
    props = sample_proposals(part, weights, 2)
    assert len(props) == 40 and bool(props.valid.all())
    with pytest.raises(ValueError, match=r"offset_weights \(1, 5, 8, 8\) should "
                                         r"be \(B, P\*K\*2, h, w\) = \(1, 4, 8, 8\) for part "
                                         r"heatmaps \(1, 1, 8, 8\) and K = 2"):
        sample_proposals(part, torch.zeros(1, 5, 8, 8), 2)
    with pytest.raises(ValueError, match=r"6 offset channels are not P \* K \* 2 "
                                         r"for K = 2"):
        gather_at_cells(torch.zeros(1, 6, 4, 4), torch.zeros(1, 2), torch.zeros(1).long(),
                        torch.zeros(1).long(), 2)
