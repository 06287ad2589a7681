"""Training samples under a non-identity augmentation scale, the ignore mask's half-a-cell
rule, who counts as a person, the reseeding of the augmentation and the eval resize, by
hand."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from test_datasets import CODEC_64, IDENTITY, K, _person, _write

from pinet_lightning.codec.codec import PINetCodec
from pinet_lightning.data.datasets import CocoKeypointDataset


def _weights(sample: dict) -> set[float]:
    """The distinct offset weights of a sample (dense maps or Omega entries)."""
    w = sample["offset_weights"] if "offset_weights" in sample else sample["omega_weights"]
    w = torch.as_tensor(w)
    return {round(float(v), 6) for v in w[w > 0].unique()}


@pytest.mark.parametrize(("crop", "magnification"), [(2.0, 0.5), (0.5, 2.0), (1.0, 1.0)])
def test_offset_weights_use_the_area_after_the_augmentation(tmp_path, crop, magnification):
    """Box 14 x 14 = 196 input pixels at magnification 1; the weights are
    1 / sqrt(196 m^2) = 1 / (14 m)."""
    person = _person(20, 20)
    person["bbox"] = [20, 20, 14, 21]  # not square: w * h, not h * h
    img_dir, ann = _write(tmp_path, [person])
    aug = {**IDENTITY, "min_scale": crop, "max_scale": crop}
    ds = CocoKeypointDataset(img_dir, ann, codec=CODEC_64, train=True,
                             augmentation=aug)
    assert _weights(ds[0]) == {round(1 / (np.sqrt(14 * 21) * magnification), 6)}


def test_a_cell_half_ignored_is_ignored(tmp_path):
    """Output cell (i, j) covers input pixels 4i .. 4i + 3: crowd boxes ignoring 2, 1 and 3
    of its 4 columns leave the cell ignored, kept and ignored (kept only when more than half
    of it is kept, the published rule)."""
    def crowd(ann_id, x, w, y=None):
        return {"id": ann_id, "image_id": 1, "category_id": 1, "iscrowd": 1,
                "keypoints": [0] * (3 * K), "num_keypoints": 0,
                "bbox": [x, x if y is None else y, w, 4]}

    # cell (14, 6): its outer columns 56 and 59 ignored, the middle two kept (an average,
    # not a sample between the middle pixels)
    img_dir, ann = _write(tmp_path, [_person(20, 20), crowd(2, 8, 2), crowd(3, 24, 1),
                                     crowd(4, 40, 3), crowd(5, 56, 1, 24), crowd(6, 59, 1, 24)])
    ds = CocoKeypointDataset(img_dir, ann, codec=CODEC_64, train=True,
                             augmentation=IDENTITY, ignore_regions=True)
    mask = ds[0]["heatmap_mask"]
    assert torch.all(mask[:, 2, 2] == 0)  # half ignored
    assert torch.all(mask[:, 6, 6] > 0)  # a quarter ignored
    assert torch.all(mask[:, 10, 10] == 0)  # three quarters ignored
    assert torch.all(mask[:, 6, 14] == 0)  # half ignored, in two pieces
    assert torch.all(ds[0]["part_mask"][:, 2, 2] == 0)
    assert np.count_nonzero(mask[0].numpy() == 0) == 3


def test_who_is_a_person_and_what_the_mask_ignores(tmp_path):
    """Not a crowd region, or a crowd annotation whose num_keypoints is above 0; the mask
    ignores crowd regions (people or not) and annotations with num_keypoints 0."""
    no_flag = _person(4, 4, ann_id=2)
    del no_flag["iscrowd"]  # no flag: not a crowd
    labelled_crowd = dict(_person(30, 30, ann_id=3), iscrowd=1, bbox=[30, 30, 8, 8])
    labelled_crowd["keypoints"] = [0.0] * (3 * K)
    labelled_crowd["keypoints"][:3] = [33.0, 33.0, 2]  # one labelled keypoint
    unlabelled = dict(_person(50, 40, ann_id=4), keypoints=[0.0] * (3 * K), num_keypoints=0)
    del unlabelled["iscrowd"]  # no flag and nothing labelled: still a person (not a crowd)
    img_dir, ann = _write(tmp_path, [_person(40, 4), no_flag, labelled_crowd, unlabelled])
    ds = CocoKeypointDataset(img_dir, ann, codec=CODEC_64, train=True,
                             augmentation=IDENTITY, ignore_regions=True)
    anns = ds.load(0)[2]
    kps, boxes, mask = ds.people(anns, 64, 64)
    assert len(kps) == 4  # all four are people
    assert mask[32, 32] == 0 and mask[5, 5] == 1 and mask[5, 41] == 1
    assert mask[41, 51] == 0  # the one with num_keypoints 0 (its box)


def test_augmentation_reseeded_from_torch_per_worker(tmp_path):
    img_dir, ann = _write(tmp_path, [_person(20, 20)])
    def make() -> CocoKeypointDataset:
        return CocoKeypointDataset(img_dir, ann, codec=CODEC_64,
                                   train=True)

    torch.manual_seed(5)
    first = make()
    a, b = first[0]["image"], first[0]["image"]
    torch.manual_seed(5)
    again = make()[0]["image"]
    assert torch.equal(a, again)  # the same torch seed: the same augmentation
    assert not torch.equal(a, b)  # the generator goes on between samples


def test_eval_samples_and_settings(tmp_path, caplog):
    img_dir, ann = _write(tmp_path, [_person(5, 5)], images=[
        {"id": 1, "file_name": "a.jpg", "height": 64, "width": 96},
        {"id": 2, "file_name": "b.jpg", "height": 64, "width": 64}])
    ds = CocoKeypointDataset(img_dir, ann, codec=PINetCodec(input_size=96), train=False)
    sample = ds[0]
    assert sample["image"].shape == (3, 128, 192)  # short side 96 -> 96 x 144 -> multiples of 64
    by_32 = CocoKeypointDataset(img_dir, ann, codec=PINetCodec(input_size=96), train=False,
                                multiple=32)
    assert by_32[0]["image"].shape == (3, 96, 160)  # ... -> multiples of 32
    assert sample["image_id"] == 1 and sample["orig_size"] == (64, 96)
    published = CocoKeypointDataset(img_dir, ann, codec=PINetCodec(convention="published"),
                                    train=False)
    assert published.codec.convention == "published" and ds.codec.convention == "cell_center"
    with caplog.at_level(logging.INFO, logger="pinet_lightning.data.datasets"):
        CocoKeypointDataset(img_dir, ann, codec=CODEC_64, train=True)
        CocoKeypointDataset(img_dir, ann, codec=CODEC_64, train=True,
                            min_image_keypoints=20)
    assert "ann.json: training on 1 images, skipped 1 without annotations" in caplog.text
    assert ("ann.json: training on 0 images, skipped 2 with 20 labelled keypoints or fewer"
            in caplog.text)
    with pytest.raises(FileNotFoundError, match=r"does not exist; check the dataset root "
                                                r"\(paths.data_dir .*conf/data/<dataset>.yaml "
                                                r"shows where the official release keeps each "
                                                r"file$"):
        CocoKeypointDataset(img_dir, tmp_path / "none.json")
    with pytest.raises(ValueError, match="codec.input_size=66 must be a positive multiple of "
                                         "32.*use codec.input_size=64 or 96"):
        CocoKeypointDataset(img_dir, ann, codec=PINetCodec(input_size=66, sparse=False))
