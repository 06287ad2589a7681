"""Who counts as a person in a COCO keypoint file (algorithm.md 2.0, the published rule).

- An annotation that is not a crowd region (``iscrowd`` 0 or absent) is a person whatever its
  ``num_keypoints``: one with nothing labelled simply adds no targets.
- A crowd region (``iscrowd`` 1) is a person only when its ``num_keypoints``, as stored in the
  file, is above 0. CrowdPose's ``num_keypoints`` counts its 12 body joints and leaves out head
  and neck, so a crowd region with only those two labelled is not a person (most CrowdPose
  images carry one crowd region; 66 of the 2000 val images have head and neck labelled on it).
- An annotation without a ``num_keypoints`` field (custom data) counts its keypoints with a
  visibility flag v > 0 instead. :func:`~pinet_lightning.core.annotations.validate_coco_keypoints`
  fills the field in that way when a file is read, so every dataset sees one value.

The same stored count decides, on COCO, which images train (their annotations'
``num_keypoints`` summing to more than 10) and which non-crowd annotations the heatmap loss
ignores (``num_keypoints`` 0), as in the published dataset class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["labelled_keypoints", "num_keypoints", "is_crowd", "is_person"]


def labelled_keypoints(ann: Mapping[str, Any]) -> int:
    """Keypoints with a visibility flag v > 0 (the x, y, v triplets of ``keypoints``)."""
    flags = np.asarray(ann.get("keypoints") or [], dtype=np.float64)[2::3]
    return int((flags > 0).sum())


def num_keypoints(ann: Mapping[str, Any]) -> int:
    """The annotation's ``num_keypoints`` as stored, else its labelled keypoints (v > 0)."""
    stored = ann.get("num_keypoints")
    return labelled_keypoints(ann) if stored is None else int(stored)


def is_crowd(ann: Mapping[str, Any]) -> bool:
    """A crowd region (``iscrowd`` 1); an annotation without the field is not one."""
    return bool(ann.get("iscrowd") or 0)


def is_person(ann: Mapping[str, Any]) -> bool:
    """Not a crowd region, or a crowd region whose stored ``num_keypoints`` is above 0."""
    return not is_crowd(ann) or num_keypoints(ann) > 0
