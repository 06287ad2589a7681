"""Decoding at its thresholds: peaks exactly at the score threshold, kernel sizes exactly at
the map-size limits, and the SPEC defaults of DecodeConfig."""

from __future__ import annotations

import pytest
import torch

from pinet_lightning.decoding import DecodeConfig, find_peaks, nms_kernel_size


def test_decode_config_defaults_are_the_spec():
    cfg = DecodeConfig()
    assert cfg.flip_test is True and cfg.refine is True
    assert cfg.top_k == 30 and cfg.score_threshold == 0.01 and cfg.oks_threshold == 0.7
    assert cfg.scales == (1.0,) and cfg.nms_kernels == (7, 5, 3)
    assert cfg.nms_large_size == 300.0 and cfg.nms_medium_size == 200.0
    assert cfg.scale_multiple == 64 and cfg.max_people is None


def test_kernel_size_exactly_at_the_limits():
    """Over 300 -> 7, over 200 -> 5, else 3 (SPEC 5.3: strictly over)."""
    assert nms_kernel_size(200, 200) == 3
    assert nms_kernel_size(200, 201) == 5  # mean 200.5
    assert nms_kernel_size(300, 300) == 5
    assert nms_kernel_size(300, 301) == 7


@pytest.mark.parametrize("threshold", [0.25, 0.01])
def test_peak_exactly_at_the_threshold_is_dropped(threshold):
    maps = torch.zeros(1, 1, 9, 9)
    at = torch.tensor(threshold, dtype=torch.float32)
    maps[0, 0, 1, 1] = at  # scores <= threshold are dropped (SPEC 5.3)
    maps[0, 0, 5, 5] = torch.nextafter(at, torch.tensor(1.0))
    maps[0, 0, 7, 2] = 0.9
    scores, index, valid = find_peaks(maps, top_k=3, score_threshold=threshold)
    assert index[0, 0].tolist() == [7 * 9 + 2, 5 * 9 + 5, 1 * 9 + 1]
    assert valid[0, 0].tolist() == [True, True, False]


def test_find_peaks_defaults():
    """top_k 30, threshold 0.01 and a 3 x 3 kernel by default."""
    maps = torch.zeros(1, 1, 12, 12)
    maps[0, 0, ::2, ::2] = torch.linspace(0.02, 0.9, 36).view(6, 6)  # 36 peaks 2 apart
    maps[0, 0, 11, 11] = 0.01
    scores, index, valid = find_peaks(maps)
    assert scores.shape == (1, 1, 30) and valid.all()
    assert scores[0, 0, -1] == pytest.approx(0.02 + 6 * 0.88 / 35)
