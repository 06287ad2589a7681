"""Keypoint layouts: names, flip order, OKS sigmas, body parts and skeleton.

A layout is data, not code (docs/algorithm.md, section 1): the built-in ones are the YAML files
of the ``layout`` config group (conf/layout/*.yaml, packaged with the library), and a new
COCO-format dataset describes its own keypoints in such a file, passed to :func:`get_layout`
as a mapping (or registered by name with :func:`register_layout`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
from omegaconf import OmegaConf

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


# The built-in layouts are data with one owner: the YAML files of the ``layout`` config group
# (conf/layout/*.yaml, shipped inside the package), read on first use. A file whose name
# starts with "custom" is an example to copy, not a layout.
_LAYOUT_DIR = ("pinet_lightning.conf", "layout")
_REGISTRY: dict[str, Layout] = {}
_BUILTINS_READ = False


def _read_builtins() -> None:
    global _BUILTINS_READ
    if _BUILTINS_READ:
        return
    _BUILTINS_READ = True
    folder = resources.files(_LAYOUT_DIR[0]).joinpath(_LAYOUT_DIR[1])
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml") and not entry.name.startswith("custom"):
            spec = OmegaConf.to_container(OmegaConf.create(entry.read_text()))
            _REGISTRY.setdefault(str(spec["name"]).lower(), Layout.from_dict(spec))


def register_layout(layout: Layout) -> None:
    """Make a layout available to :func:`get_layout` by its name."""
    _read_builtins()
    _REGISTRY[layout.name.lower()] = layout


def available_layouts() -> list[str]:
    """Names :func:`get_layout` knows: the built-in layouts and the registered ones."""
    _read_builtins()
    return sorted(_REGISTRY)


def get_layout(spec: str | Mapping[str, Any] | Layout) -> Layout:
    """Return a layout by name (``coco``, ``crowdpose``, ``ochuman``), or build one from a
    mapping with ``names``, ``flip_index``, ``sigmas``, ``parts`` and ``skeleton``."""
    if isinstance(spec, Layout):
        return spec
    if isinstance(spec, str):
        _read_builtins()
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
