"""``PINetCodec``: the frame a PINet is trained and run in, and its targets, in one object.

mmpose-codec style: one object, built from the input size, the output stride and the cell/
pixel convention, that every stage asks instead of restating them:

- the data pipeline encodes a sample with it (:meth:`PINetCodec.encode`: keypoints and the
  ignore mask in network-input pixels -> the training targets in output cells) and the loader
  collates with it (:meth:`PINetCodec.collate`, the sparse batch of
  :mod:`pinet_lightning.codec.batch` when ``sparse``);
- the loss reads the batch on the device through it (:meth:`PINetCodec.heatmap_targets`,
  :meth:`PINetCodec.omega`);
- inference resizes images with it (:meth:`PINetCodec.resize`) and maps decoded cells back to
  image pixels (:meth:`PINetCodec.decode`).

It is configured once (the Hydra group ``codec``, interpolated into the data module, the
LightningModule and the network's convention), saved as plain data into every ``.ckpt`` and
``model.pt`` (:meth:`PINetCodec.to_dict`), and inference reads it back from there
(:meth:`PINetCodec.from_dict`): the input size reaches the predictor by that one route.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from torch import Tensor

from pinet_lightning.codec.batch import OmegaBatch, heatmap_targets, train_collate
from pinet_lightning.codec.conventions import Convention, cells_to_image, get_convention
from pinet_lightning.codec.targets import PINetTargetCodec
from pinet_lightning.core.layouts import Layout, get_layout

__all__ = ["PINetCodec", "INPUT_MULTIPLE", "TARGET_DEFAULTS"]

INPUT_MULTIPLE = 32  # the backbone's coarsest stride (HRNet's 1/32 branch)
# The target settings a codec accepts (``targets``), with their defaults: the encoder's own.
TARGET_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(PINetTargetCodec)
    if f.name not in ("layout", "output_size", "offsets_format", "heatmaps_format")
}
# ``sparse``: what the loader workers emit (and what crosses to the main process)
_FORMATS = {True: {"offsets_format": "omega", "heatmaps_format": "windows"},
            False: {"offsets_format": "dense", "heatmaps_format": "dense"}}


def check_input_size(value: Any, setting: str = "codec.input_size") -> int:
    """A positive multiple of :data:`INPUT_MULTIPLE`, or a ValueError naming ``setting``."""
    size = int(value)
    if size <= 0 or size % INPUT_MULTIPLE:
        below = max(size // INPUT_MULTIPLE, 1) * INPUT_MULTIPLE
        above = (max(size, 0) // INPUT_MULTIPLE + 1) * INPUT_MULTIPLE
        near = sorted({below, above})
        raise ValueError(
            f"{setting}={value} must be a positive multiple of {INPUT_MULTIPLE}: HRNet "
            f"(and the other timm backbones) halve the input 5 times and add the branches back "
            f"together, so the sides must divide by {INPUT_MULTIPLE}; use {setting}="
            f"{' or '.join(map(str, near))}"
        )
    return size


@dataclass(frozen=True)
class PINetCodec:
    """The frame and the targets of a PINet (see the module docstring).

    Args:
        layout: keypoint layout (name, mapping or :class:`Layout`).
        input_size: S: training crops are S x S; the inference short side is S. A multiple
            of 32.
        output_stride: network-input pixels per output cell (the network's, 4).
        convention: the cell/pixel convention (``cell_center``, ours; ``published``, the
            authors' weights): :mod:`pinet_lightning.codec.conventions`.
        sparse: the loader sends Omega's entries and the Gaussian windows (the default; the
            loss reads them on the device with the same values) instead of dense maps.
        targets: the target settings of algorithm.md 2 (:data:`TARGET_DEFAULTS`: ``sigma``,
            ``radius``, ``bg_weight``, ``min_part_area``, ``part_center_in_map``,
            ``window_sigmas``, ``window_margin``); missing ones take their defaults.
    """

    layout: Layout | str | Mapping[str, Any] = "crowdpose"
    input_size: int = 512
    output_stride: int = 4
    convention: str = "cell_center"
    sparse: bool = True
    targets: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        layout = get_layout(self.layout)
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "input_size", check_input_size(self.input_size))
        stride = int(self.output_stride)
        if stride <= 0 or self.input_size % stride:
            raise ValueError(f"codec.output_stride={self.output_stride} must divide "
                             f"codec.input_size={self.input_size}")
        object.__setattr__(self, "output_stride", stride)
        object.__setattr__(self, "convention", get_convention(self.convention).name)
        object.__setattr__(self, "sparse", bool(self.sparse))
        given = dict(self.targets or {})
        unknown = sorted(set(given) - set(TARGET_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown codec.targets keys {unknown}; known: "
                             f"{sorted(TARGET_DEFAULTS)} (the batch format is codec.sparse)")
        object.__setattr__(self, "targets", {**TARGET_DEFAULTS, **given})
        size = self.output_size
        object.__setattr__(self, "_encoder", PINetTargetCodec(
            layout, (size, size), **self.targets, **_FORMATS[self.sparse]))

    # ------------------------------------------------------------------ the frame
    @property
    def output_size(self) -> int:
        """Side of the square training output maps (S / stride)."""
        return self.input_size // self.output_stride

    @property
    def frame(self) -> Convention:
        """The cell/pixel convention object (its mappings, mirror and sampling)."""
        return get_convention(self.convention)

    def to_cells(self, xy: np.ndarray) -> np.ndarray:
        """Network-input pixels (..., 2) -> output cells."""
        return self.frame.input_to_cell(np.asarray(xy, dtype=np.float64), self.output_stride)

    def to_input(self, cells: Tensor) -> Tensor:
        """Output cells (..., 2) -> network-input pixels."""
        return self.frame.cell_to_input(cells, self.output_stride)

    def decode(self, poses: Tensor, back_transforms: Tensor) -> Tensor:
        """Decoded poses (B, N, K, 2+) in output cells -> the original images' pixels, through
        each image's back transform (B, 2, 3) (network-input pixels -> image pixels)."""
        return cells_to_image(poses, back_transforms, self.frame, self.output_stride)

    def resize(self, image: np.ndarray, multiple: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """The inference input of an RGB image (short side S, sides multiples of
        ``multiple``) and its back transform (network-input pixels -> image pixels)."""
        return self.frame.resize(image, self.input_size, multiple)

    # ------------------------------------------------------------------ encode
    def encode(self, keypoints: np.ndarray, areas: np.ndarray,
               ignore_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Training targets of one augmented S x S sample.

        Args:
            keypoints: (N, K, 3) ``(x, y, v)`` in network-input pixels.
            areas: (N,) person box areas in input pixels.
            ignore_mask: (S, S) in input pixels, 0 where the heatmap loss ignores the image;
                a cell is kept only when more than half of its pixels are (the published
                ``> 0.5`` on the area-averaged mask).
        Returns:
            :func:`~pinet_lightning.codec.targets.encode_targets`'s arrays (sparse or dense
            as ``sparse`` says).
        """
        cells = np.array(keypoints, dtype=np.float64, copy=True)
        if cells.size:
            cells[..., :2] = self.to_cells(cells[..., :2])
        ignore = None
        if ignore_mask is not None:
            size = self.output_size
            small = cv2.resize(np.asarray(ignore_mask, np.float32), (size, size),
                               interpolation=cv2.INTER_AREA)
            # kept when more than half of the cell is kept: half ignored is ignored (published)
            ignore = (small > 0.5).astype(np.float32)
        return self._encoder.encode(cells, areas, ignore_mask=ignore)  # type: ignore[attr-defined]

    def collate(self, samples: list[dict[str, Tensor]]) -> dict[str, Any]:
        """A training batch from encoded samples (:func:`~pinet_lightning.codec.batch.
        train_collate`)."""
        return train_collate(samples)

    # ------------------------------------------------------------------ the batch on the device
    @staticmethod
    def heatmap_targets(batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """The dense heatmap targets of a batch (rendered from its windows when sparse)."""
        return heatmap_targets(batch)

    @staticmethod
    def omega(batch: Mapping[str, Any], batch_size: int) -> OmegaBatch:
        """Omega of a sparse batch, read on its device."""
        return OmegaBatch.from_batch(batch, batch_size)

    # ------------------------------------------------------------------ plain data
    def to_dict(self) -> dict[str, Any]:
        """Plain data (what checkpoints store); :meth:`from_dict` rebuilds the codec."""
        return {"layout": self.layout.to_dict(), "input_size": self.input_size,  # type: ignore
                "output_stride": self.output_stride, "convention": self.convention,
                "sparse": self.sparse, "targets": dict(self.targets)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PINetCodec:
        """The codec :meth:`to_dict` wrote (unknown keys are an error)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown codec fields {unknown}; known: {sorted(known)}")
        return cls(**dict(values))

    @classmethod
    def from_any(cls, spec: PINetCodec | Mapping[str, Any] | Layout | str | None = None,
                 **overrides: Any) -> PINetCodec:
        """A codec from a codec, a mapping of its fields (a Hydra node), a layout (a name or
        a :class:`Layout`: the other fields at their defaults) or None (defaults), with
        ``overrides`` applied."""
        if isinstance(spec, PINetCodec):
            return dataclasses.replace(spec, **overrides) if overrides else spec
        if isinstance(spec, (str, Layout)):
            return cls(layout=spec, **overrides)
        values = {k: v for k, v in dict(spec or {}).items() if k != "_target_"}
        return cls.from_dict({**values, **overrides})

    @classmethod
    def for_network(cls, net: Any, **overrides: Any) -> PINetCodec:
        """The frame a network decodes in: its layout, output stride and convention (the
        other fields at their defaults), with ``overrides`` applied."""
        values = {"layout": net.layout, "output_stride": int(getattr(net, "output_stride", 4)),
                  "convention": get_convention(getattr(net, "convention", None)).name}
        return cls(**{**values, **overrides})

    def check_network(self, net: Any) -> None:
        """Raise when ``net``'s output stride or convention is not this codec's: its targets
        would sit at shifted or rescaled cells. The message names the setting."""
        stride = getattr(net, "output_stride", None)
        if stride is not None and int(stride) != self.output_stride:
            raise ValueError(f"codec.output_stride={self.output_stride} but the network's "
                             f"output maps are input/{stride}: set codec.output_stride={stride}")
        convention = getattr(net, "convention", None)
        if convention is not None and get_convention(convention).name != self.convention:
            raise ValueError(f"codec.convention={self.convention} but the network decodes "
                             f"with '{get_convention(convention).name}': set "
                             f"codec.convention={get_convention(convention).name} (it feeds "
                             "the network and the data)")
