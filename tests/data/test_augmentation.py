"""inference_resize values and the training augmentation's geometry (flip order, affine)."""

from __future__ import annotations

import numpy as np
import pytest

from pinet_lightning.data.augmentation import TrainAugmentation, inference_resize

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
                            max_translate=0, flip_prob=1.0, seed=0)
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
                            max_translate=0, flip_prob=0.0, seed=0)
    kps = np.array([[[10.0, 20.0, 2], [50.0, 21.0, 1], [30.0, 5.0, 2]]])
    out = aug(np.zeros((64, 64, 3), np.uint8), kps)
    assert not out["flipped"]
    np.testing.assert_allclose(out["keypoints"], kps, atol=1e-4)


def test_keypoints_follow_a_forced_scale_and_rotation():
    s, scale = 96, 1.25  # a crop of 0.8 short sides: magnification 1.25
    aug = TrainAugmentation(FLIP, input_size=s, max_rotation=30, min_scale=1 / scale,
                            max_scale=1 / scale, max_translate=0, flip_prob=0.0,
                            ignore_padding=False, seed=3)
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
                            max_translate=0.1, flip_prob=0.0, seed=0)
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
    assert np.all(np.abs(t) <= 0.1 * 64 + 0.5)


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


def _draws(aug, image, n):
    """The crop of ``n`` draws read back from the whole matrix: magnification relative to
    the short-side fit, the linear part, and the crop centre's shift in crop sides."""
    h, w = image.shape[:2]
    s = aug.input_size
    kps = np.zeros((1, len(FLIP), 3))
    mags, lins, shifts, params = [], [], [], []
    for _ in range(n):
        out = aug(image, kps)
        m = out["matrix"]
        zoom = np.sqrt(abs(np.linalg.det(m[:, :2])))  # output px per original px
        mags.append(zoom * min(h, w) / s)
        lins.append(m[:, :2] / zoom)
        inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))
        centre = inv[:2, :2] @ np.full(2, (s - 1) / 2) + inv[:2, 2]  # in the image
        shifts.append((centre - [(w - 1) / 2, (h - 1) / 2]) * zoom / s)  # / crop side
        params.append(out["crop"])
    return np.array(mags), np.array(lins), np.array(shifts), params


QUANTILES = np.linspace(0.05, 0.95, 19)


def test_scale_is_the_published_square_crop():
    """Crop side = short side x u, u ~ U[0.75, 1.5]: magnification 1/u, same on x and y."""
    aug = TrainAugmentation(FLIP, input_size=30, flip_prob=0.0, seed=0)
    image = np.zeros((60, 90, 3), np.uint8)  # short side 60 -> 30, long side 45: exact
    mags, lins, _, params = _draws(aug, image, 2000)
    u = 1 / mags
    assert u.min() >= 0.75 - 1e-9 and u.max() <= 1.5 + 1e-9
    np.testing.assert_allclose(np.quantile(u, QUANTILES), 0.75 + 0.75 * QUANTILES, atol=0.03)
    assert np.median(mags) == pytest.approx(1 / 1.125, abs=0.02)  # zooms out half the time
    np.testing.assert_allclose([p["scale"] for p in params], u, rtol=1e-9)
    # one scale on both axes and no shear, whatever the rotation: the linear part is a
    # rotation, so a square stays a square (aspect ratio 1, right angles)
    np.testing.assert_allclose(lins @ lins.transpose(0, 2, 1),
                               np.broadcast_to(np.eye(2), lins.shape), atol=1e-9)
    square = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    sides = np.einsum("nij,mj->nmi", lins, square)
    ratio = np.linalg.norm(sides[:, 1] - sides[:, 0], axis=1) / np.linalg.norm(
        sides[:, 2] - sides[:, 0], axis=1)
    np.testing.assert_allclose(ratio, 1.0, atol=1e-9)
    angles = np.degrees(np.arctan2(lins[:, 1, 0], lins[:, 0, 0]))
    assert np.abs(angles).max() <= 30 + 1e-6 and np.ptp(angles) > 50


def test_translation_is_a_fifth_of_the_crop_on_each_image_axis():
    aug = TrainAugmentation(FLIP, input_size=32, seed=1)
    image = np.zeros((72, 48, 3), np.uint8)  # fitted to 48 x 32 exactly
    _, _, shifts, params = _draws(aug, image, 2000)
    # the crop centre moves by dx, dy ~ U[-0.2, 0.2] crop sides along the image's axes
    # (after the rotation, axis-aligned bounds of 0.2 would be exceeded up to 0.27)
    assert np.abs(shifts).max() <= 0.2 + 1e-9
    for axis in (0, 1):
        np.testing.assert_allclose(np.quantile(shifts[:, axis], QUANTILES),
                                   -0.2 + 0.4 * QUANTILES, atol=0.015)
    assert abs(np.corrcoef(shifts.T)[0, 1]) < 0.1  # independent axes
    np.testing.assert_allclose([p["shift"] for p in params], shifts, atol=1e-9)
    # at 512 a shift of 0.2 crop sides is 102.4 input pixels, whatever the scale
    assert 0.2 * 512 == pytest.approx(102.4)


def test_padding_is_ignored_by_default():
    s = 48
    image = np.full((s, s, 3), 200, np.uint8)
    kps = np.zeros((1, 3, 3))
    fixed = dict(max_rotation=0, min_scale=1.5, max_scale=1.5, max_translate=0, flip_prob=0)
    out = TrainAugmentation(FLIP, input_size=s, seed=0, **fixed)(image, kps)
    # u = 1.5: the image fills the central 32 x 32 pixels, the rest is padding
    inside = out["image"][..., 0] > 0
    assert inside.sum() == pytest.approx((s / 1.5) ** 2, rel=0.1)
    np.testing.assert_array_equal(out["mask"], inside.astype(np.uint8))
    mask = np.ones((s, s), np.uint8)
    mask[:4, :4] = 0  # an ignored region inside the image stays ignored
    out2 = TrainAugmentation(FLIP, input_size=s, seed=0, **fixed)(image, kps, mask=mask)
    assert out2["mask"].sum() < out["mask"].sum() and (out2["mask"] <= out["mask"]).all()
    off = TrainAugmentation(FLIP, input_size=s, seed=0, ignore_padding=False, **fixed)
    assert off(image, kps)["mask"] is None
    assert off(image, kps, mask=np.ones((s, s), np.uint8))["mask"].min() == 1


def test_old_pixel_translation_is_refused():
    with pytest.raises(ValueError, match="fraction of the crop side"):
        TrainAugmentation(FLIP, max_translate=40)
