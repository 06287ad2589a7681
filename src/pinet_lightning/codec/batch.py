"""The sparse training batch: the collate of the loader's samples and its readers on the device.

Samples from :func:`~pinet_lightning.codec.targets.encode_targets` with
``offsets_format="omega"`` / ``heatmaps_format="windows"`` (what the loader workers send by
default) are collated by :func:`train_collate`; the loss then reads the batch on its device:
:func:`heatmap_targets` renders the heatmap targets (the float32 products and maxima of the
dense encoder, so bit for bit the same maps) and :class:`OmegaBatch` serves the offset loss and
the proposal sampling, with static shapes (no host sync).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pinet_lightning.codec.targets import TARGET_KEYS

__all__ = ["train_collate", "render_windows", "heatmap_targets", "OmegaBatch", "HEATMAP_KEYS",
           "WINDOW_KEYS", "OMEGA_KEYS"]


# the dense heatmap targets, and the sparse keys standing for them and for the offsets
HEATMAP_KEYS: tuple[str, ...] = TARGET_KEYS[:4]
WINDOW_KEYS: tuple[str, ...] = ("window_channel", "window_first", "window_length",
                                "window_gauss", "ignore_mask", "bg_weight", "target_shape")
OMEGA_KEYS: tuple[str, ...] = ("omega_index", "omega_offsets", "omega_weights", "target_shape")

# the per-entry keys of the sparse targets, concatenated over the batch; the per-sample ones
# (ignore_mask, bg_weight) are stacked, target_shape is shared
_OMEGA_KEYS = tuple(key for key in OMEGA_KEYS if key.startswith("omega_"))
_WINDOW_KEYS = tuple(key for key in WINDOW_KEYS if key.startswith("window_"))


def train_collate(batch: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Stack the dense keys of the training samples; concatenate the sparse ones.

    Sparse samples (``offsets_format="omega"`` / ``heatmaps_format="windows"`` of
    :func:`~pinet_lightning.codec.targets.encode_targets`) carry ``target_shape`` (K, P, H, W).
    Their Omega entries are concatenated with batch offsets: ``omega_index`` becomes the
    ascending flat position in (B, P*K, H, W) (int32 while that fits, the bytes that cross
    the worker boundary), and each Gaussian window's ``window_channel`` its channel in
    (B * (K + P)); ``target_shape`` stays a tuple of ints (never moved to a device).
    :func:`heatmap_targets` and :class:`OmegaBatch` read the result on the device.
    """
    first = batch[0]
    out: dict[str, Any] = {}
    sparse = set(_OMEGA_KEYS + _WINDOW_KEYS) & set(first)
    for key in first:
        if key not in sparse and key != "target_shape":
            out[key] = torch.stack([s[key] for s in batch])
    if not sparse:
        return out
    if "target_shape" not in first:
        raise KeyError(f"train_collate: sparse samples (keys {sorted(sparse)}) need "
                       "'target_shape' (K, P, H, W); build them with encode_targets")
    shapes = {tuple(int(v) for v in s["target_shape"]) for s in batch}
    if len(shapes) > 1:
        raise ValueError(f"train_collate: samples of one batch have different target shapes "
                         f"{sorted(shapes)} (K, P, H, W); use one layout and input size")
    k, p, h, w = out["target_shape"] = shapes.pop()
    if "omega_index" in first:
        block = p * k * h * w
        dtype = torch.int32 if len(batch) * block < 2**31 else torch.int64
        parts = []
        for b, s in enumerate(batch):
            index = s["omega_index"]
            # encode_targets writes each sample's Omega ascending and unique: the batch is
            # then ascending too, which the loss's searches rely on.
            if len(index) and (int(index[0]) < 0 or int(index[-1]) >= block
                               or not bool((index[1:] > index[:-1]).all())):
                raise ValueError(f"train_collate: sample {b} of the batch has Omega indices "
                                 f"that are not ascending, unique and in [0, {block}) (P*K*H*W "
                                 f"for target_shape {(k, p, h, w)}); build them with "
                                 "encode_targets(offsets_format='omega')")
            parts.append(index.to(dtype) + b * block)
        out["omega_index"] = torch.cat(parts)
        out["omega_offsets"] = torch.cat([s["omega_offsets"] for s in batch])
        out["omega_weights"] = torch.cat([s["omega_weights"] for s in batch])
    if "window_channel" in first:
        out["window_channel"] = torch.cat([s["window_channel"].int() + b * (k + p)
                                           for b, s in enumerate(batch)])
        for key in _WINDOW_KEYS[1:]:
            out[key] = torch.cat([s[key] for s in batch])
    return out


def render_windows(channel: Tensor, first: Tensor, length: Tensor, gauss: Tensor,
                   shape: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
    """Dense heatmaps and their window mask from Gaussian windows, on the windows' device.

    Args:
        channel: (M,) channel of each window in ``shape[0]`` (for a batch: image * (K + P)
            + channel).
        first, length, gauss: the window form of :func:`encode_targets`
            (``heatmaps_format="windows"``): (M, 2), (M, 2), (M, 2, L).
        shape: (C, H, W) of the output.
    Returns:
        ``heat`` (C, H, W) float32, max-combined as the dense encoder does (bit for bit), and
        ``window`` (C, H, W) bool, True on every window cell. Static shapes: no host sync.
    """
    c, h, w = shape
    steps = torch.arange(gauss.shape[-1], device=gauss.device)
    first, length, channel = first.long(), length.long(), channel.long()
    inside = steps < length[:, :, None]  # (M, 2, L)
    cols = first[:, 0, None] + steps
    rows = (channel[:, None] * h + first[:, 1, None] + steps) * w
    dump = c * h * w  # cells outside a window go to one extra slot, dropped at the end
    flat = torch.where(inside[:, 1, :, None] & inside[:, 0, None, :],
                       rows[:, :, None] + cols[:, None, :], dump).reshape(-1)
    values = (gauss[:, 1, :, None] * gauss[:, 0, None, :]).reshape(-1)  # float32 as numpy's
    heat = torch.zeros(dump + 1, dtype=torch.float32, device=gauss.device)
    heat.scatter_reduce_(0, flat, values.float(), reduce="amax")  # max: order-independent
    window = torch.zeros(dump + 1, dtype=torch.bool, device=gauss.device)
    window.index_fill_(0, flat, True)
    return heat[:-1].view(c, h, w), window[:-1].view(c, h, w)


def heatmap_targets(batch: Mapping[str, Any]) -> dict[str, Tensor]:
    """The four dense heatmap targets of a training batch (B, K or P, H, W): the batch's own,
    or rendered on its device from its Gaussian windows (what ``train_collate`` makes of
    ``heatmaps_format="windows"`` samples; equal to the dense encoder's, bit for bit)."""
    if all(key in batch for key in HEATMAP_KEYS):
        return {key: batch[key] for key in HEATMAP_KEYS}
    missing = [key for key in WINDOW_KEYS if key not in batch]
    if missing:
        raise KeyError(f"the batch has neither the dense heatmap targets "
                       f"{list(HEATMAP_KEYS)} nor the Gaussian windows (lacks {missing}); "
                       "build it with encode_targets and codec.batch.train_collate")
    k, p, h, w = (int(v) for v in batch["target_shape"])
    ignore = batch["ignore_mask"]
    b = ignore.shape[0]
    heat, window = render_windows(batch["window_channel"], batch["window_first"],
                                  batch["window_length"], batch["window_gauss"],
                                  (b * (k + p), h, w))
    heat, window = heat.view(b, k + p, h, w), window.view(b, k + p, h, w)
    # Loss weight 1 in a window, the background weight elsewhere, times the ignore mask.
    background = batch["bg_weight"].float().view(b, 1, 1, 1)
    mask = torch.where(window, torch.ones((), device=heat.device), background)
    mask = mask * ignore.float()[:, None]
    return {"heatmaps": heat[:, :k], "heatmap_mask": mask[:, :k],
            "part_heatmaps": heat[:, k:], "part_mask": mask[:, k:]}


@dataclass(frozen=True)
class OmegaBatch:
    """Omega of a training batch (the offset targets where a weight is set), on a device.

    ``index`` (E,) long: ascending flat positions in (B, P*K, H, W), i.e.
    ``((b * P + p) * K + k) * H * W + y * W + x``; ``offsets`` (E, 2) float32 (x, y);
    ``weights`` (E,) float32; ``shape`` (B, P, K, H, W). Each entry stands for the two
    dense channels ``(p * K + k) * 2 + c`` (x and y) at cell (x, y), which share its weight.
    Every method uses gathers, scatters and searches of static shape: no host sync.
    """

    index: Tensor
    offsets: Tensor
    weights: Tensor
    shape: tuple[int, int, int, int, int]

    @classmethod
    def from_batch(cls, batch: Mapping[str, Any], batch_size: int) -> OmegaBatch:
        """The Omega entries of a batch from ``train_collate`` (``omega_*`` keys)."""
        missing = [key for key in OMEGA_KEYS if key not in batch]
        if missing:
            raise KeyError(f"the batch has neither the dense offset targets "
                           f"['offsets', 'offset_weights'] nor Omega (lacks {missing}); build "
                           "it with encode_targets and codec.batch.train_collate")
        k, p, h, w = (int(v) for v in batch["target_shape"])
        return cls(batch["omega_index"].long(), batch["omega_offsets"],
                   batch["omega_weights"], (int(batch_size), p, k, h, w))

    def _split(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per entry: image, channel pair p * K + k, row, column."""
        _, p, k, h, w = self.shape
        plane, cell = self.index // (h * w), self.index % (h * w)
        return plane // (p * k), plane % (p * k), cell // w, cell % w

    def at_entries(self, maps: Tensor) -> Tensor:
        """(E, 2): the x and y channels of dense offset maps (B, P*K*2, H, W) at Omega."""
        b, pair, y, x = self._split()
        channel = (2 * pair)[:, None] + torch.arange(2, device=pair.device)
        return maps[b[:, None], channel, y[:, None], x[:, None]]

    def part_weights(self) -> Tensor:
        """(B, P, H, W): the largest offset weight of each part at each cell (0 off Omega),
        the sparse form of ``offset_weights.view(B, P, K*2, H, W).amax(2)``."""
        b, p, k, h, w = self.shape
        part_cell = (self.index // (k * h * w)) * (h * w) + self.index % (h * w)
        out = torch.zeros(b * p * h * w, dtype=self.weights.dtype, device=self.weights.device)
        out.scatter_reduce_(0, part_cell, self.weights, reduce="amax")
        return out.view(b, p, h, w)

    def at_cells(self, cells: Tensor, batch_index: Tensor, part_index: Tensor
                 ) -> tuple[Tensor, Tensor]:
        """Target offsets and weights (N, K, 2) of each proposal's own part at its cell
        (x, y): the K keypoints' entries where Omega has them, 0 elsewhere, as the dense
        maps read there would give."""
        _, p, k, h, w = self.shape
        cells = cells.long()
        plane = (batch_index.long() * p + part_index.long())[:, None] * k + torch.arange(
            k, device=cells.device)
        query = plane * (h * w) + (cells[:, 1] * w + cells[:, 0])[:, None]  # (N, K)
        # A sentinel past every query keeps the search result a valid position when E = 0.
        index = torch.cat([self.index, self.index.new_full((1,), torch.iinfo(torch.int64).max)])
        at = torch.searchsorted(index, query)  # (N, K), in 0..E
        found = index[at] == query
        offsets = torch.cat([self.offsets, self.offsets.new_zeros(1, 2)])[at]
        weights = torch.cat([self.weights, self.weights.new_zeros(1)])[at]
        offsets = torch.where(found[..., None], offsets, 0.0)
        weights = torch.where(found, weights, 0.0)[..., None].expand(-1, -1, 2)
        return offsets, weights
