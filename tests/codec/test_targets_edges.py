"""Training targets at their edges: Gaussians at the default sigma 2 by hand (keypoints and
part centers, sub-cell points), part centers without v = 0 keypoints, the codec passing
every setting through and accepting the limits of each one."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_targets import BG, TINY, _ch, _people

from pinet_lightning.codec.targets import (
    TARGET_KEYS,
    PINetTargetCodec,
    encode_targets,
    part_centers,
)


def _g2(dx: float, dy: float) -> float:
    """The Gaussian of algorithm.md 2.1 at sigma 2: exp(-d^2 / 8)."""
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


def test_encode_targets_accepts_the_limits_and_says_what_is_wrong():
    kp = _people([(0, 3, 2), (3, 0, 2), (0, 0, 0)])
    # A keypoint on row 0 or column 0 is in the map; (1, 1) maps and flat empty inputs work.
    out = encode_targets(kp, [0.5], TINY, (6, 8))
    assert out["heatmaps"][0, 3, 0] == 1.0 and out["heatmaps"][1, 0, 3] == 1.0
    assert encode_targets(kp, [4.0], TINY, (1, 1))["heatmaps"].shape == (3, 1, 1)
    assert encode_targets([], [], TINY, (4, 4))["offsets"].shape == (12, 4, 4)
    # Areas as a column (N, 1), as the published code keeps them: the same targets.
    column = encode_targets(kp, [[9.0]], TINY, (6, 8))
    np.testing.assert_array_equal(column["offset_weights"],
                                  encode_targets(kp, [9.0], TINY, (6, 8))["offset_weights"])
    for kwargs in ({"bg_weight": 0.0}, {"bg_weight": 1.0}, {"window_margin": 0.0}):
        encode_targets(kp, [4.0], TINY, (6, 8), **kwargs)
    bad = [({"bg_weight": 1.5}, r"bg_weight must be in \[0, 1\], got 1.5"),
           ({"bg_weight": -0.5}, r"bg_weight must be in \[0, 1\]"),
           ({"window_sigmas": 0.0}, "window_sigmas must be positive, got 0.0"),
           ({"window_margin": -1.0}, "window_margin must be >= 0 cells, got -1.0"),
           ({"offsets_format": "csr"}, "offsets_format must be 'dense' or 'omega', got 'csr'"),
           ({"output_size": (4, 0)}, r"output_size must be positive, got \(4, 0\)"),
           ({"output_size": "ab"}, r"output_size must be \(H, W\), got 'ab'")]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            encode_targets(kp, [4.0], TINY, **{"output_size": (6, 8), **kwargs})
    with pytest.raises(ValueError, match="got 1 people but 2 areas; pass one box area "
                                         r"\(in input pixels\) per person"):
        encode_targets(kp, [4.0, 5.0], TINY, (6, 8))
    with pytest.raises(ValueError, match="check that the dataset's layout matches its "
                                         "annotations"):
        encode_targets(np.zeros((1, 4, 3)), [4.0], TINY, (6, 8))
    two = np.concatenate([kp] * 4)
    with pytest.raises(ValueError, match=r"areas must be finite, got \[nan inf nan\]; check "
                                         "the boxes given to the augmentation"):
        encode_targets(two, [np.nan, np.inf, 1.0, np.nan], TINY, (6, 8))
    with pytest.raises(ValueError, match=r"got \[nan inf nan\];"):
        encode_targets(two, [np.nan, np.inf, np.nan, -np.inf], TINY, (6, 8))


def test_offset_weights_clamp_the_area_at_one_and_no_default_area_limit():
    kp = _people([(4, 4, 2), (0, 0, 0), (0, 0, 0)])
    for area, weight in [(0.0, 1.0), (0.5, 1.0), (1.5, 1 / math.sqrt(1.5)), (4.0, 0.5)]:
        out = encode_targets(kp, [area], TINY, (8, 8))
        assert out["offset_weights"][_ch(0, 0, 0), 4, 4] == np.float32(weight), area
        assert out["part_heatmaps"][0, 4, 4] == 1.0  # no minimum area by default


def test_part_gaussian_drawn_for_a_center_on_row_or_column_0():
    """Centers exactly on x = 0 or y = 0 are in the map; on a map taller than wide (H 12,
    W 8) a center at y = 10.5 is too."""
    for k1, k2, center in [((0, 4), (0, 6), (0, 5)), ((3, 0), (5, 0), (4, 0)),
                           ((2, 10), (2, 11), (2, 10.5))]:
        kp = _people([(1, 1, 0), (*k1, 2), (*k2, 2)])
        out = encode_targets(kp, [64.0], TINY, (12, 8))
        x, y = center
        assert out["part_heatmaps"][1, int(y), int(x)] == pytest.approx(
            _g2(x - int(x), y - int(y)), rel=1e-6), center


def test_omega_output_dtypes_also_when_empty():
    for kp in (np.zeros((0, 3, 3)), _people([(2, 2, 2), (3, 3, 2), (4, 4, 2)])):
        out = encode_targets(kp, np.full(len(kp), 16.0), TINY, (6, 6), offsets_format="omega")
        n = len(out["omega_index"])
        assert out["omega_index"].dtype == np.int64
        assert out["omega_offsets"].dtype == np.float32 and out["omega_offsets"].shape == (n, 2)
        assert out["omega_weights"].dtype == np.float32 and out["omega_weights"].shape == (n,)
        assert (n > 0) == (len(kp) > 0)


def test_windows_format_keys():
    kp = _people([(4, 4, 2), (5, 6, 2), (6, 5, 2)])
    windows = encode_targets(kp, [16.0], TINY, (8, 8), heatmaps_format="windows")
    assert "target_shape" in windows and "offsets" in windows  # dense offsets, windows heat
    assert windows["target_shape"].tolist() == [3, 2, 8, 8]
    codec = PINetTargetCodec(TINY, 8, heatmaps_format="windows")
    assert set(codec.encode(kp, [16.0])) == set(windows)
