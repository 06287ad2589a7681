"""Training targets (algorithm.md 2): hand-computed cases, a slow loop reference and the real
CrowdPose validation annotations."""

from __future__ import annotations

import json
import math
import pickle
from collections import defaultdict

import numpy as np
import pytest

from pinet_lightning.codec.targets import (
    TARGET_KEYS,
    PINetTargetCodec,
    densify_offsets,
    encode_targets,
    part_centers,
)
from pinet_lightning.core.layouts import get_layout

# K = 3 keypoints, P = 2 parts: p0 = [k0], p1 = [k1, k2]. Offset channel (p*K + k)*2 + c.
TINY = get_layout(
    {
        "name": "tiny",
        "names": ["a", "b", "c"],
        "flip_index": [0, 2, 1],
        "sigmas": [0.1, 0.1, 0.1],
        "parts": {"p0": [0], "p1": [1, 2]},
        "skeleton": [[0, 1], [0, 2]],
    }
)
BG = 0.1


def _ch(p: int, k: int, c: int) -> int:
    return (p * TINY.num_keypoints + k) * 2 + c


def _people(*rows) -> np.ndarray:
    """rows of 3 (x, y, v) triples -> (N, 3, 3) float array."""
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), 3, 3)


def _gauss(dx: float, dy: float, sigma: float) -> float:
    return math.exp(-(dx * dx + dy * dy) / (2 * sigma * sigma))


def test_shapes_dtypes_and_channel_order():
    kp = _people([(5, 5, 2), (7, 6, 2), (0, 0, 0)])
    out = encode_targets(kp, np.array([64.0]), TINY, (12, 16), sigma=1.0)
    expected = {
        "heatmaps": (3, 12, 16), "heatmap_mask": (3, 12, 16),
        "part_heatmaps": (2, 12, 16), "part_mask": (2, 12, 16),
        "offsets": (12, 12, 16), "offset_weights": (12, 12, 16),
    }
    assert set(out) == set(TARGET_KEYS)
    for key, shape in expected.items():
        assert out[key].shape == shape, key
        assert out[key].dtype == np.float32, key
    # p1's center is (7, 6): channel (1*3 + 1)*2 + 0 holds x offsets of k1 = i - 7.
    assert out["offsets"][_ch(1, 1, 0), 6, 7] == 0.0
    assert out["offsets"][_ch(1, 1, 0), 6, 5] == -2.0
    assert out["offsets"][_ch(1, 1, 1), 4, 5] == -2.0
    assert out["offsets"][_ch(1, 0, 0), 4, 5] == 0.0  # i - x_k0 = 5 - 5
    assert out["offset_weights"][_ch(1, 0, 0), 4, 5] == np.float32(1 / 8)


def test_gaussian_window_values_exact():
    # sigma 1: the window holds the cells with |d| < 3 sigma + 2 = 5 on each axis
    kp = _people([(7, 7, 2), (0, 0, 0), (0, 0, 0)])
    out = encode_targets(kp, np.array([100.0]), TINY, (16, 16), sigma=1.0)
    hm, mask = out["heatmaps"][0], out["heatmap_mask"][0]
    assert hm[7, 7] == 1.0
    assert hm[7, 8] == np.float32(math.exp(-0.5))
    assert hm[11, 11] == pytest.approx(math.exp(-16.0), rel=1e-6)  # corner: |d| = 4, 4
    assert hm[7, 12] == 0.0 and hm[12, 7] == 0.0 and hm[2, 7] == 0.0  # |d| = 5: outside
    window = np.zeros((16, 16), bool)
    window[3:12, 3:12] = True  # 9 cells a side
    np.testing.assert_array_equal(mask, np.where(window, 1.0, BG).astype(np.float32))
    assert (hm[~window] == 0).all() and (hm[window] > 0).all()
    # keypoints k1, k2 absent: empty channels, background mask
    assert (out["heatmaps"][1:] == 0).all()
    assert (out["heatmap_mask"][1:] == np.float32(BG)).all()
    # sub-cell point (5.5, 5.25): x in (0.5, 10.5) -> 1..10, y in (0.25, 10.25) -> 1..10
    out = encode_targets(_people([(5.5, 5.25, 1), (0, 0, 0), (0, 0, 0)]), [1.0], TINY,
                         (12, 12), sigma=1.0)
    hm, mask = out["heatmaps"][0], out["heatmap_mask"][0]
    assert hm[5, 5] == np.float32(_gauss(0.5, 0.25, 1.0))
    assert hm[10, 1] == np.float32(_gauss(4.5, 4.75, 1.0))
    assert (mask[1:11, 1:11] == 1).all() and mask[0, 5] == np.float32(BG)
    assert mask[11, 5] == np.float32(BG) and mask[5, 0] == np.float32(BG)
    assert mask[5, 11] == np.float32(BG)
    # sigma 2 (the SPEC's): 3 sigma + 2 = 8 cells, 15 a side for an integer point
    out = encode_targets(_people([(20, 20, 2), (0, 0, 0), (0, 0, 0)]), [1.0], TINY, (40, 40),
                         sigma=2.0)
    ones = np.argwhere(out["heatmap_mask"][0] == 1.0)
    assert ones.min(0).tolist() == [13, 13] and ones.max(0).tolist() == [27, 27]
    assert len(ones) == 15 * 15
    assert out["heatmaps"][0, 20, 27] == np.float32(math.exp(-49 / 8))


def test_two_people_heatmaps_combine_by_maximum():
    kp = _people([(4, 4, 2), (0, 0, 0), (0, 0, 0)], [(6, 4, 2), (0, 0, 0), (0, 0, 0)])
    hm = encode_targets(kp, [10.0, 20.0], TINY, (10, 12), sigma=1.0)["heatmaps"][0]
    assert hm[4, 4] == 1.0 and hm[4, 6] == 1.0
    assert hm[4, 5] == np.float32(math.exp(-0.5))  # both give exp(-0.5), not the sum
    assert hm[4, 2] == np.float32(math.exp(-2.0))  # from the first only


def test_person_at_border_clips_windows_and_offset_cells():
    # k0 at (0.5, 1.0): p0 center (0.5, 1.0); k1 at (3, 4): p1 center (3, 4); k2 absent.
    kp = _people([(0.5, 1.0, 2), (3, 4, 2), (0, 0, 0)])
    out = encode_targets(kp, [16.0], TINY, (10, 10), sigma=1.0)
    hm, mask = out["heatmaps"][0], out["heatmap_mask"][0]
    # window x in (0.5 - 5, 0.5 + 5) -> -4..5 -> 0..5; y in (-4, 6) -> -3..5 -> 0..5
    assert hm[0, 0] == np.float32(_gauss(0.5, 1.0, 1.0))
    assert hm[4, 3] == np.float32(_gauss(2.5, 3.0, 1.0))
    assert hm[5, 5] == np.float32(_gauss(4.5, 4.0, 1.0))
    assert (mask[:6, :6] == 1).all()
    assert (mask[6:, :] == np.float32(BG)).all() and (mask[:, 6:] == np.float32(BG)).all()
    assert out["part_heatmaps"][0, 1, 0] == np.float32(_gauss(0.5, 0.0, 1.0))
    off, w = out["offsets"], out["offset_weights"]
    # p0: cells i in [0-2, 0+2) -> {0, 1}; j in [1-2, 1+2) -> {0, 1, 2}
    ii, jj = np.meshgrid(np.arange(2), np.arange(3))
    np.testing.assert_array_equal(off[_ch(0, 0, 0), :3, :2], ii - 0.5)
    np.testing.assert_array_equal(off[_ch(0, 0, 1), :3, :2], jj - 1.0)
    np.testing.assert_array_equal(off[_ch(0, 1, 0), :3, :2], ii - 3.0)
    np.testing.assert_array_equal(off[_ch(0, 1, 1), :3, :2], jj - 4.0)
    for k in (0, 1):
        for c in (0, 1):
            expect = np.zeros((10, 10), np.float32)
            expect[:3, :2] = 0.25  # 1 / sqrt(16)
            np.testing.assert_array_equal(w[_ch(0, k, c)], expect)
            expect = np.zeros((10, 10), np.float32)
            expect[2:6, 1:5] = 0.25  # p1 center (3, 4): i in 1..4, j in 2..5
            np.testing.assert_array_equal(w[_ch(1, k, c)], expect)
    assert (w[[_ch(0, 2, 0), _ch(0, 2, 1), _ch(1, 2, 0), _ch(1, 2, 1)]] == 0).all()
    assert (w > 0).sum() == (6 + 16) * 2 * 2
    assert (off[w == 0] == 0).all()
    # keypoint = cell - offset everywhere in Omega
    cols = np.arange(1, 5)[None, :]
    np.testing.assert_array_equal(cols - off[_ch(1, 1, 0), 2:6, 1:5], np.full((4, 4), 3.0))


def test_offset_cells_at_far_border():
    # center (9.5, 7.9) on a 10 x 8 map: i in [7, 11) -> 7..9, j in [5, 9) -> 5..7
    kp = _people([(9.5, 7.9, 2), (0, 0, 0), (0, 0, 0)])
    w = encode_targets(kp, [4.0], TINY, (8, 10), sigma=1.0)["offset_weights"][_ch(0, 0, 0)]
    expect = np.zeros((8, 10), np.float32)
    expect[5:8, 7:10] = 0.5
    np.testing.assert_array_equal(w, expect)


def test_smaller_area_keeps_shared_cells():
    big = [(5, 5, 2), (0, 0, 0), (0, 0, 0)]  # p0 cells i 3..6, j 3..6
    small = [(6, 5.5, 2), (0, 0, 0), (0, 0, 0)]  # p0 cells i 4..7, j 3..6
    for order in ((0, 1), (1, 0)):  # independent of the people's order
        rows = [big, small]
        areas = np.array([100.0, 25.0])
        kp = _people(*[rows[i] for i in order])
        out = encode_targets(kp, areas[list(order)], TINY, (12, 12), sigma=1.0)
        ox, oy = out["offsets"][_ch(0, 0, 0)], out["offsets"][_ch(0, 0, 1)]
        wx, wy = out["offset_weights"][_ch(0, 0, 0)], out["offset_weights"][_ch(0, 0, 1)]
        expect_w = np.zeros((12, 12), np.float32)
        expect_w[3:7, 3] = 0.1  # only the big person claims column 3
        expect_w[3:7, 4:8] = 0.2  # the small one wins 4..6 and owns 7
        np.testing.assert_array_equal(wx, expect_w)
        np.testing.assert_array_equal(wy, expect_w)
        assert ox[4, 3] == -2.0 and oy[4, 3] == -1.0  # big: (3 - 5, 4 - 5)
        assert ox[4, 5] == -1.0 and oy[4, 5] == -1.5  # small: (5 - 6, 4 - 5.5)
        assert ox[6, 7] == 1.0 and oy[6, 7] == 0.5
        # heatmaps do not care about areas
        assert out["heatmaps"][0, 5, 5] == 1.0 and out["heatmaps"][0, 5, 6] > 0.6


def test_equal_areas_go_to_the_lower_person_index():
    a = [(5, 5, 2), (0, 0, 0), (0, 0, 0)]
    b = [(5.5, 5.5, 2), (0, 0, 0), (0, 0, 0)]  # same cells 3..6
    ox = encode_targets(_people(a, b), [9.0, 9.0], TINY, (12, 12))["offsets"][_ch(0, 0, 0)]
    assert ox[4, 4] == -1.0
    ox = encode_targets(_people(b, a), [9.0, 9.0], TINY, (12, 12))["offsets"][_ch(0, 0, 0)]
    assert ox[4, 4] == -1.5


def test_part_without_visible_keypoint():
    kp = _people([(5, 5, 0), (3, 4, 2), (7, 6, 1)])  # p0's only keypoint is absent
    out = encode_targets(kp, [16.0], TINY, (10, 10), sigma=1.0)
    assert (out["part_heatmaps"][0] == 0).all()
    assert (out["part_mask"][0] == np.float32(BG)).all()
    assert (out["offset_weights"][: _ch(1, 0, 0)] == 0).all()  # every p0 channel
    assert (out["offsets"][: _ch(1, 0, 0)] == 0).all()
    assert (out["heatmaps"][0] == 0).all()
    # p1 center is the mean of (3, 4) and (7, 6) = (5, 5); k0 (v = 0) has no offsets
    assert out["part_heatmaps"][1, 5, 5] == 1.0
    assert (out["offset_weights"][[_ch(1, 0, 0), _ch(1, 0, 1)]] == 0).all()
    assert out["offsets"][_ch(1, 2, 0), 5, 5] == -2.0
    assert (out["offset_weights"][_ch(1, 2, 1)] > 0).sum() == 16


def test_ignore_mask_zeroes_both_masks_only():
    kp = _people([(5, 5, 2), (5, 6, 2), (0, 0, 0)])
    ignore = np.ones((12, 12), np.float32)
    ignore[4:7, :] = 0  # through the middle of every window
    ignore[0, 11] = 0  # in the background
    plain = encode_targets(kp, [16.0], TINY, (12, 12), sigma=1.0)
    out = encode_targets(kp, [16.0], TINY, (12, 12), sigma=1.0, ignore_mask=ignore)
    for key in ("heatmap_mask", "part_mask"):
        assert (out[key][:, 4:7, :] == 0).all(), key
        assert (out[key][:, 0, 11] == 0).all(), key
        np.testing.assert_array_equal(out[key], plain[key] * ignore)
    for key in ("heatmaps", "part_heatmaps", "offsets", "offset_weights"):
        np.testing.assert_array_equal(out[key], plain[key])
    with pytest.raises(ValueError, match="ignore_mask"):
        encode_targets(kp, [16.0], TINY, (12, 12), ignore_mask=np.ones((6, 6)))


def test_keypoint_outside_the_map():
    # k1 at x = W (outside), k2 at (9.5, 3) inside; k0 at (-0.5, 2) outside.
    kp = _people([(-0.5, 2, 2), (10, 3, 2), (9.5, 3, 2)])
    out = encode_targets(kp, [4.0], TINY, (8, 10), sigma=1.0, part_center_in_map=True)
    assert (out["heatmaps"][:2] == 0).all()
    assert out["heatmaps"][2, 3, 9] == np.float32(_gauss(0.5, 0.0, 1.0))
    assert (out["heatmap_mask"][:2] == np.float32(BG)).all()
    # p0 has no in-map keypoint: no center. p1's center comes from k2 alone: (9.5, 3).
    assert (out["part_heatmaps"][0] == 0).all()
    assert out["part_heatmaps"][1, 3, 9] == np.float32(_gauss(0.5, 0.0, 1.0))
    w = out["offset_weights"]
    assert (w[: _ch(1, 2, 0)] == 0).all()  # nothing for p0 and none for k0, k1 in p1
    assert (w[_ch(1, 2, 0), 1:5, 7:10] == 0.5).all() and (w[_ch(1, 2, 0)] > 0).sum() == 12
    # the published rule (every v > 0 keypoint) puts p1's center at (9.75, 3), p0's outside
    c, exists = part_centers(kp, TINY, (8, 10), in_map=False)
    np.testing.assert_allclose(c[0, 1], [9.75, 3.0])
    assert exists.tolist() == [[True, True]]  # p0's center (-0.5, 2): int(-0.5) = 0
    c, exists = part_centers(kp, TINY, (8, 10))
    np.testing.assert_allclose(c[0, 1], [9.5, 3.0])
    out = encode_targets(kp, [4.0], TINY, (8, 10), sigma=1.0)  # default: the SPEC rule
    assert out["part_heatmaps"][1, 3, 9] == np.float32(_gauss(0.75, 0.0, 1.0))
    # a center off the map writes nothing
    far = _people([(1, 1, 2), (12, 3, 2), (9.5, 3, 2)])  # p1 center (10.75, 3)
    out = encode_targets(far, [4.0], TINY, (8, 10), part_center_in_map=False)
    assert (out["part_heatmaps"][1] == 0).all() and (out["offset_weights"][6:] == 0).all()
    # NaN coordinates never count
    nan = _people([(np.nan, 2, 2), (3, np.nan, 2), (0, 0, 0)])
    out = encode_targets(nan, [4.0], TINY, (8, 10))
    assert all(np.isfinite(v).all() for v in out.values())
    assert (out["heatmaps"] == 0).all() and (out["offset_weights"] == 0).all()


def test_center_just_left_of_the_map_claims_cells_0_and_1():
    # p1 = [k1, k2]: k1 at x = -1.4 (off the map), k2 at x = 1.0: center (-0.2, 4).
    # Published (OffsetGenerator): int(-0.2) = 0 is in the map, so the center writes offsets
    # on int(cx) - 2 <= i < int(cx) + 2 -> cells 0 and 1, rows 2..5; the part Gaussian
    # (HeatmapGenerator skips x < 0) is not drawn.
    kp = _people([(2.0, 2.0, 2), (-1.4, 4.0, 2), (1.0, 4.0, 1)])
    out = encode_targets(kp, [64.0], TINY, (8, 10), sigma=1.0)
    w, off = out["offset_weights"], out["offsets"]
    for k in (0, 2):  # the keypoints inside the map; k1 has no target
        x_k, y_k = kp[0, k, :2]
        claimed = w[_ch(1, k, 0)] > 0
        assert np.argwhere(claimed).tolist() == [[j, i] for j in (2, 3, 4, 5) for i in (0, 1)]
        assert (w[_ch(1, k, 1)][claimed] == np.float32(1 / 8)).all()
        for j in (2, 3, 4, 5):
            for i in (0, 1):
                assert off[_ch(1, k, 0), j, i] == np.float32(i - x_k)
                assert off[_ch(1, k, 1), j, i] == np.float32(j - y_k)
    assert (w[_ch(1, 1, 0)] == 0).all()
    assert (out["part_heatmaps"][1] == 0).all() and (out["part_mask"][1] == np.float32(BG)).all()
    c, exists = part_centers(kp, TINY, (8, 10), in_map=False)
    np.testing.assert_allclose(c[0, 1], [-0.2, 4.0])
    assert exists.tolist() == [[True, True]]
    # int(-1.0) = -1: a center at x = -1 is off the map, as is one at y = 8 (= H)
    for k1 in ((-3.0, 4.0, 2), (1.0, 12.0, 2)):
        out = encode_targets(_people([(2.0, 2.0, 2), k1, (1.0, 4.0, 1)]), [64.0], TINY, (8, 10))
        assert (out["offset_weights"][_ch(1, 0, 0):] == 0).all()


def test_min_part_area():
    kp = _people([(5, 5, 2), (3, 4, 2), (7, 6, 2)], [(2, 2, 2), (3, 3, 2), (4, 4, 2)])
    out = encode_targets(kp, [31.0**2, 32.0**2], TINY, (12, 12), min_part_area=32.0**2)
    # person 0 is too small: keypoint heatmaps yes, part centers and offsets no
    assert out["heatmaps"][0, 5, 5] == 1.0 and out["heatmaps"][0, 2, 2] == 1.0
    alone = encode_targets(kp[1:], [32.0**2], TINY, (12, 12))
    for key in ("part_heatmaps", "part_mask", "offsets", "offset_weights"):
        np.testing.assert_array_equal(out[key], alone[key])
    assert out["part_heatmaps"][0, 5, 5] < 1.0 and out["part_heatmaps"][0, 2, 2] == 1.0
    w = out["offset_weights"]
    assert set(np.unique(w).tolist()) == {0.0, np.float32(1 / 32)}
    assert (w[_ch(0, 0, 0)] > 0).sum() == 16
    default = encode_targets(kp, [31.0**2, 32.0**2], TINY, (12, 12))
    assert default["part_heatmaps"][0, 5, 5] == 1.0


def test_no_people_and_bad_inputs():
    out = encode_targets(np.zeros((0, 3, 3)), np.zeros(0), TINY, (6, 8))
    assert out["offsets"].shape == (12, 6, 8)
    assert (out["heatmaps"] == 0).all() and (out["heatmap_mask"] == np.float32(BG)).all()
    assert (out["offset_weights"] == 0).all()
    with pytest.raises(ValueError, match=r"\(N, 3, 3\)"):
        encode_targets(np.zeros((2, 4, 3)), np.ones(2), TINY, (6, 8))
    with pytest.raises(ValueError, match="areas"):
        encode_targets(np.zeros((2, 3, 3)), np.ones(3), TINY, (6, 8))
    with pytest.raises(ValueError, match="sigma"):
        encode_targets(np.zeros((1, 3, 3)), np.ones(1), TINY, (6, 8), sigma=0)
    with pytest.raises(ValueError, match="radius"):
        encode_targets(np.zeros((1, 3, 3)), np.ones(1), TINY, (6, 8), radius=0)
    with pytest.raises(ValueError, match="finite"):
        encode_targets(np.zeros((1, 3, 3)), [np.nan], TINY, (6, 8))
    with pytest.raises(ValueError, match="output_size"):
        encode_targets(np.zeros((1, 3, 3)), np.ones(1), TINY, (0, 8))


def test_codec_matches_function_and_validates():
    codec = PINetTargetCodec("crowdpose", 32, min_part_area=10.0, bg_weight=0.2)
    assert codec.output_size == (32, 32) and codec.layout.name == "crowdpose"
    rng = np.random.default_rng(1)
    kp = np.concatenate([rng.uniform(0, 32, (3, 14, 2)), rng.integers(0, 3, (3, 14, 1))], -1)
    areas = np.array([5.0, 50.0, 500.0])
    a = codec.encode(kp, areas)
    b = encode_targets(kp, areas, "crowdpose", (32, 32), min_part_area=10.0, bg_weight=0.2)
    for key in TARGET_KEYS:
        np.testing.assert_array_equal(a[key], b[key])
    clone = pickle.loads(pickle.dumps(codec))  # loader workers receive a copy
    assert clone == codec
    np.testing.assert_array_equal(clone.encode(kp, areas)["offsets"], a["offsets"])
    with pytest.raises(ValueError, match="bg_weight"):
        PINetTargetCodec("crowdpose", 32, bg_weight=2.0)
    with pytest.raises(ValueError, match="output_size"):
        PINetTargetCodec("crowdpose", (0, 32))


def test_omega_format_is_the_dense_targets_without_zeros():
    rng = np.random.default_rng(5)
    xy = rng.uniform(-3, 35, (7, 14, 2))
    kp = np.concatenate([xy, rng.integers(0, 3, (7, 14, 1))], -1)
    areas = rng.choice([30.0, 80.0, 900.0], 7)
    dense = encode_targets(kp, areas, "crowdpose", (32, 40))
    omega = encode_targets(kp, areas, "crowdpose", (32, 40), offsets_format="omega")
    assert set(omega) == set(TARGET_KEYS[:4]) | {"omega_index", "omega_offsets",
                                                 "omega_weights", "target_shape"}
    for key in TARGET_KEYS[:4]:
        np.testing.assert_array_equal(omega[key], dense[key])
    assert omega["target_shape"].tolist() == [14, 3, 32, 40]  # K, P, H, W
    index = omega["omega_index"]
    assert index.dtype == np.int64 and (np.diff(index) > 0).all()  # ascending, unique
    assert omega["omega_offsets"].shape == (len(index), 2)
    assert omega["omega_weights"].dtype == np.float32 and (omega["omega_weights"] > 0).all()
    assert len(index) == (dense["offset_weights"] > 0).sum() // 2
    offsets, weights = densify_offsets(index, omega["omega_offsets"], omega["omega_weights"],
                                       (84, 32, 40))
    np.testing.assert_array_equal(offsets, dense["offsets"])
    np.testing.assert_array_equal(weights, dense["offset_weights"])
    empty = encode_targets(np.zeros((0, 14, 3)), [], "crowdpose", (8, 8), offsets_format="omega")
    assert empty["omega_index"].shape == (0,) and empty["omega_offsets"].shape == (0, 2)
    with pytest.raises(ValueError, match="offsets_format"):
        encode_targets(kp, areas, "crowdpose", (32, 40), offsets_format="sparse")


# ---------------------------------------------------------------- slow loop reference


def _reference(kp, areas, layout, size, sigma, radius, bg, ignore, min_area, in_map):
    """algorithm.md 2 with the module's documented choices, one person/keypoint/cell at a time."""
    h, w = size
    k_num, p_num = layout.num_keypoints, layout.num_parts
    heat = np.zeros((k_num, h, w))
    hmask = np.full((k_num, h, w), bg)
    parts = np.zeros((p_num, h, w))
    pmask = np.full((p_num, h, w), bg)
    off = np.zeros((p_num * k_num * 2, h, w))
    wt = np.zeros((p_num * k_num * 2, h, w))
    owner = {}  # (part, keypoint, j, i) -> (area, person)

    def counts(x, y, v):
        return v > 0 and 0 <= x < w and 0 <= y < h

    def splat(maps, masks, ch, x, y):
        for j in range(h):
            for i in range(w):
                if abs(i - x) < 3 * sigma + 2 and abs(j - y) < 3 * sigma + 2:
                    g = math.exp(-((i - x) ** 2 + (j - y) ** 2) / (2 * sigma**2))
                    maps[ch, j, i] = max(maps[ch, j, i], g)
                    masks[ch, j, i] = 1.0

    for n in range(len(kp)):
        for k in range(k_num):
            if counts(*kp[n, k]):
                splat(heat, hmask, k, kp[n, k, 0], kp[n, k, 1])
        if areas[n] < min_area:
            continue
        for p, part in enumerate(layout.parts):
            use = counts if in_map else (lambda x, y, v: v > 0)
            pts = [kp[n, k, :2] for k in part if use(*kp[n, k])]
            if not pts:
                continue
            cx, cy = np.mean(pts, axis=0)
            # published: offsets when int() of the center is in the map (int truncates),
            # the Gaussian only when the center itself is
            if not (0 <= int(cx) < w and 0 <= int(cy) < h):
                continue
            if 0 <= cx < w and 0 <= cy < h:
                splat(parts, pmask, p, cx, cy)
            for j in range(int(cy) - radius, int(cy) + radius):
                for i in range(int(cx) - radius, int(cx) + radius):
                    if not (0 <= i < w and 0 <= j < h):
                        continue
                    for k in range(k_num):
                        if not counts(*kp[n, k]):
                            continue
                        key = (p, k, j, i)
                        if key in owner and owner[key] <= (areas[n], n):
                            continue
                        owner[key] = (areas[n], n)
                        ch = (p * k_num + k) * 2
                        off[ch, j, i] = i - kp[n, k, 0]
                        off[ch + 1, j, i] = j - kp[n, k, 1]
                        wt[ch, j, i] = wt[ch + 1, j, i] = 1 / math.sqrt(max(areas[n], 1.0))
    hmask *= ignore
    pmask *= ignore
    return heat, hmask, parts, pmask, off, wt


@pytest.mark.parametrize("in_map", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_slow_loop_reference(seed, in_map):
    rng = np.random.default_rng(seed)
    layout = get_layout("crowdpose")
    h, w, n = 18, 22, 6
    # people crowded around a few spots so that their offset squares collide
    spots = rng.uniform([-2, -2], [w + 2, h + 2], (2, 2))
    xy = spots[rng.integers(0, 2, (n, 1))] + rng.normal(0, 3, (n, 14, 2))
    if seed == 1:
        xy = np.round(xy * 2) / 2  # half-cell positions: exact window edges and ties
    v = rng.choice([0, 1, 2], (n, 14, 1), p=[0.2, 0.3, 0.5])
    kp = np.concatenate([xy, v], -1)
    areas = rng.choice([20.0, 60.0, 60.0, 300.0, 1000.0], n)  # repeated areas: tie rule
    ignore = (rng.uniform(size=(h, w)) > 0.1).astype(np.float32)
    sigma = [2.0, 1.5, 1.0][seed]
    min_area = [0.0, 50.0, 0.0][seed]
    out = encode_targets(kp, areas, layout, (h, w), sigma=sigma, radius=2, bg_weight=BG,
                         ignore_mask=ignore, min_part_area=min_area, part_center_in_map=in_map)
    ref = _reference(kp, areas, layout, (h, w), sigma, 2, BG, ignore, min_area, in_map)
    for key, expect in zip(TARGET_KEYS, ref, strict=True):
        if key in ("heatmaps", "part_heatmaps"):
            np.testing.assert_allclose(out[key], expect, rtol=1e-6, atol=1e-7, err_msg=key)
        else:
            np.testing.assert_array_equal(out[key], expect.astype(np.float32), err_msg=key)
    assert (out["offset_weights"] > 0).any()  # the case is not vacuous


# ---------------------------------------------------------------- real CrowdPose people


def _most_crowded(path, count):
    data = json.loads(path.read_text())
    anns = defaultdict(list)
    for a in data["annotations"]:
        anns[a["image_id"]].append(a)
    images = sorted(data["images"], key=lambda im: (-im["crowdIndex"], im["id"]))[:count]
    return [(im, anns[im["id"]]) for im in images]


def test_crowdpose_val_most_crowded_images(crowdpose_val_json):
    layout = get_layout("crowdpose")
    codec = PINetTargetCodec(layout, 128)
    checked_omega = 0
    for image, anns in _most_crowded(crowdpose_val_json, 50):
        scale = 128 / max(image["width"], image["height"])  # longer side -> 128 cells
        kp = np.array([a["keypoints"] for a in anns], np.float64).reshape(-1, 14, 3)
        kp[..., :2] *= scale
        # CrowdPose has no "area": box w * h, in input pixels (4 per output cell)
        areas = np.array([a["bbox"][2] * a["bbox"][3] for a in anns]) * (4 * scale) ** 2
        out = codec.encode(kp, areas)
        assert {key: out[key].shape for key in TARGET_KEYS} == {
            "heatmaps": (14, 128, 128), "heatmap_mask": (14, 128, 128),
            "part_heatmaps": (3, 128, 128), "part_mask": (3, 128, 128),
            "offsets": (84, 128, 128), "offset_weights": (84, 128, 128),
        }
        assert all(out[key].dtype == np.float32 for key in TARGET_KEYS)
        for key in ("heatmaps", "part_heatmaps"):
            assert out[key].min() >= 0 and out[key].max() <= 1
        for key in ("heatmap_mask", "part_mask"):
            assert np.isin(out[key], np.float32([0.1, 1.0])).all()
        assert (out["heatmaps"] > 0).sum() <= (out["heatmap_mask"] == 1).sum()
        weights = out["offset_weights"]
        assert (weights >= 0).all()
        allowed = np.float32(1 / np.sqrt(np.maximum(areas, 1)))
        assert np.isin(weights[weights > 0], allowed).all()
        assert (out["offsets"][weights == 0] == 0).all()
        assert (weights[0::2] == weights[1::2]).all()  # x and y channels share Omega
        # a visible keypoint of a part makes a center, hence a non-empty Omega
        has_part_kp = (kp[:, sum(layout.parts, ()), 2] > 0).any()
        if has_part_kp:
            # the nearest cell is at most sqrt(0.5) from the center
            assert (weights > 0).any() and out["part_heatmaps"].max() >= math.exp(-0.5 / 8)
            checked_omega += 1
        # every weighted offset decodes (cell - offset) to a keypoint of a person whose
        # weight it carries
        ch, j, i = np.nonzero(weights[0::2])
        k = ch % 14
        decoded = np.stack([i - out["offsets"][2 * ch, j, i],
                            j - out["offsets"][2 * ch + 1, j, i]], -1)
        dist = np.abs(decoded[:, None] - kp[:, k, :2].transpose(1, 0, 2).astype(np.float32))
        match = (dist.max(-1) < 1e-4) & (weights[2 * ch, j, i][:, None] == allowed[None])
        assert match.any(1).all()
    assert checked_omega >= 45


def test_window_sigmas_and_margin_set_the_gaussian_window():
    kp = _people([(6, 6, 2), (-9, -9, 0), (-9, -9, 0)])
    # cells strictly closer than window_sigmas * sigma + window_margin (sigma 1)
    for window, margin, side in ((3.0, 2.0, 9), (3.0, 0.0, 5), (1.0, 0.5, 3), (2.5, 0.0, 5),
                                 (1.0, 0.0, 1)):
        out = encode_targets(kp, [100.0], TINY, (13, 13), sigma=1.0, window_sigmas=window,
                             window_margin=margin)
        ones = out["heatmap_mask"][0] == 1.0
        assert ones.sum() == side * side, (window, margin)
        assert ones[6 - side // 2: 6 + side // 2 + 1, 6 - side // 2: 6 + side // 2 + 1].all()
    codec = PINetTargetCodec(TINY, (13, 13), sigma=1.0, window_sigmas=1.0, window_margin=1.0)
    assert (codec.encode(kp, [100.0])["heatmap_mask"][0] == 1.0).sum() == 9
    with pytest.raises(ValueError, match="window_sigmas"):
        PINetTargetCodec(TINY, (13, 13), window_sigmas=0.0)
    with pytest.raises(ValueError, match="window_margin"):
        PINetTargetCodec(TINY, (13, 13), window_margin=-1.0)
