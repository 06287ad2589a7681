"""Shared fixtures: the real CrowdPose annotations (skipped where absent), a tiny synthetic
crowd generated once per test session, and a photo stored sideways with an EXIF orientation."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pinet_lightning.data.synthetic import generate_synthetic_crowd

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# 2 threads by default; scripts/mutation.py runs two workers of one thread each
torch.set_num_threads(int(os.environ.get("PINET_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def crowdpose_val_json() -> Path:
    path = SHARED_DATA / "crowdpose_val.json"
    if not path.is_file():
        pytest.skip(f"{path} not present (it sits beside the repository in CI)")
    return path


@pytest.fixture(scope="session")
def synthetic_crowd(tmp_path_factory) -> tuple[Path, Path]:
    """8 synthetic 256x256 CrowdPose-layout images: (images dir, annotation json)."""

    root = tmp_path_factory.mktemp("synthetic")
    ann = generate_synthetic_crowd(root, num_images=8, image_size=256, min_people=2,
                                   max_people=5, overlap=0.5, layout="crowdpose", seed=0)
    return root / "images", Path(ann)


def _with_orientation(jpeg: bytes, orientation: int) -> bytes:
    """The JPEG with an EXIF APP1 segment holding only the Orientation tag (0x0112)."""
    ifd = struct.pack(">HHHIHH", 1, 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + ifd  # big-endian TIFF, IFD at offset 8
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


@pytest.fixture()
def rotated_photo(tmp_path) -> tuple[Path, np.ndarray]:
    """A 40 x 60 (h x w) upright picture stored sideways (60 x 40) with EXIF Orientation 6
    ("rotate 90 degrees clockwise to display"), as phones store photos; and the picture."""
    upright = np.zeros((40, 60, 3), np.uint8)
    upright[:, :, 1] = np.linspace(0, 255, 60, dtype=np.uint8)[None]  # left dark, right bright
    upright[:15, :20] = (255, 40, 40)  # a red block in the top left corner
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # 90 degrees counter-clockwise
    jpeg = cv2.imencode(".jpg", cv2.cvtColor(stored, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, 98])[1].tobytes()
    path = tmp_path / "photo.jpg"
    path.write_bytes(_with_orientation(jpeg, 6))
    return path, upright
