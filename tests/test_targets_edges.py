"""Training targets at their edges: Gaussians at the default sigma 2 by hand (keypoints and
part centers, sub-cell points), part centers without v = 0 keypoints, the codec passing
every setting through and accepting the limits of each one."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_targets import BG, TINY, _ch, _people

from pinet_lightning.targets import TARGET_KEYS, PINetTargetCodec, encode_targets, part_centers


def _g2(dx: float, dy: float) -> float:
    """The SPEC Gaussian at sigma 2: exp(-d^2 / 8)."""
    return math.exp(-(dx * dx + dy * dy) / 8.0)


def test_default_sigma_2_by_hand_at_a_sub_cell_point():
    # k0 at (10.5, 9.25) alone in part p0: the part center is the same point.
    out = encode_targets(_people([(10.5, 9.25, 2), (0, 0, 0), (0, 0, 0)]), [64.0], TINY,
                         (24, 24))
    for hm in (out["heatmaps"][0], out["part_heatmaps"][0]):
        assert hm[9, 10] == pytest.approx(_g2(0.5, 0.25), rel=1e-6)
        assert hm[12, 13] == pytest.approx(_g2(2.5, 2.75), rel=1e-6)
        assert hm[5, 6] == pytest.approx(_g2(4.5, 4.25), rel=1e-6)
        # window: |d| < 3 sigma + 2 = 8 -> x in 3..18, y in 2..17 (16 cells a side)
        assert hm[9, 18] == pytest.approx(_g2(7.5, 0.25), rel=1e-6) and hm[9, 19] == 0.0
        assert hm[2, 10] == pytest.approx(_g2(0.5, 7.25), rel=1e-6) and hm[1, 10] == 0.0
    mask = out["heatmap_mask"][0]
    assert (mask[2:18, 3:19] == 1).all() and mask.sum() == 16 * 16 + BG * (24 * 24 - 16 * 16)


def test_part_centers_leave_out_absent_keypoints():
    kp = _people([(2, 2, 2), (4, 6, 2), (30, 30, 0)])  # k2 absent, far off
    centers, exists = part_centers(kp, TINY, (12, 12), in_map=False)
    np.testing.assert_allclose(centers[0, 1], [4.0, 6.0])  # p1 = mean of k1 alone
    assert exists[0].tolist() == [True, True]
    kp[0, 1, 2] = 0  # p1 has no labelled keypoint: no center
    assert part_centers(kp, TINY, (12, 12), in_map=False)[1][0].tolist() == [True, False]


def test_codec_passes_every_setting_through():
    codec = PINetTargetCodec(TINY, (12, 14), sigma=1.5, radius=1, bg_weight=0.3,
                             min_part_area=20.0, part_center_in_map=True, window_sigmas=2.0,
                             window_margin=1.0)
    kp = _people([(5, 5, 2), (3, 4, 2), (14.5, 6, 2)], [(8, 2, 2), (9, 9, 1), (10, 3, 2)])
    areas = np.array([30.0, 10.0])
    ignore = np.ones((12, 14), np.float32)
    ignore[:, :3] = 0
    got = codec.encode(kp, areas, ignore_mask=ignore)
    want = encode_targets(kp, areas, TINY, (12, 14), sigma=1.5, radius=1, bg_weight=0.3,
                          ignore_mask=ignore, min_part_area=20.0, part_center_in_map=True,
                          window_sigmas=2.0, window_margin=1.0)
    for key in TARGET_KEYS:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert (got["heatmap_mask"][..., :3] == 0).all()
    # p1 of person 0 from in-map keypoints only: (3, 4); the SPEC rule would give (8.75, 5).
    assert (got["offset_weights"][_ch(1, 1, 0)] > 0).sum() == 4  # radius 1: a 2 x 2 square
    assert got["offsets"][_ch(1, 1, 0), 3, 2] == 2.0 - 3.0
    omega = PINetTargetCodec(TINY, 12, offsets_format="omega").encode(kp, areas)
    assert "omega_index" in omega and "offsets" not in omega


def test_codec_accepts_the_limits_and_rejects_beyond():
    ok = PINetTargetCodec(TINY, (1, 1), sigma=1e-3, radius=1, bg_weight=0.0, window_margin=0.0)
    assert ok.output_size == (1, 1)
    PINetTargetCodec(TINY, 4, bg_weight=1.0)
    for bad, match in [({"sigma": 0.0}, "sigma must be positive"),
                       ({"radius": 0}, "radius must be a positive integer"),
                       ({"radius": 1.5}, "radius must be a positive integer"),
                       ({"bg_weight": -0.1}, r"bg_weight must be in \[0, 1\]"),
                       ({"window_sigmas": 0.0}, "window_sigmas must be positive"),
                       ({"window_margin": -1.0}, "window_margin must be >= 0"),
                       ({"offsets_format": "sparse"}, "offsets_format must be 'dense' or 'omega'"),
                       ({"output_size": (4, 4, 4)}, r"output_size must be \(H, W\) > 0")]:
        with pytest.raises(ValueError, match=match):
            PINetTargetCodec(TINY, **{"output_size": 4, **bad})
