"""Keypoint layouts (algorithm.md 1): built-in values and layouts from config mappings."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from pinet_lightning.core.layouts import Layout, available_layouts, get_layout, register_layout

# SPEC 1 sigmas, written x10
COCO_SIGMAS_X10 = [.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07,
                   .87, .87, .89, .89]
CROWDPOSE_SIGMAS_X10 = [.79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89, .79, .79]


def _edges(layout: Layout) -> set[frozenset[int]]:
    return {frozenset(e) for e in layout.skeleton}


def test_builtins_are_registered():
    assert {"coco", "crowdpose", "ochuman"} <= set(available_layouts())
    assert get_layout("COCO") is get_layout("coco")
    assert get_layout(get_layout("crowdpose")) is get_layout("crowdpose")


@pytest.mark.parametrize(
    ("name", "k", "flip", "sigmas_x10", "parts"),
    [
        ("coco", 17, [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15],
         COCO_SIGMAS_X10, [[0, 1, 2, 3, 4], [5, 6, 11, 12], [11, 12, 13, 14, 15, 16]]),
        ("ochuman", 17, [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15],
         COCO_SIGMAS_X10, [[0, 1, 2, 3, 4], [5, 6, 11, 12], [11, 12, 13, 14, 15, 16]]),
        ("crowdpose", 14, [1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 12, 13],
         CROWDPOSE_SIGMAS_X10, [[12, 13], [0, 1, 6, 7], [6, 7, 8, 9, 10, 11]]),
    ],
)
def test_builtin_values(name, k, flip, sigmas_x10, parts):
    layout = get_layout(name)
    assert layout.num_keypoints == k == len(layout.names) == len(set(layout.names))
    assert list(layout.flip_index) == flip
    np.testing.assert_allclose(layout.sigmas, np.asarray(sigmas_x10) / 10, rtol=0, atol=1e-12)
    assert [list(p) for p in layout.parts] == parts
    assert layout.num_parts == 3 and layout.part_names == ("head", "body", "legs")


@pytest.mark.parametrize("name", ["coco", "crowdpose", "ochuman"])
def test_flip_index_is_an_involution_that_swaps_left_and_right(name):
    layout = get_layout(name)
    flip = np.asarray(layout.flip_index)
    np.testing.assert_array_equal(flip[flip], np.arange(layout.num_keypoints))
    for i, j in enumerate(flip):
        a, b = layout.names[i], layout.names[j]
        if a.startswith("left_"):
            assert b == "right_" + a[5:]
        elif a.startswith("right_"):
            assert b == "left_" + a[6:]
        else:
            assert i == j
    # mirrored skeleton is the skeleton
    assert {frozenset((flip[a], flip[b])) for a, b in layout.skeleton} == _edges(layout)


def test_coco_skeleton():
    coco = get_layout("coco")
    names = {n: i for i, n in enumerate(coco.names)}
    edges = _edges(coco)
    assert len(coco.skeleton) == len(edges) == 17  # 5 face + 4 torso + 4 arms + 4 legs
    assert frozenset((names["nose"], names["left_shoulder"])) not in edges
    assert frozenset((names["nose"], names["right_shoulder"])) not in edges
    for a, b in [("nose", "left_eye"), ("left_eye", "right_eye"), ("right_eye", "right_ear"),
                 ("left_shoulder", "right_shoulder"), ("left_hip", "right_hip"),
                 ("left_shoulder", "left_hip"), ("right_elbow", "right_wrist"),
                 ("left_knee", "left_ankle")]:
        assert frozenset((names[a], names[b])) in edges, (a, b)
    assert get_layout("ochuman").skeleton == coco.skeleton


def test_crowdpose_skeleton():
    cp = get_layout("crowdpose")
    names = {n: i for i, n in enumerate(cp.names)}
    edges = _edges(cp)
    assert len(cp.skeleton) == len(edges) == 15  # head-neck, 2 neck-sh, sh-sh, 2 sh-hip,
    # hip-hip, 4 arms, 4 legs
    for a, b in [("head", "neck"), ("neck", "left_shoulder"), ("neck", "right_shoulder"),
                 ("left_shoulder", "right_shoulder"), ("right_shoulder", "right_hip"),
                 ("left_hip", "right_hip"), ("left_elbow", "left_wrist"),
                 ("right_hip", "right_knee")]:
        assert frozenset((names[a], names[b])) in edges, (a, b)
    assert frozenset((names["head"], names["left_shoulder"])) not in edges


def test_adjacency_is_symmetric_without_self_loops():
    for name in ("coco", "crowdpose"):
        layout = get_layout(name)
        adj = layout.adjacency()
        assert adj.shape == (layout.num_keypoints,) * 2
        np.testing.assert_array_equal(adj, adj.T)
        assert np.diag(adj).sum() == 0 and adj.sum() == 2 * len(layout.skeleton)
        assert set(np.unique(adj).tolist()) == {0.0, 1.0}


HAND = {
    "name": "hand3",
    "names": ["wrist", "left_tip", "right_tip"],
    "flip_index": [0, 2, 1],
    "sigmas": [0.05, 0.03, 0.03],
    "parts": {"palm": [0], "tips": [1, 2]},
    "skeleton": [[0, 1], [0, 2]],
}


def test_get_layout_from_mapping_and_roundtrip():
    layout = get_layout(HAND)
    assert layout.name == "hand3" and layout.num_keypoints == 3 and layout.num_parts == 2
    assert layout.part_names == ("palm", "tips") and layout.parts == ((0,), (1, 2))
    assert layout.sigmas == (0.05, 0.03, 0.03)
    assert get_layout(layout.to_dict()) == layout
    assert pickle.loads(pickle.dumps(layout)) == layout  # data loader workers
    # parts as a list of lists, names given separately; skeleton optional
    listed = {**HAND, "parts": [[0], [1, 2]], "part_names": ["palm", "tips"]}
    del listed["skeleton"]
    other = get_layout(listed)
    assert other.parts == layout.parts and other.part_names == layout.part_names
    assert other.skeleton == () and other.adjacency().sum() == 0
    # an OmegaConf node works like a dict (Hydra passes these)
    omegaconf = pytest.importorskip("omegaconf")
    assert get_layout(omegaconf.OmegaConf.create(HAND)) == layout


def test_register_layout():
    layout = get_layout({**HAND, "name": "hand3_registered"})
    register_layout(layout)
    assert get_layout("hand3_registered") is layout
    assert "hand3_registered" in available_layouts()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"flip_index": [0, 1, 1]}, "permutation"),
        ({"flip_index": [1, 2, 0]}, "own inverse"),
        ({"sigmas": [0.05, 0.03]}, "sigmas"),
        ({"sigmas": [0.05, 0.0, 0.03]}, "positive"),
        ({"parts": {}}, "at least one part"),
        ({"parts": {"palm": [0], "tips": [1, 3]}}, "indices in 0..2"),
        ({"parts": [[0]], "part_names": ["a", "b"]}, "names"),
        ({"skeleton": [[0, 5]]}, "skeleton edge"),
        ({"skeleton": [[1, 1]]}, "skeleton edge"),
    ],
)
def test_bad_mapping_errors(change, message):
    with pytest.raises(ValueError, match=message) as err:
        get_layout({**HAND, **change})
    assert "hand3" in str(err.value)  # the message names the layout


def test_missing_keys_unknown_name_and_wrong_type():
    with pytest.raises(ValueError, match=r"missing \['sigmas'\]"):
        get_layout({k: v for k, v in HAND.items() if k != "sigmas"})
    with pytest.raises(KeyError, match="unknown layout 'mpii'"):
        get_layout("mpii")
    with pytest.raises(TypeError, match="name, a mapping or a Layout"):
        get_layout(17)
