"""Keypoint layouts: names, flip order, OKS sigmas, body parts and skeleton.

A layout is data, not code (docs/algorithm.md, section 1): the built-in ones are plain
dictionaries and a new COCO-format dataset describes its own keypoints in a config file, passed to
:func:`get_layout` as a mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Layout", "get_layout", "register_layout", "available_layouts"]


@dataclass(frozen=True)
class Layout:
    """A frozen description of a keypoint layout.

    Attributes:
        name: short name (``coco``, ``crowdpose``, ...).
        names: keypoint names, in annotation order.
        flip_index: for each keypoint, the index of its mirror image.
        sigmas: OKS sigmas (already divided by 10, as COCO's evaluator uses them).
        parts: keypoint indices of each body part (PINet's part centers).
        part_names: a name per part.
        skeleton: keypoint index pairs, used for drawing and for the refinement graph.
    """

    name: str
    names: tuple[str, ...]
    flip_index: tuple[int, ...]
    sigmas: tuple[float, ...]
    parts: tuple[tuple[int, ...], ...]
    part_names: tuple[str, ...]
    skeleton: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        k = len(self.names)
        where = f"layout '{self.name}'"
        if len(self.flip_index) != k or sorted(self.flip_index) != list(range(k)):
            raise ValueError(f"{where}: flip_index must be a permutation of 0..{k - 1}")
        if any(self.flip_index[self.flip_index[i]] != i for i in range(k)):
            raise ValueError(f"{where}: flip_index must be its own inverse (a mirror pairing)")
        if len(self.sigmas) != k or any(s <= 0 for s in self.sigmas):
            raise ValueError(f"{where}: need {k} positive sigmas, got {len(self.sigmas)}")
        if not self.parts:
            raise ValueError(f"{where}: at least one part is needed")
        if len(self.part_names) != len(self.parts):
            raise ValueError(f"{where}: {len(self.parts)} parts but {len(self.part_names)} names")
        for part in self.parts:
            if not part or any(not 0 <= i < k for i in part):
                raise ValueError(f"{where}: part {list(part)} must hold indices in 0..{k - 1}")
        for a, b in self.skeleton:
            if not (0 <= a < k and 0 <= b < k) or a == b:
                raise ValueError(f"{where}: bad skeleton edge ({a}, {b})")

    @property
    def num_keypoints(self) -> int:
        return len(self.names)

    @property
    def num_parts(self) -> int:
        return len(self.parts)

    def adjacency(self) -> np.ndarray:
        """Symmetric (K, K) 0/1 adjacency of the skeleton, without self loops."""
        a = np.zeros((self.num_keypoints, self.num_keypoints), dtype=np.float32)
        if self.skeleton:
            e = np.asarray(self.skeleton)
            a[e[:, 0], e[:, 1]] = 1.0
            a[e[:, 1], e[:, 0]] = 1.0
        return a

    def to_dict(self) -> dict[str, Any]:
        """Plain-python form, the same shape a config file uses."""
        return {
            "name": self.name,
            "names": list(self.names),
            "flip_index": list(self.flip_index),
            "sigmas": list(self.sigmas),
            "parts": {n: list(p) for n, p in zip(self.part_names, self.parts, strict=True)},
            "skeleton": [list(e) for e in self.skeleton],
        }

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> Layout:
        """Build a layout from a mapping (a Hydra/OmegaConf node or a dict).

        ``parts`` may be a mapping ``{part name: [indices]}`` or a list of index lists;
        ``sigmas`` are the evaluator's sigmas (already /10).
        """
        missing = [key for key in ("names", "flip_index", "sigmas", "parts") if key not in spec]
        if missing:
            raise ValueError(f"layout spec is missing {missing}; see conf/layout/*.yaml")
        parts = spec["parts"]
        if isinstance(parts, Mapping):
            part_names = tuple(str(n) for n in parts.keys())
            part_lists = tuple(tuple(int(i) for i in p) for p in parts.values())
        else:
            part_lists = tuple(tuple(int(i) for i in p) for p in parts)
            part_names = tuple(spec.get("part_names", [f"part{i}" for i in range(len(part_lists))]))
        return cls(
            name=str(spec.get("name", "custom")),
            names=tuple(str(n) for n in spec["names"]),
            flip_index=tuple(int(i) for i in spec["flip_index"]),
            sigmas=tuple(float(s) for s in spec["sigmas"]),
            parts=part_lists,
            part_names=part_names,
            skeleton=tuple((int(a), int(b)) for a, b in spec.get("skeleton", [])),
        )


_COCO = {
    "name": "coco",
    "names": [
        "nose", "left_eye", "right_eye", "left_ear", "right_ear",
        "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
        "left_wrist", "right_wrist", "left_hip", "right_hip",
        "left_knee", "right_knee", "left_ankle", "right_ankle",
    ],
    "flip_index": [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15],
    "sigmas": [
        0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072,
        0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
    ],
    "parts": {"head": [0, 1, 2, 3, 4], "body": [5, 6, 11, 12], "legs": [11, 12, 13, 14, 15, 16]},
    "skeleton": [
        [0, 1], [0, 2], [1, 2], [1, 3], [2, 4],  # face: nose-eyes, eye-eye, eye-ears
        [5, 6], [11, 12], [5, 11], [6, 12],  # torso: shoulders, hips, shoulder-hip
        [5, 7], [7, 9], [6, 8], [8, 10],  # arms
        [11, 13], [13, 15], [12, 14], [14, 16],  # legs
    ],
}

_CROWDPOSE = {
    "name": "crowdpose",
    "names": [
        "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
        "left_wrist", "right_wrist", "left_hip", "right_hip",
        "left_knee", "right_knee", "left_ankle", "right_ankle", "head", "neck",
    ],
    "flip_index": [1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 12, 13],
    "sigmas": [
        0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107,
        0.087, 0.087, 0.089, 0.089, 0.079, 0.079,
    ],
    "parts": {"head": [12, 13], "body": [0, 1, 6, 7], "legs": [6, 7, 8, 9, 10, 11]},
    "skeleton": [
        [12, 13], [13, 0], [13, 1], [0, 1],  # head-neck, neck-shoulders, shoulder-shoulder
        [0, 6], [1, 7], [6, 7],  # shoulder-hip, hip-hip
        [0, 2], [2, 4], [1, 3], [3, 5],  # arms
        [6, 8], [8, 10], [7, 9], [9, 11],  # legs
    ],
}

# OCHuman annotates the 17 COCO keypoints.
_OCHUMAN = {**_COCO, "name": "ochuman"}

_REGISTRY: dict[str, Layout] = {}


def register_layout(layout: Layout) -> None:
    """Make a layout available to :func:`get_layout` by its name."""
    _REGISTRY[layout.name] = layout


for _spec in (_COCO, _CROWDPOSE, _OCHUMAN):
    register_layout(Layout.from_dict(_spec))


def available_layouts() -> list[str]:
    return sorted(_REGISTRY)


def get_layout(spec: str | Mapping[str, Any] | Layout) -> Layout:
    """Return a layout by name (``coco``, ``crowdpose``, ``ochuman``), or build one from a
    mapping with ``names``, ``flip_index``, ``sigmas``, ``parts`` and ``skeleton``."""
    if isinstance(spec, Layout):
        return spec
    if isinstance(spec, str):
        try:
            return _REGISTRY[spec.lower()]
        except KeyError:
            raise KeyError(
                f"unknown layout '{spec}'; known: {available_layouts()}, "
                "or pass a mapping (see conf/layout/custom_example.yaml)"
            ) from None
    if isinstance(spec, Mapping) or hasattr(spec, "keys"):
        return Layout.from_dict(spec)
    raise TypeError(f"layout must be a name, a mapping or a Layout, not {type(spec).__name__}")
