"""Shared fixtures: the real CrowdPose annotations (skipped where absent) and a tiny
synthetic crowd generated once per test session."""

from __future__ import annotations

import os
from pathlib import Path

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
