"""Who counts as a person (algorithm.md 2.0, the published rule), on hand-made annotations:
a crowd region is a person only when its stored num_keypoints is above 0; a file without
num_keypoints counts the v flags."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_datasets import CODEC_64, IDENTITY, K, _person, _write

from pinet_lightning.core.people import is_crowd, is_person, labelled_keypoints, num_keypoints
from pinet_lightning.data.datasets import CocoKeypointDataset

HEAD, NECK = 12, 13  # CrowdPose


def _crowd_region(ann_id: int, joints: dict[int, tuple[float, float]], stored: int | None):
    """A CrowdPose-style crowd region with the given joints labelled; ``stored``: its
    num_keypoints field (CrowdPose's counts the 12 body joints only), None: no field."""
    kp = np.zeros((K, 3))
    for k, (x, y) in joints.items():
        kp[k] = [x, y, 2]
    ann = {"id": ann_id, "image_id": 1, "category_id": 1, "iscrowd": 1,
           "keypoints": kp.reshape(-1).tolist(), "bbox": [0.0, 0.0, 60.0, 60.0]}
    if stored is not None:
        ann["num_keypoints"] = stored
    return ann


def _people_of(tmp_path, anns) -> np.ndarray:
    img_dir, ann = _write(tmp_path, anns)
    ds = CocoKeypointDataset(img_dir, ann, codec=CODEC_64, train=True, augmentation=IDENTITY)
    return ds.people(ds.load(0)[2], 64, 64)[0]


def test_crowd_region_with_only_head_and_neck_is_not_a_person(tmp_path):
    # CrowdPose stores num_keypoints 0 for it (head and neck are not counted), so the
    # published dataset drops it; its v flags say 2
    crowd = _crowd_region(2, {HEAD: (40.0, 30.0), NECK: (40.0, 36.0)}, stored=0)
    assert labelled_keypoints(crowd) == 2 and not is_person(crowd)
    kps = _people_of(tmp_path, [_person(4, 4), crowd])
    assert len(kps) == 1 and kps[0, HEAD, 2] == 2 and kps[0, HEAD, 0] == 4 + HEAD


def test_crowd_region_with_body_joints_is_a_person(tmp_path):
    crowd = _crowd_region(2, {0: (30.0, 30.0), 1: (40.0, 30.0), HEAD: (35.0, 20.0)}, stored=2)
    assert is_person(crowd)
    kps = _people_of(tmp_path, [_person(4, 4), crowd])
    assert len(kps) == 2 and kps[1, 0].tolist() == [30.0, 30.0, 2.0]


def test_stored_num_keypoints_decides_not_the_flags():
    # a crowd region whose file says 3 with no flag set is a person (the published rule reads
    # the field), a non-crowd annotation is one whatever it holds
    assert is_person(_crowd_region(2, {}, stored=3))
    assert not is_person(_crowd_region(2, {0: (1.0, 1.0)}, stored=0))
    assert is_person({"iscrowd": 0, "num_keypoints": 0, "keypoints": [0] * 3 * K})
    assert is_person({"keypoints": [0] * 3 * K})  # no iscrowd field: not a crowd region
    assert not is_crowd({"iscrowd": 0}) and is_crowd({"iscrowd": 1}) and not is_crowd({})


@pytest.mark.parametrize(("joints", "expected"), [({HEAD: (40.0, 30.0), NECK: (40.0, 36.0)}, 2),
                                                  ({}, 1)])
def test_custom_file_without_num_keypoints_counts_the_flags(tmp_path, joints, expected):
    # no num_keypoints field: the labelled keypoints (v > 0) count, so head and neck make a
    # crowd region a person; a crowd region with nothing labelled is not one
    crowd = _crowd_region(2, joints, stored=None)
    person = _person(4, 4)
    del person["num_keypoints"]
    assert num_keypoints(crowd) == len(joints) and num_keypoints(person) == K
    kps = _people_of(tmp_path, [person, crowd])
    assert len(kps) == expected
    # the annotation check fills the field in the same way, so the dataset sees one value
    img_dir, ann = _write(tmp_path, [person, crowd])
    ds = CocoKeypointDataset(img_dir, ann, codec=CODEC_64, train=True, augmentation=IDENTITY)
    assert [a["num_keypoints"] for a in ds.load(0)[2]] == [K, len(joints)]
    assert "num_keypoints" not in json.loads(ann.read_text())["annotations"][1]


def test_labelled_keypoints_counts_the_flags():
    assert labelled_keypoints({"keypoints": [1, 2, 1, 3, 4, 2, 5, 6, 0, 7, 8, 1]}) == 3
    assert labelled_keypoints({"keypoints": [0, 0, 1, 0, 0, 0, 0, 0, 2, 0, 0, 0]}) == 2
    assert labelled_keypoints({"keypoints": None}) == 0 and labelled_keypoints({}) == 0
