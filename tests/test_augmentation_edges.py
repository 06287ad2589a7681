"""Augmentation at its edges: the smallest sizes inference_resize accepts, the padded
canvas's dtype, the error messages, and the reseed modulus (seeds are taken mod 2**32)."""

from __future__ import annotations

import numpy as np
import pytest

from pinet_lightning.augmentation import TrainAugmentation, inference_resize


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
