"""The two cell/pixel conventions, by hand: where cells sit in the input, the mirrored input,
where the refinement reads features, keypoint scores at the map border, the inference resize,
and the fusion order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pinet_lightning.codec.conventions import get_convention
from pinet_lightning.core.constants import IMAGENET_MEAN
from pinet_lightning.model.refinement import _bilinear_gather

OURS, PUBLISHED = get_convention("cell_center"), get_convention("published")


def test_cell_to_input_pixels():
    cells = torch.tensor([[0.0, 0.0], [10.0, 2.5]])
    assert torch.equal(OURS.cell_to_input(cells, 4), torch.tensor([[1.5, 1.5], [41.5, 11.5]]))
    assert torch.equal(PUBLISHED.cell_to_input(cells, 4), torch.tensor([[0.0, 0.0], [40.0, 10.0]]))
    px = np.array([[41.5, 11.5]])
    np.testing.assert_allclose(OURS.input_to_cell(px, 4), [[10.0, 2.5]])
    np.testing.assert_allclose(PUBLISHED.input_to_cell(px, 4), [[10.375, 2.875]])
    with pytest.raises(ValueError, match="unknown convention 'centre'"):
        get_convention("centre")


def test_mirrored_input_alignment():
    image = torch.zeros(1, 3, 8, 16)
    image[..., 5] = 200  # one bright column at x = 5
    ours = OURS.mirror(image, 4)
    assert ours[0, 0, 0].nonzero().flatten().tolist() == [16 - 1 - 5]
    pub = PUBLISHED.mirror(image, 4)
    # shifted 3 px left: original pixel x shows at W - 4 - x, so cell c <-> cell w - 1 - c
    assert (pub[0, 0, 0] == 200).nonzero().flatten().tolist() == [16 - 4 - 5]
    # the 3 columns brought in hold the mean pixel (0 once normalized, as published)
    mean = torch.tensor(IMAGENET_MEAN) * 255
    assert torch.allclose(pub[0, :, :, -3:], mean.view(3, 1, 1).expand(3, 8, 3))
    assert pub.dtype == torch.float32


def test_published_refinement_reads_features_where_its_grid_sample_does():
    """The published sampler normalizes by (W - 1) / 2 and samples with
    align_corners=False, zero padded: it reads cell x at x * W / (W - 1) - 0.5."""

    torch.manual_seed(0)
    features = torch.randn(1, 5, 6, 9)
    h, w = features.shape[-2:]
    points = torch.tensor([[0.0, 0.0], [8.0, 5.0], [4.0, 2.5], [3.3, 4.9], [-0.4, 1.0]])
    at = PUBLISHED.feature_points(points, h, w)
    assert torch.allclose(at[0], torch.tensor([-0.5, -0.5]))
    assert torch.allclose(at[1], torch.tensor([8.5, 5.5]))
    assert torch.allclose(at[2], torch.tensor([4.0, 2.5]))  # the centre stays put
    got = _bilinear_gather(features, at, torch.zeros(len(points), dtype=torch.long))
    grid = points / torch.tensor([(w - 1) / 2, (h - 1) / 2]) - 1
    want = F.grid_sample(features, grid.view(1, 1, -1, 2), align_corners=False)[0, :, 0].t()
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(OURS.feature_points(points, h, w), points)


def test_published_keypoint_scores_at_the_border():
    """One 16 x 16 map (64 x 64 upsampled): a ramp in y, constant in x."""
    h = w = 16
    maps = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1).expand(1, 1, h, w).clone()
    ch = torch.zeros(1, dtype=torch.long)

    def pub(x_px: float, y_px: float) -> float:
        cells = torch.tensor([[[x_px / 4, y_px / 4]]])
        return float(PUBLISHED.keypoint_scores(maps, cells, ch, 4)[0, 0])

    def ours(x_px: float, y_px: float) -> float:
        return float(OURS.keypoint_scores(maps, torch.tensor([[[x_px / 4, y_px / 4]]]), ch, 4))

    assert pub(20.0, 30.0) == pytest.approx(7.5)  # inside: bilinear at px / 4
    assert pub(20.0, 61.0) == pytest.approx(15.0)  # rows past 60 replicate the last row
    assert pub(20.0, 62.5) == pytest.approx(15.0)
    assert pub(20.0, 63.4) == 0.0  # a corner leaves the 64-row map: 0
    assert ours(20.0, 63.4) == pytest.approx((1 - 0.85) * 15.0, rel=1e-5)  # fades off the map
    # int() truncates toward zero: y in (-1, 0) reads rows 0 and 1, extrapolating
    assert pub(20.0, -0.5) == pytest.approx(1.5 * 0.0 + (-0.5) * 0.25)
    assert pub(20.0, -1.0) == 0.0
    assert pub(62.9, 8.0) == pytest.approx(2.0) and pub(63.0, 8.0) == 0.0


def test_published_inference_resize_is_a_centred_warp():
    image = np.zeros((203, 301, 3), np.uint8)
    image[101, 150] = 255
    resized, back = PUBLISHED.resize(image, 512)
    assert resized.shape == (512, 768, 3)  # short side 512, long side up to a multiple of 64
    f = 203 / 512
    # the output centre maps to the centre rounded half up, (151, 102), at scale 203/512
    np.testing.assert_allclose(back, [[f, 0, 151 - 384 * f], [0, f, 102 - 256 * f]], atol=1e-9)
    ours_resized, ours_back = OURS.resize(image, 512)
    assert ours_resized.shape == (512, 768, 3)
    assert ours_back[0, 2] != pytest.approx(back[0, 2])  # ours pads right / bottom instead
    with pytest.raises(ValueError, match="empty"):
        PUBLISHED.resize(np.zeros((0, 5, 3), np.uint8), 512)
