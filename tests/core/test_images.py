"""Reading image files: the EXIF orientation (stored pixels for data, the displayed image
for inference) and OpenCV's failures reported as errors naming the file. The start-up check
of the files (missing, empty, folders, truncated JPEGs): tests/data/test_datasets_checks.py."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest

from pinet_lightning.core.images import read_image


def test_read_image_turns_a_photo_only_when_asked(rotated_photo):
    path, upright = rotated_photo
    stored = read_image(path)  # the default: training and evaluation data
    assert stored.shape == (60, 40, 3)  # the stored, sideways pixels annotations refer to
    assert np.array_equal(read_image(path, orientation=False), stored)
    shown = read_image(path, orientation=True)  # inference: as a viewer displays it
    assert shown.shape == (40, 60, 3)
    assert np.abs(shown.astype(int) - upright).mean() < 4  # JPEG noise only
    assert np.array_equal(np.rot90(stored, -1), shown)


def test_an_opencv_assertion_is_an_error_naming_the_file(tmp_path, monkeypatch):
    """OpenCV asserts (cv2.error) on some damaged files instead of returning None."""
    path = tmp_path / "odd.png"
    cv2.imwrite(str(path), np.zeros((4, 4, 3), np.uint8))

    def asserts(data, flags):
        raise cv2.error("(-215:Assertion failed)")

    monkeypatch.setattr(cv2, "imdecode", asserts)
    with pytest.raises(OSError, match=re.escape(
            f"cannot decode image {path}: the file is corrupt or not an image; replace it or "
            "remove it from the annotation file")):
        read_image(path)
