"""Deterministic synthetic crowds: articulated stick-and-blob people that overlap and occlude
each other on cluttered backgrounds, written as a COCO keypoint dataset.

The body model knows a superset of joint names (CrowdPose's head/neck and COCO's face points);
a layout picks its keypoints from it by name, so ``crowdpose``, ``coco`` and ``ochuman`` (and any
layout whose names are a subset of :data:`BODY_JOINTS`) come from the same people.

Visibility flags follow COCO: 2 visible, 1 occluded by a nearer person (the joint's pixel belongs
to someone drawn later), 0 outside the image (or a face point of a person seen from the back);
absent keypoints are written as ``(0, 0, 0)`` like COCO does.

``crowdIndex`` follows CrowdPose (Li et al., CVPR 2019): for each person i with labelled
keypoints, N_b(i) / N_a(i) where N_a(i) is the number of i's labelled keypoints and N_b(i) the
number of labelled keypoints of *other* people inside i's box; averaged over the image's people
and clipped to [0, 1] (CrowdPose's easy / medium / hard split uses 0.1 and 0.8).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pinet_lightning.core.layouts import Layout, get_layout

__all__ = [
    "BODY_JOINTS",
    "sample_people",
    "render_people",
    "keypoint_visibility",
    "crowd_index",
    "generate_synthetic_crowd",
]

BODY_JOINTS: tuple[str, ...] = (
    "head", "neck", "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)
_J = {name: i for i, name in enumerate(BODY_JOINTS)}
_FACE = [_J[n] for n in ("nose", "left_eye", "right_eye")]  # hidden when seen from the back

# Body proportions, in units of the person's height (head top to ankles is about 0.93).
_TORSO, _NECK, _HEAD_R = 0.30, 0.085, 0.055
_UPPER_ARM, _FOREARM, _THIGH, _SHIN = 0.17, 0.15, 0.23, 0.23
_SHOULDER_HALF, _HIP_HALF = 0.10, 0.065


def _rot(angle: np.ndarray) -> np.ndarray:
    """(N, 2, 2) rotation matrices (image coordinates, y down)."""
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def _apply(rot: np.ndarray, vec: np.ndarray) -> np.ndarray:
    return np.einsum("nij,nj->ni", rot, vec)


def _body_pose(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random plausible poses in the body frame: (n, J, 2), pelvis at 0, unit height, x to the
    person's left, y down. Joint angles are drawn within anatomical limits."""
    deg = np.pi / 180.0
    lean = np.clip(rng.normal(0.0, 8.0, n), -20, 20) * deg
    head_tilt = lean + np.clip(rng.normal(0.0, 10.0, n), -25, 25) * deg
    width = rng.uniform(0.8, 1.15, n)
    torso, head = _rot(lean), _rot(head_tilt)
    zeros = np.zeros(n)
    j = np.zeros((n, len(BODY_JOINTS), 2))

    def vec(x, y) -> np.ndarray:
        return np.stack([np.broadcast_to(x, (n,)), np.broadcast_to(y, (n,))], -1)

    neck = _apply(torso, vec(zeros, -_TORSO))
    j[:, _J["neck"]] = neck
    center = neck + _apply(head, vec(zeros, -_NECK))
    # face points sit inside the head disc so that they are covered exactly when it is
    j[:, _J["head"]] = center + _apply(head, vec(zeros, -0.9 * _HEAD_R))
    j[:, _J["nose"]] = center + _apply(head, vec(zeros, 0.2 * _HEAD_R))
    for side, sign in (("left", 1.0), ("right", -1.0)):
        j[:, _J[f"{side}_eye"]] = center + _apply(head, vec(sign * 0.35 * _HEAD_R, -0.2 * _HEAD_R))
        j[:, _J[f"{side}_ear"]] = center + _apply(head, vec(sign * 0.85 * _HEAD_R, 0.0))
        shoulder = neck + _apply(torso, vec(sign * _SHOULDER_HALF * width, 0.03))
        hip = _apply(torso, vec(sign * _HIP_HALF * width, 0.0))
        # arm: abduction from hanging (0) to raised (150 deg), elbow flexion 0..135 deg
        abduct = rng.uniform(-10, 150, n) * deg
        upper = _apply(torso, vec(sign * np.sin(abduct), np.cos(abduct)))
        flex = rng.uniform(0, 135, n) * deg * rng.choice([-1.0, 1.0], n)
        elbow = shoulder + _UPPER_ARM * upper
        wrist = elbow + _FOREARM * _apply(_rot(flex), upper)
        # leg: abduction -10..35 deg, knee flexion 0..70 deg
        spread = rng.uniform(-10, 35, n) * deg
        thigh = _apply(_rot(0.3 * lean), vec(sign * np.sin(spread), np.cos(spread)))
        bend = rng.uniform(0, 70, n) * deg * rng.choice([-1.0, 1.0], n)
        knee = hip + _THIGH * thigh
        ankle = knee + _SHIN * _apply(_rot(bend), thigh)
        for name, value in (("shoulder", shoulder), ("hip", hip), ("elbow", elbow),
                            ("wrist", wrist), ("knee", knee), ("ankle", ankle)):
            j[:, _J[f"{side}_{name}"]] = value
    return j


def sample_people(
    rng: np.random.Generator, num_people: int, image_size: int, overlap: float = 0.5
) -> dict[str, np.ndarray]:
    """Sample a crowd, far to near: joints (N, J, 2) image pixels, height (N,), facing (N,)
    (+1 front, -1 back), colours (N, 3, 3) uint8 (shirt, trousers, skin).

    ``overlap`` in [0, 1]: 0 spreads people over the image, 1 stands them almost on top of each
    other (horizontal spread shrinks, depth rows close up).
    """
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must be in [0, 1], got {overlap}")
    n, s = int(num_people), float(image_size)
    depth = np.sort(rng.uniform(0.0, 1.0, n))  # drawing order: far (0) first
    base = s * rng.uniform(0.4, 0.65) * min(1.0, (3.0 / max(n, 1)) ** 0.4)  # more -> smaller
    height = base * (0.75 + 0.5 * depth) * rng.uniform(0.9, 1.1, n)
    spread = min(1.0 * s, n * 0.3 * base * (3.0 - 2.8 * overlap))
    slots = (rng.permutation(n) + rng.uniform(0.2, 0.8, n)) / max(n, 1) - 0.5
    cx = s * (0.5 + rng.uniform(-0.08, 0.08)) + spread * slots
    cy = s * 0.5 + (depth - 0.5) * s * 0.4 * (1.0 - 0.7 * overlap) + rng.normal(0, 0.03 * s, n)
    facing = np.where(rng.uniform(size=n) < 0.75, 1.0, -1.0)
    body = _body_pose(rng, n)
    body[..., 0] *= facing[:, None]  # seen from the back, the person's left is image left
    joints = body * height[:, None, None] + np.stack([cx, cy], -1)[:, None, :]
    colours = rng.integers(20, 236, (n, 3, 3)).astype(np.uint8)
    skin = np.array([[224, 172, 105], [198, 134, 66], [141, 85, 36], [241, 194, 125]])
    colours[:, 2] = skin[rng.integers(0, len(skin), n)] + rng.integers(-15, 16, (n, 3))
    return {"joints": joints, "height": height, "facing": facing, "colours": colours}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random colour field, noise and clutter shapes (some limb-like bars)."""
    field = rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)
    img = cv2.resize(field, (size, size), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(6, 16))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        p = rng.integers(0, size, 4)
        if kind == 0:
            cv2.rectangle(img, (int(p[0]), int(p[1])), (int(p[2]), int(p[3])), colour, -1)
        elif kind == 1:
            cv2.circle(img, (int(p[0]), int(p[1])), int(rng.integers(size // 40, size // 8) + 1),
                       colour, -1, cv2.LINE_AA)
        else:
            cv2.line(img, (int(p[0]), int(p[1])), (int(p[2]), int(p[3])), colour,
                     int(rng.integers(2, max(3, size // 30))), cv2.LINE_AA)
    noise = rng.integers(-12, 13, img.shape, dtype=np.int16)
    return np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)


_LIMBS = [  # (joint a, joint b, colour index, thickness / height); drawn in this order
    ("left_hip", "left_knee", 1, 0.06), ("left_knee", "left_ankle", 1, 0.055),
    ("right_hip", "right_knee", 1, 0.06), ("right_knee", "right_ankle", 1, 0.055),
    ("neck", "head", 2, 0.04),
    ("left_shoulder", "left_elbow", 0, 0.045), ("left_elbow", "left_wrist", 2, 0.04),
    ("right_shoulder", "right_elbow", 0, 0.045), ("right_elbow", "right_wrist", 2, 0.04),
]
_SHIFT = 2  # cv2 fixed-point bits: sub-pixel drawing
_SCALE = 1 << _SHIFT


def _draw_person(canvas: np.ndarray, joints: np.ndarray, height: float, facing: float,
                 colours: np.ndarray, mask_value: int | None = None) -> None:
    """Draw one person onto ``canvas`` (an RGB image, or an id map when ``mask_value``)."""
    pts = np.round(joints * _SCALE).astype(np.int32)
    aa = cv2.LINE_8 if mask_value is not None else cv2.LINE_AA

    def colour(i: int, shade: float = 1.0):
        if mask_value is not None:
            return int(mask_value)
        return tuple(int(c * shade) for c in colours[i])

    def p(name: str) -> tuple[int, int]:
        return int(pts[_J[name], 0]), int(pts[_J[name], 1])

    for a, b, ci, t in _LIMBS[:4]:
        cv2.line(canvas, p(a), p(b), colour(ci), max(1, int(t * height)), aa, _SHIFT)
    torso = np.stack([pts[_J[n]] for n in ("left_shoulder", "right_shoulder",
                                            "right_hip", "left_hip")])
    cv2.fillConvexPoly(canvas, torso, colour(0), aa, _SHIFT)
    cv2.polylines(canvas, [torso], True, colour(0), max(1, int(0.04 * height)), aa, _SHIFT)
    for a, b, ci, t in _LIMBS[4:]:
        cv2.line(canvas, p(a), p(b), colour(ci), max(1, int(t * height)), aa, _SHIFT)
    for name in ("left_elbow", "right_elbow", "left_knee", "right_knee"):  # joint marks
        ci = 0 if "elbow" in name else 1
        cv2.circle(canvas, p(name), int(0.025 * height * _SCALE), colour(ci, 0.6), -1, aa, _SHIFT)
    center = (joints[_J["head"]] + joints[_J["nose"]]) / 2.0
    c = (int(round(center[0] * _SCALE)), int(round(center[1] * _SCALE)))
    cv2.circle(canvas, c, int(_HEAD_R * height * _SCALE), colour(2), -1, aa, _SHIFT)
    if mask_value is None:
        if facing > 0:  # eyes and nose tell front from back
            for name in ("left_eye", "right_eye"):
                cv2.circle(canvas, p(name), max(_SCALE, int(0.01 * height * _SCALE)),
                           (20, 20, 20), -1, aa, _SHIFT)
            cv2.circle(canvas, p("nose"), max(_SCALE, int(0.008 * height * _SCALE)),
                       colour(2, 0.7), -1, aa, _SHIFT)
        else:  # hair on the back of the head
            r = int(0.8 * _HEAD_R * height * _SCALE)
            cv2.circle(canvas, c, r, colour(2, 0.35), -1, aa, _SHIFT)


def render_people(
    background: np.ndarray, people: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw people far to near onto a copy of ``background`` (H, W, 3) RGB.

    Returns the image, an id map (H, W) int16 holding 1 + the index of the nearest person at
    each pixel (0 background) and each person's unoccluded silhouette area in pixels (N,).
    """
    image = background.copy()
    h, w = image.shape[:2]
    id_map = np.zeros((h, w), np.int16)
    scratch = np.zeros((h, w), np.uint8)
    joints, heights = people["joints"], people["height"]
    areas = np.zeros(len(joints))
    for n in range(len(joints)):
        _draw_person(image, joints[n], heights[n], people["facing"][n], people["colours"][n])
        scratch[:] = 0
        _draw_person(scratch, joints[n], heights[n], 1.0, people["colours"][n], mask_value=1)
        silhouette = scratch.astype(bool)
        areas[n] = silhouette.sum()
        id_map[silhouette] = n + 1
    return image, id_map, areas


def keypoint_visibility(joints: np.ndarray, id_map: np.ndarray) -> np.ndarray:
    """COCO flags for joints (N, J, 2) of people drawn in index order onto ``id_map``:
    0 outside the image, 1 when a later (nearer) person owns the joint's pixel, else 2."""
    h, w = id_map.shape
    xy = np.round(joints).astype(np.int64)
    inside = (xy[..., 0] >= 0) & (xy[..., 0] < w) & (xy[..., 1] >= 0) & (xy[..., 1] < h)
    owner = id_map[np.clip(xy[..., 1], 0, h - 1), np.clip(xy[..., 0], 0, w - 1)]
    rank = np.arange(1, len(joints) + 1)[:, None]
    v = np.where(owner > rank, 1, 2)
    return np.where(inside, v, 0).astype(np.int64)


def crowd_index(keypoints: np.ndarray, boxes: np.ndarray) -> float:
    """CrowdPose crowd index of one image: keypoints (N, K, 3), boxes (N, 4) xywh. For each
    person with labelled keypoints, (labelled keypoints of others inside its box) / (its own
    labelled keypoints); the mean over those people, clipped to [0, 1]."""
    if len(keypoints) < 2:
        return 0.0
    labelled = keypoints[..., 2] > 0  # (N, K)
    x, y = keypoints[..., 0], keypoints[..., 1]
    x0, y0 = boxes[:, 0, None, None], boxes[:, 1, None, None]
    x1, y1 = x0 + boxes[:, 2, None, None], y0 + boxes[:, 3, None, None]
    # inside[i, j, k]: keypoint k of person j lies in person i's box
    inside = (x[None] >= x0) & (x[None] <= x1) & (y[None] >= y0) & (y[None] <= y1)
    inside &= labelled[None]
    n = len(keypoints)
    others = (inside & ~np.eye(n, dtype=bool)[..., None]).sum(axis=(1, 2))
    own = labelled.sum(1)
    ok = own > 0
    if not ok.any():
        return 0.0
    return float(np.clip(np.mean(others[ok] / own[ok]), 0.0, 1.0))


def _person_boxes(joints: np.ndarray, heights: np.ndarray, size: int) -> np.ndarray:
    """xywh boxes around the drawn person (joints padded by limb and head size), clipped."""
    pad = (0.06 * heights)[:, None]
    lo = np.clip(joints.min(1) - pad, 0, size - 1)
    hi = np.clip(joints.max(1) + pad, 0, size - 1)
    return np.concatenate([lo, hi - lo], 1)


def _check_layout(layout: Layout) -> list[int]:
    missing = [n for n in layout.names if n not in _J]
    if missing:
        raise ValueError(
            f"synthetic crowds cannot produce keypoints {missing} of layout '{layout.name}'; "
            f"use a layout whose names are among {list(BODY_JOINTS)} (crowdpose, coco, ochuman)"
        )
    return [_J[n] for n in layout.names]


def generate_synthetic_crowd(
    out_dir: str | Path,
    num_images: int = 200,
    image_size: int = 512,
    min_people: int = 2,
    max_people: int = 8,
    overlap: float = 0.5,
    layout: str | Mapping[str, Any] | Layout = "crowdpose",
    seed: int = 0,
) -> Path:
    """Write ``out_dir/images/*.jpg`` and ``out_dir/annotations.json`` (COCO keypoints with a
    CrowdPose ``crowdIndex`` per image) and return the json path. Same arguments, same bytes:
    image i draws from ``np.random.default_rng([seed, i])``."""
    lay = get_layout(layout)
    order = _check_layout(lay)
    if num_images < 1 or image_size < 32:
        raise ValueError("need num_images >= 1 and image_size >= 32")
    if not 1 <= min_people <= max_people:
        raise ValueError(f"need 1 <= min_people <= max_people, got {min_people}, {max_people}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng([int(seed), i])
        n = int(rng.integers(min_people, max_people + 1))
        people = sample_people(rng, n, image_size, overlap)
        image, id_map, areas = render_people(_background(rng, image_size), people)
        vis = keypoint_visibility(people["joints"], id_map)
        vis[np.ix_(people["facing"] < 0, _FACE)] = 0  # face points unlabelled from the back
        kps = np.concatenate([people["joints"], vis[..., None]], -1)[:, order]
        kps[kps[..., 2] == 0] = 0.0
        boxes = _person_boxes(people["joints"], people["height"], image_size)
        name = f"{i:06d}.jpg"
        cv2.imwrite(str(out / "images" / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 92])
        keep = (kps[..., 2] > 0).sum(1) > 0
        images.append({"id": i + 1, "file_name": name, "height": image_size,
                       "width": image_size,
                       "crowdIndex": round(crowd_index(kps[keep], boxes[keep]), 4)})
        for p in np.flatnonzero(keep):
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                "keypoints": [round(float(v), 2) for v in kps[p].reshape(-1)],
                "num_keypoints": int((kps[p, :, 2] > 0).sum()),
                "bbox": [round(float(v), 2) for v in boxes[p]],
                "area": float(areas[p]),
            })
    categories = [{
        "id": 1, "name": "person", "supercategory": "person", "keypoints": list(lay.names),
        "skeleton": [[a + 1, b + 1] for a, b in lay.skeleton],
    }]
    info = {"description": f"pinet-lightning synthetic crowd (layout {lay.name}, seed {seed})"}
    ann_path = out / "annotations.json"
    ann_path.write_text(json.dumps({"info": info, "images": images, "annotations": annotations,
                                    "categories": categories}))
    return ann_path
