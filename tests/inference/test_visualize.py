"""Drawing poses: pixels change where the skeleton is, and nowhere it is not."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from pinet_lightning.core.layouts import get_layout
from pinet_lightning.inference.visualize import draw_poses, make_grid, person_colors, save_image

LAYOUT = get_layout("crowdpose")


def _pose(points: dict[int, tuple[float, float]], score: float = 1.0) -> np.ndarray:
    """A (K, 3) pose with only the given keypoints present."""
    pose = np.zeros((LAYOUT.num_keypoints, 3))
    for k, (x, y) in points.items():
        pose[k] = (x, y, score)
    return pose


def _changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    return np.abs(after.astype(int) - before.astype(int)).sum(-1) > 0


def test_skeleton_pixels_change_only_near_the_pose():
    image = np.zeros((120, 160, 3), np.uint8)
    # left shoulder (0) -> left elbow (2) is a skeleton edge: a horizontal limb at y = 60
    pose = _pose({0: (30.0, 60.0), 2: (130.0, 60.0)})
    out = draw_poses(image, pose[None], LAYOUT, thickness=2, radius=3)
    changed = _changed(image, out)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert image.max() == 0  # the input is not modified
    # along the limb, between the dots
    assert changed[60, 50:110].all()
    # far from it: untouched
    assert not changed[:45].any() and not changed[76:].any()
    assert not changed[:, :20].any() and not changed[:, 141:].any()
    # the dots have a white center
    assert (out[60, 30] > 200).all() and (out[60, 130] > 200).all()


def test_edges_need_both_ends_above_threshold():
    image = np.zeros((100, 100, 3), np.uint8)
    pose = _pose({0: (20.0, 50.0), 2: (80.0, 50.0)})
    pose[2, 2] = 0.1  # the elbow scores under the threshold: no limb, no elbow dot
    out = draw_poses(image, pose[None], LAYOUT, threshold=0.2, thickness=2, radius=3)
    changed = _changed(image, out)
    assert changed[50, 17:24].any()  # the shoulder dot
    assert not changed[:, 40:].any()  # neither the limb nor the elbow


def test_pose_score_filter_and_colors():
    image = np.full((100, 100, 3), 30, np.uint8)
    good = _pose({0: (20.0, 30.0), 2: (80.0, 30.0)})
    bad = _pose({0: (20.0, 70.0), 2: (80.0, 70.0)})
    out = draw_poses(image, np.stack([good, bad]), LAYOUT, scores=[0.9, 0.05], min_score=0.1,
                     thickness=3)
    changed = _changed(image, out)
    assert changed[30, 40:60].all()
    assert not changed[60:].any()  # the low-scoring pose is skipped
    colors = person_colors(5)
    assert colors.shape == (5, 3) and len({tuple(c) for c in colors}) == 5
    # the limb is drawn in the first person's colour
    assert np.abs(out[30, 50].astype(int) - colors[0].astype(int)).max() <= 2


def test_accepts_torch_chw_float_and_empty_poses():
    image = torch.zeros(3, 64, 64)
    out = draw_poses(image, torch.zeros(0, LAYOUT.num_keypoints, 3), LAYOUT)
    assert out.shape == (64, 64, 3) and out.max() == 0
    pose = torch.from_numpy(_pose({12: (10.0, 10.0), 13: (50.0, 50.0)})).float()[None]
    out = draw_poses(image, pose, "crowdpose", scores=torch.tensor([1.0]))
    assert _changed(np.zeros((64, 64, 3), np.uint8), out)[30, 30]  # head-neck edge


def test_bad_input_names_the_problem():
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match=r"poses must be \(F, 14, 3\)"):
        draw_poses(image, np.zeros((1, 17, 3)), LAYOUT)
    with pytest.raises(ValueError, match="2 poses but 1 scores"):
        draw_poses(image, np.zeros((2, 14, 3)), LAYOUT, scores=[1.0])
    with pytest.raises(ValueError, match="image"):
        draw_poses(np.zeros((32, 32, 5)), np.zeros((1, 14, 3)), LAYOUT)


def test_grid_and_save(tmp_path):
    tiles = [np.full((40, 80, 3), 255 * (i % 2), np.uint8) for i in range(3)]
    grid = make_grid(tiles, columns=2, cell_size=50, pad=2, background=128)
    assert grid.shape == (2 * 50 + 3 * 2, 2 * 50 + 3 * 2, 3)
    # tile 0 (black) then tile 1 (white) on the first row, letterboxed: 80x40 -> 50x25
    assert (grid[2 + 25, 2 + 25] == 0).all() and (grid[2 + 25, 54 + 25] == 255).all()
    assert (grid[2 + 5, 2 + 25] == 128).all()  # above tile 0: background
    path = save_image(tmp_path / "sub" / "grid.png", grid)

    back = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert np.array_equal(back, grid)
    with pytest.raises(ValueError, match="at least one image"):
        make_grid([])
