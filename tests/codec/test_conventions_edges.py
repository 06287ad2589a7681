"""Conventions at their edges: lookup by name, stride 1 and 2 mirrors, one-cell maps,
keypoint scores against an explicit upsampled map, portrait images and exact multiples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pinet_lightning.codec.conventions import (
    CellCenter,
    Convention,
    Published,
    cells_to_image,
    cells_to_input,
    get_convention,
    input_to_image,
)
from pinet_lightning.core.constants import IMAGENET_MEAN

OURS, PUBLISHED = get_convention("cell_center"), get_convention("published")


def test_lookup_by_name_any_case_and_default():
    assert isinstance(get_convention(None), CellCenter)
    assert isinstance(get_convention("PUBLISHED"), Published)
    assert isinstance(get_convention("Cell_Center"), CellCenter)
    assert get_convention(PUBLISHED) is PUBLISHED
    with pytest.raises(ValueError, match=r"known: \['cell_center', 'published'\]"):
        get_convention("none")


@pytest.mark.parametrize("stride", [1, 2])
def test_published_mirror_shift_is_stride_minus_one(stride):
    image = torch.zeros(1, 3, 4, 10)
    image[..., 6] = 100.0
    out = PUBLISHED.mirror(image, stride)
    # pixel x shows at W - stride - x
    assert (out[0, 0, 0] == 100).nonzero().flatten().tolist() == [10 - stride - 6]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1) * 255
    if stride > 1:
        assert torch.allclose(out[0, :, 0, -(stride - 1):], mean)
    else:
        assert torch.equal(out, image.flip(-1))


def test_published_feature_points_on_a_one_cell_map():
    """A map one cell wide: (W - 1) is clamped to 1, so x -> x * 1 / 1 - 0.5."""
    at = PUBLISHED.feature_points(torch.tensor([[2.0, 3.0]]), 1, 1)
    assert torch.equal(at, torch.tensor([[1.5, 2.5]]))


def _upsampled_reference(maps: np.ndarray, stride: int) -> np.ndarray:
    """The published score map: corner-aligned bilinear upsampling by ``stride`` (pixel p
    reads the map at p / stride), the last stride - 1 rows and columns replicated."""
    h, w = maps.shape
    ys = np.minimum(np.arange(stride * h), stride * (h - 1)) / stride
    xs = np.minimum(np.arange(stride * w), stride * (w - 1)) / stride

    def lerp(a: np.ndarray, t: np.ndarray, axis: int) -> np.ndarray:
        lo = np.floor(t).astype(int)
        hi = np.minimum(lo + 1, a.shape[axis] - 1)
        f = t - lo
        take = (lambda i: a[i]) if axis == 0 else (lambda i: a[:, i])
        shape = (-1, 1) if axis == 0 else (1, -1)
        return take(lo) * (1 - f).reshape(shape) + take(hi) * f.reshape(shape)

    return lerp(lerp(maps, ys, 0), xs, 1)


def test_published_keypoint_scores_match_an_explicit_upsampled_map():
    torch.manual_seed(0)
    h, w, stride = 5, 7, 4
    maps = torch.rand(1, 2, h, w)
    up = [_upsampled_reference(maps[0, c].numpy().astype(np.float64), stride) for c in (0, 1)]
    px = np.array([[3.3, 2.7], [26.6, 17.2], [25.5, 18.9], [13.1, 9.9], [0.2, 19.4],
                   [27.5, 0.5], [30.0, 4.0], [12.0, 21.5]])
    channels = torch.tensor([0, 1, 1, 0, 1, 0, 1, 0])
    got = PUBLISHED.keypoint_scores(maps, torch.from_numpy(px / stride)[None].float(),
                                    channels, stride)[0]
    for (x, y), c, value in zip(px, channels.tolist(), got.tolist(), strict=True):
        x0, y0 = int(x), int(y)
        fx, fy = x - x0, y - y0
        m = up[c]
        if x0 + 1 >= stride * w or y0 + 1 >= stride * h:
            want = 0.0
        else:
            want = (m[y0, x0] * (1 - fx) * (1 - fy) + m[y0, x0 + 1] * fx * (1 - fy)
                    + m[y0 + 1, x0] * (1 - fx) * fy + m[y0 + 1, x0 + 1] * fx * fy)
        assert value == pytest.approx(want, abs=1e-5), (x, y)
    # Points whose corner leaves the map read 0, without zeroing the others of the batch.
    assert (got[:4] > 0).all() and (got[4:] == 0).all()


def test_published_resize_of_a_portrait_image():
    image = np.zeros((200, 100, 3), np.uint8)
    image[100, 50] = 255
    resized, back = PUBLISHED.resize(image, 512)
    assert resized.shape == (1024, 512, 3)  # 512 / 100 * 200 = 1024: a multiple already
    f = 100 / 512
    np.testing.assert_allclose(back, [[f, 0, 50 - 256 * f], [0, f, 100 - 512 * f]], atol=1e-9)
    # Just over a multiple: rounded up to the next one.
    resized, _ = PUBLISHED.resize(np.zeros((577, 512, 3), np.uint8), 512)
    assert resized.shape == (640, 512, 3)
    resized, _ = PUBLISHED.resize(np.zeros((512, 577, 3), np.uint8), 512)
    assert resized.shape == (512, 640, 3)
    # A one-pixel-high image is small, not empty.
    resized, _ = PUBLISHED.resize(np.full((1, 3, 3), 7, np.uint8), 64)
    assert resized.shape == (64, 192, 3)


def test_cell_center_resize_takes_the_multiple():
    resized, back = OURS.resize(np.zeros((50, 70, 3), np.uint8), 100, multiple=32)
    assert resized.shape == (128, 160, 3)  # 100 x 140 padded up to multiples of 32
    np.testing.assert_allclose(back[:, :2], np.eye(2) * 0.5)


def test_keypoint_scores_of_ours_are_bilinear_at_the_cell():
    maps = torch.arange(12.0).view(1, 1, 3, 4)
    got = OURS.keypoint_scores(maps, torch.tensor([[[1.5, 0.5]]]), torch.zeros(1).long(), 4)
    want = F.grid_sample(maps, torch.tensor([[[[1.5 / 1.5 - 1, 0.5 - 1]]]]),
                         align_corners=True)
    assert float(got) == pytest.approx(float(want)) == pytest.approx(3.5)


def test_the_base_convention_is_abstract():
    base = Convention()
    for call in (lambda: base.cell_to_input(torch.zeros(1, 2), 4),
                 lambda: base.input_to_cell(np.zeros((1, 2)), 4),
                 lambda: base.mirror(torch.zeros(1, 3, 4, 4), 4),
                 lambda: base.feature_points(torch.zeros(1, 2), 4, 4),
                 lambda: base.keypoint_scores(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2),
                                              torch.zeros(1, dtype=torch.long), 4),
                 lambda: base.resize(np.zeros((4, 4, 3), np.uint8), 64),
                 lambda: base.fit(np.zeros((4, 4, 3), np.uint8), 64)):
        with pytest.raises(NotImplementedError):
            call()
    assert repr(PUBLISHED) == "Convention('published')"


def test_cells_to_image_convention():
    poses = torch.tensor([[[[0.0, 0.0, 0.7], [10.0, 3.0, 0.2]]]])
    back = torch.tensor([[[2.0, 0.0, 100.0], [0.0, 3.0, 0.0]]])
    got = cells_to_image(poses, back)
    want = torch.tensor([[[[2 * 1.5 + 100, 3 * 1.5, 0.7], [2 * 41.5 + 100, 3 * 13.5, 0.2]]]])
    assert torch.allclose(got, want)


def test_cells_to_image_scale_per_axis_and_float64_transforms():
    poses = torch.tensor([[[[1.0, 2.0, 0.5]]]])
    back = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], dtype=torch.float64)
    x_in, y_in = 4 * 1.0 + 1.5, 4 * 2.0 + 1.5
    for scale in [(2.0, 1.0), (1.0, 2.0)]:
        got = cells_to_image(poses, back, input_scale=scale)
        want = [(x_in + 0.5) * scale[0] - 0.5, (y_in + 0.5) * scale[1] - 0.5, 0.5]
        assert got[0, 0, 0].tolist() == pytest.approx(want)


def test_cells_to_input_and_image_follow_the_named_convention():
    poses = torch.tensor([[[[2.0, 3.0, 0.5]]]])
    # the defaults: cell_center at stride 4 (cell x at pixel 4 x + 1.5)
    assert cells_to_input(poses).tolist() == [[[[9.5, 13.5, 0.5]]]]
    assert cells_to_input(poses, "published").tolist() == [[[[8.0, 12.0, 0.5]]]]
    assert cells_to_input(poses, PUBLISHED, 2).tolist() == [[[[4.0, 6.0, 0.5]]]]
    back = torch.tensor([[[2.0, 0.0, 10.0], [0.0, 1.0, -1.0]]])
    assert cells_to_image(poses, back, "published").tolist() == [[[[26.0, 11.0, 0.5]]]]
    assert input_to_image(cells_to_input(poses, "published"), back).tolist() == [
        [[[26.0, 11.0, 0.5]]]]


SIDE = 96  # not a multiple of 64: the fixed input is side x side, whatever resize's multiple


@pytest.mark.parametrize("shape", [(90, 160, 3), (160, 90, 3)])
def test_cell_center_fit_puts_the_long_side_at_the_graph_side(shape):
    """Long side 160 -> 96 (scale 0.6), short side 90 -> 54, zero padded right / bottom to
    96 x 96, as resize pads."""
    image = np.random.default_rng(7).integers(1, 256, shape, dtype=np.uint8)
    fitted, back = OURS.fit(image, SIDE)
    assert fitted.shape == (SIDE, SIDE, 3)
    rows, cols = fitted[..., 0].any(1), fitted[..., 0].any(0)
    assert (int(rows.sum()), int(cols.sum())) == ((54, 96) if shape[0] < shape[1] else (96, 54))
    assert rows[:int(rows.sum())].all() and cols[:int(cols.sum())].all()  # top-left
    s = 160 / 96
    np.testing.assert_allclose(back, [[s, 0, (s - 1) / 2], [0, s, (s - 1) / 2]], atol=1e-9)


def test_published_fit_is_the_centred_warp():
    image = np.random.default_rng(7).integers(1, 256, (90, 160, 3), dtype=np.uint8)
    fitted, back = PUBLISHED.fit(image, 128)  # 160 -> 128, 90 -> 72: 28 border rows each side
    assert fitted.shape == (128, 128, 3)
    assert not fitted[:27].any() and not fitted[-27:].any() and fitted[29:-29].all()
    assert np.allclose(back @ [64.0, 64.0, 1.0], [80.0, 45.0])  # centre to centre
    assert np.allclose(back[:, :2], np.eye(2) * 160 / 128)
    portrait, back = PUBLISHED.fit(np.ascontiguousarray(image.transpose(1, 0, 2)), 128)
    assert not portrait[:, :27].any() and portrait[29:-29, 29:-29].all()
    assert np.allclose(back[:, :2], np.eye(2) * 160 / 128)
    # the scale is the long side's, even for an image under 3 pixels (not the channels')
    _, back = PUBLISHED.fit(np.full((2, 1, 3), 9, np.uint8), 64)
    assert np.allclose(back[:, :2], np.eye(2) * 2 / 64)
    square = image[:, :90].copy()  # a square image: what resize gives it
    for convention in (PUBLISHED, OURS):
        got, got_back = convention.fit(square, 128)
        want, want_back = convention.resize(square, 128, 64)
        assert np.array_equal(got, want) and np.allclose(got_back, want_back)
