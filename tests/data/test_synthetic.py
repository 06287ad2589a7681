"""Synthetic crowds: determinism, COCO validity, occlusion flags, crowd index."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from pinet_lightning.core.layouts import get_layout
from pinet_lightning.data.synthetic import (
    BODY_JOINTS,
    crowd_index,
    generate_synthetic_crowd,
    keypoint_visibility,
    render_people,
    sample_people,
)


def _gen(path, **kw):
    args = {"num_images": 3, "image_size": 128, "min_people": 2, "max_people": 4, "seed": 0}
    args.update(kw)
    return generate_synthetic_crowd(path, **args)


def test_same_seed_same_files_other_seed_differs(tmp_path):
    a, b, c = _gen(tmp_path / "a"), _gen(tmp_path / "b"), _gen(tmp_path / "c", seed=1)
    assert a.read_text() == b.read_text()
    assert a.read_text() != c.read_text()
    for name in ("000000.jpg", "000002.jpg"):
        pa, pb, pc = ((p.parent / "images" / name).read_bytes() for p in (a, b, c))
        assert pa == pb
        assert pa != pc


@pytest.mark.parametrize("layout,k", [("crowdpose", 14), ("coco", 17)])
def test_json_is_valid_coco(tmp_path, layout, k):
    path = _gen(tmp_path, layout=layout)
    coco = COCO(str(path))
    lay = get_layout(layout)
    cat = coco.loadCats(1)[0]
    assert cat["keypoints"] == list(lay.names)
    assert cat["skeleton"] == [[a + 1, b + 1] for a, b in lay.skeleton]  # 1-based
    assert len(coco.getImgIds()) == 3
    for ann in coco.loadAnns(coco.getAnnIds()):
        kp = np.asarray(ann["keypoints"]).reshape(-1, 3)
        assert kp.shape == (k, 3)
        assert set(kp[:, 2].tolist()) <= {0, 1, 2}
        assert ann["num_keypoints"] == int((kp[:, 2] > 0).sum()) > 0
        assert np.all(kp[kp[:, 2] == 0] == 0)  # absent keypoints are (0, 0, 0) like COCO
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and 0 <= x and x + w <= 128 and y + h <= 128
        assert ann["iscrowd"] == 0 and ann["category_id"] == 1 and ann["area"] > 0
        lab = kp[kp[:, 2] > 0]
        assert np.all((lab[:, 0] >= x - 1) & (lab[:, 0] <= x + w + 1))
    for img in coco.loadImgs(coco.getImgIds()):
        assert 0.0 <= img["crowdIndex"] <= 1.0
        assert (tmp_path / "images" / img["file_name"]).is_file()


def test_unknown_joint_names_raise(tmp_path):
    layout = {"name": "odd", "names": ["tail", "nose"], "flip_index": [0, 1],
              "sigmas": [0.1, 0.1], "parts": [[0, 1]]}
    with pytest.raises(ValueError, match="tail"):
        _gen(tmp_path, layout=layout)


def _one_person(size=128):
    rng = np.random.default_rng(3)
    p = sample_people(rng, 1, size, overlap=0.5)
    p["joints"] = p["joints"] - p["joints"].mean(1, keepdims=True) + size / 2  # centred
    return p


def test_person_covered_by_nearer_copy_is_occluded():
    p = _one_person()
    two = {k: np.concatenate([v, v]) for k, v in p.items()}  # same shape, drawn twice
    image, id_map, areas = render_people(np.zeros((128, 128, 3), np.uint8), two)
    vis = keypoint_visibility(two["joints"], id_map)
    assert np.all(vis[0] == 1)  # the far copy is covered everywhere by the near one
    assert np.all(vis[1] == 2)
    assert areas[0] == areas[1] > 0
    assert set(np.unique(id_map).tolist()) == {0, 2}


def test_visibility_outside_and_not_covered():
    p = _one_person()
    moved = {k: np.concatenate([v, v]) for k, v in p.items()}
    moved["joints"] = moved["joints"].copy()
    moved["joints"][1] += np.array([500.0, 0.0])  # the near person stands outside the image
    _, id_map, _ = render_people(np.zeros((128, 128, 3), np.uint8), moved)
    vis = keypoint_visibility(moved["joints"], id_map)
    assert np.all(vis[1] == 0) and np.all(vis[0] == 2)


def test_visibility_by_id_map():
    id_map = np.zeros((10, 10), np.int16)
    id_map[:, 5:] = 2  # person index 1 (drawn second) owns the right half
    joints = np.array([[[2.0, 2.0], [7.0, 3.0], [12.0, 3.0]], [[7.0, 7.0], [1.0, 1.0], [-1, 0]]])
    vis = keypoint_visibility(joints, id_map)
    assert vis.tolist() == [[2, 1, 0], [2, 2, 0]]


def test_crowd_index_definition():
    kp = np.zeros((2, 2, 3))
    kp[0] = [[1, 1, 2], [3, 3, 2]]
    kp[1] = [[2, 2, 2], [9, 9, 1]]
    boxes = np.array([[0, 0, 4, 4], [8, 8, 2, 2]], float)
    # person 0: 1 foreign keypoint / 2 own; person 1: 0 / 2 -> mean 0.25
    assert crowd_index(kp, boxes) == pytest.approx(0.25)
    assert crowd_index(kp[:1], boxes[:1]) == 0.0


def test_crowd_index_grows_with_overlap(tmp_path):
    def mean_ci(overlap):
        path = _gen(tmp_path / str(overlap), num_images=16, image_size=96, min_people=3,
                    max_people=5, overlap=overlap)
        return np.mean([i["crowdIndex"] for i in json.loads(path.read_text())["images"]])

    low, high = mean_ci(0.0), mean_ci(1.0)
    assert 0.0 <= low < high <= 1.0
    assert high - low > 0.2


def test_body_model_names_cover_builtin_layouts():
    for name in ("crowdpose", "coco", "ochuman"):
        assert set(get_layout(name).names) <= set(BODY_JOINTS)
