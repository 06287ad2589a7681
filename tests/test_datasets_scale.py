"""Training samples under a non-identity augmentation scale, and the ignore mask's
half-a-cell rule, by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_datasets import IDENTITY, K, _person, _write

from pinet_lightning.datasets import CocoKeypointDataset


def _weights(sample: dict) -> set[float]:
    """The distinct offset weights of a sample (dense maps or Omega entries)."""
    w = sample["offset_weights"] if "offset_weights" in sample else sample["omega_weights"]
    w = torch.as_tensor(w)
    return {round(float(v), 6) for v in w[w > 0].unique()}


@pytest.mark.parametrize(("crop", "magnification"), [(2.0, 0.5), (0.5, 2.0), (1.0, 1.0)])
def test_offset_weights_use_the_area_after_the_augmentation(tmp_path, crop, magnification):
    """Box 14 x 14 = 196 input pixels at magnification 1; the weights are
    1 / sqrt(196 m^2) = 1 / (14 m)."""
    img_dir, ann = _write(tmp_path, [_person(20, 20)])
    aug = {**IDENTITY, "min_scale": crop, "max_scale": crop}
    ds = CocoKeypointDataset(img_dir, ann, train=True, input_size=64, augmentation=aug)
    assert _weights(ds[0]) == {round(1 / (14 * magnification), 6)}


def test_a_cell_half_ignored_is_ignored(tmp_path):
    """Output cell (i, j) covers input pixels 4i .. 4i + 3: crowd boxes ignoring 2, 1 and 3
    of its 4 columns leave the cell ignored, kept and ignored (kept only when more than half
    of it is kept, the published rule)."""
    def crowd(ann_id, x, w):
        return {"id": ann_id, "image_id": 1, "category_id": 1, "iscrowd": 1,
                "keypoints": [0] * (3 * K), "num_keypoints": 0, "bbox": [x, x, w, 4]}

    img_dir, ann = _write(tmp_path, [_person(20, 20), crowd(2, 8, 2), crowd(3, 24, 1),
                                     crowd(4, 40, 3)])
    ds = CocoKeypointDataset(img_dir, ann, train=True, input_size=64, augmentation=IDENTITY,
                             ignore_regions=True)
    mask = ds[0]["heatmap_mask"]
    assert torch.all(mask[:, 2, 2] == 0)  # half ignored
    assert torch.all(mask[:, 6, 6] > 0)  # a quarter ignored
    assert torch.all(mask[:, 10, 10] == 0)  # three quarters ignored
    assert torch.all(ds[0]["part_mask"][:, 2, 2] == 0)
    assert np.count_nonzero(mask[0].numpy() == 0) == 2
