"""Augmentation at its edges: the smallest sizes inference_resize accepts, the padded
canvas's dtype, the error messages, and the reseed modulus (seeds are taken mod 2**32)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pinet_lightning.data.augmentation import (
    SquareCropAffine,
    TrainAugmentation,
    fit_short_side,
    inference_resize,
)


def test_inference_resize_smallest_sizes():
    img = np.full((3, 3, 3), 9, np.uint8)
    out, back = inference_resize(img, input_size=1, multiple=1)
    assert out.shape == (1, 1, 3)
    np.testing.assert_allclose(back, [[3, 0, 1], [0, 3, 1]])
    out, _ = inference_resize(np.full((2, 5, 3), 9, np.uint8), input_size=1, multiple=1)
    assert out.shape == (1, 2, 3)  # long side 2.5 rounds to 2 (and never under 1)
    for size, multiple in [(0, 64), (512, 0)]:
        with pytest.raises(ValueError, match="input_size and multiple must be positive"):
            inference_resize(img, size, multiple)
    with pytest.raises(ValueError, match=r"inference_resize: expected an \(H, W, 3\)"):
        inference_resize(np.zeros((4, 4), np.uint8))


def test_inference_resize_keeps_the_image_dtype_when_padding():
    out, _ = inference_resize(np.full((100, 130, 3), 7, np.uint8), input_size=64)
    assert out.shape == (64, 128, 3) and out.dtype == np.uint8
    out, _ = inference_resize(np.full((100, 130, 3), 0.5, np.float32), input_size=64)
    assert out.dtype == np.float32 and out[0, 0, 0] == 0.5 and out[0, -1, 0] == 0.0


def test_reseed_takes_the_seed_mod_2_to_the_32():
    aug = TrainAugmentation([1, 0, 2], input_size=32)
    img = np.zeros((40, 48, 3), np.uint8)
    kps = np.zeros((1, 3, 3))

    def draw(seed: int) -> np.ndarray:
        aug.reseed(seed)
        return aug(img, kps)["matrix"]

    np.testing.assert_allclose(draw(5), draw(5 + 2**32))
    assert not np.allclose(draw(5), draw(5 + 64))


def _plain(**kwargs) -> TrainAugmentation:
    """No rotation, no shift, no flip: crop scale 1 / zoom."""
    zoom = kwargs.pop("zoom", 1.0)
    return TrainAugmentation([1, 0, 2], **{"input_size": 32, "max_rotation": 0,
                                           "min_scale": 1 / zoom, "max_scale": 1 / zoom,
                                           "max_translate": 0, "flip_prob": 0.0, **kwargs})


def _apply(m, xy):
    return np.asarray(xy, float) @ m[:, :2].T + m[:, 2]


def test_boxes_keypoints_areas_follow_the_matrix_and_keep_their_dtypes():
    """A 50 x 40 image fitted to 40 x 32 (0.8), then zoom 1.5: boxes are the hull of their
    moved corners, keypoints the matrix applied, areas times the determinant."""
    aug = _plain(zoom=1.5)
    img = np.zeros((40, 50, 3), np.uint8)
    kps = np.array([[[10.0, 8.0, 2], [30.0, 20.0, 1], [20.0, 30.0, 2]],
                    [[5.0, 5.0, 2], [6.0, 7.0, 2], [7.0, 9.0, 2]]])
    boxes = np.array([[8.0, 6.0, 25.0, 26.0], [4.0, 4.0, 4.0, 6.0]])
    out = aug(img, kps, boxes=boxes)
    m = out["matrix"]
    zoom = 32 / 40 * 1.5
    np.testing.assert_allclose(m[:, :2], np.eye(2) * zoom, atol=1e-9)
    np.testing.assert_allclose(out["keypoints"][..., :2], _apply(m, kps[..., :2]), atol=1e-4)
    corners = _apply(m, boxes[:, :2])
    np.testing.assert_allclose(out["boxes"], np.c_[corners, boxes[:, 2:] * zoom], atol=1e-4)
    np.testing.assert_allclose(out["areas"], boxes[:, 2] * boxes[:, 3] * zoom**2, rtol=1e-5)
    for key in ("keypoints", "boxes", "areas"):
        assert out[key].dtype == np.float32, key
    assert out["mask"].dtype == np.uint8  # all ones but the padding
    assert set(out["crop"]) == {"scale", "shift", "rotate"} and out["crop"]["rotate"] == 0.0


def test_boxes_from_labelled_keypoints_when_none_given():
    aug = _plain()
    img = np.zeros((32, 32, 3), np.uint8)
    kps = np.array([[[4.0, 6.0, 2], [12.0, 9.0, 1], [30.0, 30.0, 0]],
                    [[1.0, 1.0, 0], [2.0, 2.0, 0], [3.0, 3.0, 0]],
                    [[10.0, 10.0, 1], [14.0, 20.0, 1], [3.0, 3.0, 0]]])  # occluded only
    out = aug(img, kps)
    np.testing.assert_allclose(out["boxes"][0], [4.0, 6.0, 8.0, 3.0], atol=1e-4)
    np.testing.assert_allclose(out["boxes"][2], [10.0, 10.0, 4.0, 10.0], atol=1e-4)
    np.testing.assert_allclose(out["areas"], [24.0, 0.0, 40.0], atol=1e-3)  # v = 0 ignored


def test_ignore_mask_padding_value():
    aug = _plain(ignore_padding=False, zoom=0.8)  # zoom out: the crop leaves the image
    img = np.zeros((48, 48, 3), np.uint8)
    mask = np.ones((48, 48), np.uint8)
    mask[:, :20] = 0
    out = aug(img, np.zeros((1, 3, 3)), mask=mask)
    assert set(np.unique(out["mask"])) == {0, 1}
    assert out["mask"][0, 0] == 1 and out["mask"][16, 1] == 1  # padding: plain background
    edge = np.argmax(out["mask"][16] == 0)  # first ignored column
    assert out["mask"][16, edge:edge + 5].tolist() == [0] * 5
    assert _plain(zoom=0.8)(img, np.zeros((1, 3, 3)), mask=mask)["mask"][0, 0] == 0


def test_affine_settings_and_defaults():
    own = SquareCropAffine(32)  # its own defaults are the SPEC's too
    assert own.crop_scale == (0.75, 1.5) and own.max_translate == 0.2
    assert tuple(own.rotate) == (-30.0, 30.0) and own.fill_mask == 0 and own.p == 1.0

    aug = TrainAugmentation([1, 0, 2])
    assert aug.input_size == 512
    crop = aug.transform.transforms[0]
    assert crop.crop_scale == (0.75, 1.5) and crop.max_translate == 0.2
    assert tuple(crop.rotate) == (-30.0, 30.0)
    assert crop.interpolation == cv2.INTER_LINEAR and crop.mask_interpolation == cv2.INTER_NEAREST
    assert crop.border_mode == cv2.BORDER_CONSTANT and crop.fill == 0 and crop.fill_mask == 0
    assert crop.keep_ratio is True and crop.p == 1.0
    a, b = TrainAugmentation([1, 0, 2], input_size=32, seed=4), TrainAugmentation(
        [1, 0, 2], input_size=32, seed=4)
    img, kps = np.zeros((40, 48, 3), np.uint8), np.zeros((1, 3, 3))
    np.testing.assert_allclose(a(img, kps)["matrix"], b(img, kps)["matrix"])
    for kwargs, match in [({"min_scale": 0.0}, "0 < min_scale <= max_scale"),
                          ({"flip_prob": 1.5}, r"flip_prob must be in \[0, 1\], got 1.5"),
                          ({"max_translate": 1.0}, r"max_translate is a fraction"),
                          ({"max_translate": 1.5}, r"max_translate is a fraction")]:
        with pytest.raises(ValueError, match=match):
            TrainAugmentation([1, 0, 2], **kwargs)
    with pytest.raises(ValueError, match=r"TrainAugmentation: expected an \(H, W, 3\) numpy "
                                         r"image, got \(4, 4\)"):
        aug(np.zeros((4, 4), np.uint8), kps)
    with pytest.raises(ValueError, match="got list"):
        aug([[0]], kps)


def test_enlarging_is_bilinear_and_tiny_fits():
    ramp = np.tile((np.arange(8) * 30).astype(np.uint8)[None, :, None], (8, 1, 3))
    out, _ = inference_resize(ramp, input_size=16, multiple=16)

    np.testing.assert_array_equal(out, cv2.resize(ramp, (16, 16),
                                                  interpolation=cv2.INTER_LINEAR))
    small, fit = fit_short_side(np.zeros((3, 3, 3), np.uint8), 1)
    assert small.shape == (1, 1, 3) and fit[0, 0] == pytest.approx(1 / 3)
