"""inference_resize values and the training augmentation's geometry (flip order, affine)."""

from __future__ import annotations

import numpy as np
import pytest

from pinet_lightning.augmentation import TrainAugmentation, inference_resize

FLIP = [1, 0, 2]  # two mirror keypoints and a middle one


def _apply(m, xy):
    return np.asarray(xy, float) @ m[:, :2].T + m[:, 2]


@pytest.mark.parametrize("h,w", [(300, 500), (500, 300), (512, 512), (100, 130), (640, 427)])
def test_inference_resize_sizes_and_corners(h, w):
    img = np.full((h, w, 3), 200, np.uint8)
    out, back = inference_resize(img, input_size=512, multiple=64)
    oh, ow = out.shape[:2]
    assert oh % 64 == 0 and ow % 64 == 0
    assert min(oh, ow) == 512
    scale = 512 / min(h, w)
    cw, ch = round(w * scale), round(h * scale)
    assert max(oh, ow) == int(np.ceil(max(cw, ch) / 64) * 64)
    # pixel edges: the content's outer corners map to the image's outer corners
    np.testing.assert_allclose(_apply(back, [-0.5, -0.5]), [-0.5, -0.5], atol=1e-9)
    np.testing.assert_allclose(_apply(back, [cw - 0.5, ch - 0.5]), [w - 0.5, h - 0.5], atol=1e-9)
    assert back.shape == (2, 3)
    assert np.all(out[:ch, :cw] == 200) and np.all(out[ch:] == 0) and np.all(out[:, cw:] == 0)


def test_inference_resize_identity_for_square_input_size():
    img = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    out, back = inference_resize(img)
    assert np.array_equal(out, img)
    np.testing.assert_allclose(back, [[1, 0, 0], [0, 1, 0]])


def test_inference_resize_maps_a_dot_back():
    img = np.zeros((200, 300, 3), np.uint8)
    img[120:123, 210:213] = 255  # dot centred at (211, 121)
    out, back = inference_resize(img, input_size=128, multiple=64)
    g = out[..., 0].astype(float)
    ys, xs = np.mgrid[: g.shape[0], : g.shape[1]]
    c = [(xs * g).sum() / g.sum(), (ys * g).sum() / g.sum()]
    np.testing.assert_allclose(_apply(back, c), [211, 121], atol=0.2)


def test_inference_resize_rejects_bad_input():
    with pytest.raises(ValueError, match="inference_resize"):
        inference_resize(np.zeros((10, 10), np.uint8))


def _dots(size, points):
    img = np.zeros((size, size, 3), np.uint8)
    for x, y in points:
        img[int(y) - 1 : int(y) + 2, int(x) - 1 : int(x) + 2] = 255
    return img


def _centroid(img, x, y, r=4):
    g = img[..., 0].astype(float)
    xi, yi = int(round(x)), int(round(y))
    win = g[yi - r : yi + r + 1, xi - r : xi + r + 1]
    ys, xs = np.mgrid[yi - r : yi + r + 1, xi - r : xi + r + 1]
    return (xs * win).sum() / win.sum(), (ys * win).sum() / win.sum()


def test_flip_mirrors_x_and_swaps_by_flip_order():
    s = 64
    aug = TrainAugmentation(FLIP, input_size=s, max_rotation=0, min_scale=1, max_scale=1,
                            max_translate=0, flip_prob=1.0, seed=0)  # fmt: skip
    img = np.random.default_rng(1).integers(0, 255, (s, s, 3), dtype=np.uint8)
    kps = np.array([[[10.0, 20.0, 2], [50.0, 21.0, 1], [30.0, 5.0, 2]]])
    out = aug(img, kps)
    assert out["flipped"]
    assert np.array_equal(out["image"], img[:, ::-1])
    # x -> W - 1 - x, and keypoint k now holds the mirror of keypoint FLIP[k]
    expected = np.array([[[s - 1 - 50.0, 21.0, 1], [s - 1 - 10.0, 20.0, 2], [s - 1 - 30, 5, 2]]])
    np.testing.assert_allclose(out["keypoints"], expected, atol=1e-4)
    np.testing.assert_allclose(out["matrix"], [[-1, 0, s - 1], [0, 1, 0]], atol=1e-9)


def test_no_flip_keeps_order():
    aug = TrainAugmentation(FLIP, input_size=64, max_rotation=0, min_scale=1, max_scale=1,
                            max_translate=0, flip_prob=0.0, seed=0)  # fmt: skip
    kps = np.array([[[10.0, 20.0, 2], [50.0, 21.0, 1], [30.0, 5.0, 2]]])
    out = aug(np.zeros((64, 64, 3), np.uint8), kps)
    assert not out["flipped"]
    np.testing.assert_allclose(out["keypoints"], kps, atol=1e-4)


def test_keypoints_follow_a_forced_scale_and_rotation():
    s, scale = 96, 1.25
    aug = TrainAugmentation(FLIP, input_size=s, max_rotation=30, min_scale=scale,
                            max_scale=scale, max_translate=0, flip_prob=0.0, seed=3)  # fmt: skip
    pts = [(40.0, 30.0), (60.0, 55.0), (45.0, 70.0)]
    img = _dots(s, pts)
    kps = np.array([[[x, y, 2] for x, y in pts]])
    boxes = np.array([[40.0, 30.0, 20.0, 40.0]])
    mask = np.ones((s, s), np.uint8)
    mask[28:33, 38:43] = 0  # ignore a patch around the first dot
    angles = []
    for _ in range(4):
        out = aug(img, kps, mask=mask, boxes=boxes, areas=np.array([800.0]))
        m = out["matrix"]
        lin = m[:, :2] / scale
        np.testing.assert_allclose(lin @ lin.T, np.eye(2), atol=1e-6)  # scale x rotation
        angle = np.degrees(np.arctan2(lin[1, 0], lin[0, 0]))
        assert abs(angle) <= 30 + 1e-6
        angles.append(angle)
        np.testing.assert_allclose(_apply(m, (s - 1) / 2 * np.ones(2)), [(s - 1) / 2] * 2,
                                   atol=0.51)  # rotation about the center, no translation
        np.testing.assert_allclose(out["keypoints"][0, :, :2], _apply(m, pts), atol=1e-3)
        for (x, y) in out["keypoints"][0, :, :2]:
            np.testing.assert_allclose(_centroid(out["image"], x, y), (x, y), atol=0.3)
        x0, y0 = out["keypoints"][0, 0, :2]
        assert out["mask"][int(round(y0)), int(round(x0))] == 0  # the mask moved with it
        assert out["mask"].sum() > s * s - 60
        assert out["areas"][0] == pytest.approx(800 * scale**2, rel=1e-5)
        assert out["boxes"][0, 2] * out["boxes"][0, 3] >= 800 * scale**2 - 1e-3  # hull
    assert np.ptp(angles) > 1.0  # the rotation is random


def test_short_side_fit_translation_and_out_of_crop_points_kept():
    aug = TrainAugmentation(FLIP, input_size=64, max_rotation=0, min_scale=1, max_scale=1,
                            max_translate=10, flip_prob=0.0, seed=0)  # fmt: skip
    img = np.zeros((100, 300, 3), np.uint8)
    kps = np.array([[[150.0, 50.0, 2], [5.0, 50.0, 2], [295.0, 10.0, 1]]])
    out = aug(img, kps)
    assert out["image"].shape == (64, 64, 3)
    m = out["matrix"]
    assert m[0, 0] == pytest.approx(0.64, abs=1e-3)  # short side 100 -> 64
    kp = out["keypoints"][0]
    assert kp.shape == (3, 3) and np.all(kp[:, 2] == [2, 2, 1])
    assert kp[1, 0] < 0 and kp[2, 0] > 63  # outside the crop, coordinates kept
    t = kp[0, :2] - np.array([31.5, 31.5])  # image centre lands near the crop centre
    assert np.all(np.abs(t) <= 10.5)


def test_reseed_reproduces_and_varies():
    aug = TrainAugmentation(FLIP, input_size=32)
    img = np.zeros((32, 32, 3), np.uint8)
    kps = np.array([[[5.0, 5.0, 2], [20, 20, 2], [10, 10, 2]]])
    aug.reseed(7)
    a = [aug(img, kps)["matrix"] for _ in range(3)]
    aug.reseed(7)
    b = [aug(img, kps)["matrix"] for _ in range(3)]
    aug.reseed(8)
    c = aug(img, kps)["matrix"]
    np.testing.assert_allclose(a, b)
    assert not np.allclose(a[0], c)
