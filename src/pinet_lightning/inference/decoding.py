"""Inference decoding (algorithm.md 5): peaks, coarse poses, refinement, flip test, multi-scale.

Everything up to pose fusion runs on the network's device on fixed-size tensors (top-k
peaks per part, a validity mask instead of filtering), so a batch costs one host transfer,
right before fusion.

Where output cells sit in the network input, how the mirrored input is built, where the
refinement reads features and how keypoint scores are read off the heatmaps follow the
network's cell/pixel convention (``net.convention``, :mod:`pinet_lightning.codec.conventions`):
``cell_center`` for models trained here, ``published`` for the authors' weights.

Flip test: the network runs once on ``2B`` images (the batch, then its mirror). Keypoint
heatmaps are averaged (mirror flipped back, channels reordered by the flip order), part
heatmaps averaged as they are (parts are symmetric). Peaks come from the averaged part
heatmaps. For a peak at cell ``(x, y)`` the mirrored output gives a second coarse pose at
``(w - 1 - x, y)`` from the mirrored offsets, refined with the mirrored features (one
``net.refine`` call for all proposals of both halves), mirrored back and averaged with the
direct pose.

Scores: pose score = averaged part heatmap at the peak; keypoint score = pose score x the
averaged keypoint heatmap at the keypoint. Pose fusion orders the proposals by the mean of
their keypoint scores (as the published inference does).

Multi-scale (``scales`` other than ``(1.0,)``): each scale resizes the input (bilinear,
pixel-center aligned, sides rounded to ``scale_multiple``), decodes its own peaks and poses,
which are mapped to the base input's pixels and pooled; the scores come from the heatmaps
of all scales resized to the largest scale's map and averaged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pinet_lightning.codec.conventions import (
    Convention,
    cells_to_input,
    get_convention,
    input_to_image,
)
from pinet_lightning.core.layouts import Layout, get_layout
from pinet_lightning.core.sampling import sample_maps
from pinet_lightning.inference.fusion import pose_fusion

__all__ = [
    "DecodeConfig",
    "nms_kernel_size",
    "find_peaks",
    "gather_offsets",
    "sample_maps",
    "merge_flip",
    "ScaleDecoding",
    "decode_scale",
    "score_scales",
    "decode_outputs",
    "fuse_batch",
    "decode_images",
    "fuse_candidates",
    "predict_poses",
]

RefineFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass
class DecodeConfig:
    """Inference settings (the defaults of algorithm.md 5); a Hydra ``decode`` node maps onto it.

    Attributes:
        flip_test: also run the mirrored image and average (algorithm.md 5.2, 5.4).
        top_k: peaks kept per part and image.
        score_threshold: peaks with a part-heatmap score <= this are dropped.
        oks_threshold: pose fusion's OKS threshold.
        scales: input scales (multi-scale test); ``(1.0,)`` is single scale.
        refine: apply the Pose Refinement network to the coarse poses.
        nms_large_size, nms_medium_size, nms_kernels: max-pool kernel ``nms_kernels[0]`` (7)
            when the mean of the map's height and width is over ``nms_large_size``,
            ``nms_kernels[1]`` (5) over ``nms_medium_size``, else ``nms_kernels[2]`` (3).
        scale_multiple: multi-scale inputs have sides rounded to this multiple.
        max_people: keep at most this many fused poses per image, best first (None: all).
    """

    flip_test: bool = True
    top_k: int = 30
    score_threshold: float = 0.01
    oks_threshold: float = 0.7
    scales: tuple[float, ...] = (1.0,)
    refine: bool = True
    nms_large_size: float = 300.0
    nms_medium_size: float = 200.0
    nms_kernels: tuple[int, int, int] = (7, 5, 3)
    scale_multiple: int = 64
    max_people: int | None = None

    def __post_init__(self) -> None:
        self.scales = tuple(float(s) for s in self.scales)
        self.nms_kernels = tuple(int(k) for k in self.nms_kernels)
        if len(self.nms_kernels) != 3 or any(k < 1 or k % 2 == 0 for k in self.nms_kernels):
            raise ValueError("DecodeConfig.nms_kernels must be three odd sizes (large, medium, "
                             f"small map), got {self.nms_kernels}")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"DecodeConfig.scales must be positive numbers, got {self.scales}")
        if self.top_k < 1:
            raise ValueError(f"DecodeConfig.top_k must be >= 1, got {self.top_k}")

    @classmethod
    def from_any(cls, cfg: DecodeConfig | Mapping[str, Any] | None = None,
                 **overrides: Any) -> DecodeConfig:
        """Build from a DecodeConfig, a mapping (Hydra node) or None, then apply overrides."""
        if cfg is None:
            values: dict[str, Any] = {}
        elif isinstance(cfg, DecodeConfig):
            values = cfg.to_dict()
        else:
            values = {str(k): v for k, v in dict(cfg).items()}
        values.update(overrides)
        _drop_legacy_fields(values)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"DecodeConfig: unknown fields {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scales"] = list(self.scales)
        d["nms_kernels"] = list(self.nms_kernels)
        return d


# Fields of checkpoints written before the cell/pixel convention moved to the network: the
# only values they ever held are those of the cell_center convention.
_LEGACY_FIELDS = {"output_stride": 4, "cell_offset": 1.5}


def _drop_legacy_fields(values: dict[str, Any]) -> None:
    for key, expected in _LEGACY_FIELDS.items():
        if key in values and float(values.pop(key)) != expected:
            raise ValueError(f"DecodeConfig: '{key}' is no longer a decoding setting; the "
                             "network's convention decides it (PINet(convention=...))")


def nms_kernel_size(height: int, width: int, cfg: DecodeConfig | None = None) -> int:
    """Max-pool kernel for peak finding: 7 / 5 / 3 by the map's mean side (algorithm.md 5.3)."""
    cfg = cfg or DecodeConfig()
    large, medium, small = cfg.nms_kernels
    mean_side = (height + width) / 2
    if mean_side > cfg.nms_large_size:
        return large
    if mean_side > cfg.nms_medium_size:
        return medium
    return small


def find_peaks(part_heatmaps: Tensor, top_k: int = 30, score_threshold: float = 0.01,
               kernel: int = 3) -> tuple[Tensor, Tensor, Tensor]:
    """Local maxima of part heatmaps, top-k per part and image.

    Args:
        part_heatmaps: (B, P, h, w).

    Returns:
        scores (B, P, T), flat cell index ``y * w + x`` (B, P, T) long, valid (B, P, T) bool
        (score > threshold); T = min(top_k, h * w).
    """
    b, p, h, w = part_heatmaps.shape
    pooled = F.max_pool2d(part_heatmaps, kernel, stride=1, padding=kernel // 2)
    peaks = torch.where(pooled == part_heatmaps, part_heatmaps,
                        torch.zeros((), dtype=part_heatmaps.dtype, device=part_heatmaps.device))
    scores, index = peaks.view(b, p, h * w).topk(min(top_k, h * w), dim=-1)
    return scores, index, scores > score_threshold


def gather_offsets(offsets: Tensor, index: Tensor, num_keypoints: int) -> Tensor:
    """Offsets of each peak's own part: (B, P*K*2, h, w) at flat cells (B, P, T) ->
    (B, P, T, K, 2)."""
    b, c, h, w = offsets.shape
    p, t = index.shape[1:]
    if c != p * num_keypoints * 2:
        raise ValueError(f"decoding: offsets have {c} channels, expected P*K*2 = "
                         f"{p * num_keypoints * 2}: check the layout against the network")
    flat = offsets.reshape(b, p, num_keypoints * 2, h * w)
    picked = flat.gather(3, index[:, :, None, :].expand(b, p, num_keypoints * 2, t))
    return picked.view(b, p, num_keypoints, 2, t).permute(0, 1, 4, 2, 3)


def _reorder(x: Tensor, order: Sequence[int], dim: int = 1) -> Tensor:
    """``x`` with its entries along ``dim`` in ``order``, built from views: an index tensor
    made from ``order`` on the device would be a blocking host-to-device copy (a sync)."""
    return torch.stack([x.select(dim, int(i)) for i in order], dim)


def merge_flip(outputs: Mapping[str, Tensor], flip_index: Sequence[int] | Tensor,
               flip: bool) -> tuple[Tensor, Tensor]:
    """Keypoint and part heatmaps of the batch, averaged with the mirrored half when
    ``flip`` (the outputs then hold 2B images: B direct, B mirrored). float32."""
    heatmaps = outputs["heatmaps"].float()
    parts = outputs["part_heatmaps"].float()
    if not flip:
        return heatmaps, parts
    b = heatmaps.shape[0] // 2
    heatmaps = (heatmaps[:b] + _reorder(heatmaps[b:].flip(-1), flip_index)) / 2
    parts = (parts[:b] + parts[b:].flip(-1)) / 2
    return heatmaps, parts


@dataclass
class ScaleDecoding:
    """One input scale, decoded up to scoring.

    Attributes:
        heatmaps, part_heatmaps: (B, K, h, w), (B, P, h, w) flip-averaged maps, float32.
        poses: (B, N, K, 2) refined (flip-averaged) poses in this scale's output cells,
            N = P * T proposals an image (T peaks per part).
        cells: (B, N, 2) peak cells; part: (B, N) part of each peak; valid: (B, N) bool.
        input_scale: (sx, sy) base-input pixels per input pixel of this scale.
    """

    heatmaps: Tensor
    part_heatmaps: Tensor
    poses: Tensor
    cells: Tensor
    part: Tensor
    valid: Tensor
    input_scale: tuple[float, float] = (1.0, 1.0)


def decode_scale(outputs: Mapping[str, Tensor], layout: Layout, cfg: DecodeConfig,
                 refine_fn: RefineFn | None, flip: bool,
                 input_scale: tuple[float, float] = (1.0, 1.0)) -> ScaleDecoding:
    """Peaks and their (refined, flip-averaged) poses in output cells, fixed size N = P*T."""
    heatmaps, part_heatmaps = merge_flip(outputs, layout.flip_index, flip)
    b, p, h, w = part_heatmaps.shape
    k = layout.num_keypoints
    kernel = nms_kernel_size(h, w, cfg)
    _, index, valid = find_peaks(part_heatmaps, cfg.top_k, cfg.score_threshold, kernel)
    t = index.shape[-1]
    offsets = outputs["offsets"].float()
    cells = torch.stack([index % w, torch.div(index, w, rounding_mode="floor")], -1).float()
    coarse = cells[..., None, :] - gather_offsets(offsets[:b], index, k)  # (B, P, T, K, 2)
    poses = [coarse.reshape(b * p * t, k, 2)]
    sources = [cells.reshape(b * p * t, 2)]
    if flip:
        mirror_x = (w - 1) - cells[..., 0]
        mirror_index = index - cells[..., 0].long() + mirror_x.long()
        mirror_cells = torch.stack([mirror_x, cells[..., 1]], -1)
        coarse_m = mirror_cells[..., None, :] - gather_offsets(offsets[b:], mirror_index, k)
        poses.append(coarse_m.reshape(b * p * t, k, 2))
        sources.append(mirror_cells.reshape(b * p * t, 2))
    pose_stack = torch.cat(poses)  # (n_branches * B*P*T, K, 2)
    if refine_fn is not None and cfg.refine:
        n_img = 2 * b if flip else b
        # output_size: never a host sync, whatever the torch version's int-repeats path
        batch_index = torch.arange(n_img, device=pose_stack.device).repeat_interleave(
            p * t, output_size=n_img * p * t)
        correction = refine_fn(outputs["features"], pose_stack, torch.cat(sources), batch_index)
        pose_stack = pose_stack - correction.float()  # refined pose = coarse pose - correction
    refined = pose_stack[: b * p * t]
    if flip:
        mirrored = pose_stack[b * p * t:]
        back = _reorder(mirrored, layout.flip_index)
        back = torch.stack([(w - 1) - back[..., 0], back[..., 1]], -1)
        refined = (refined + back) / 2
    part_index = torch.arange(p, device=index.device)[None, :, None].expand(b, p, t)
    return ScaleDecoding(heatmaps=heatmaps, part_heatmaps=part_heatmaps,
                         poses=refined.view(b, p * t, k, 2), cells=cells.view(b, p * t, 2),
                         part=part_index.reshape(b, p * t), valid=valid.reshape(b, p * t),
                         input_scale=input_scale)


def score_scales(scales: Sequence[ScaleDecoding], convention: Convention, stride: int,
                 score_threshold: float) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Scores of every scale's proposals: per scale (poses (B, N, K, 3) in its own cells with
    the keypoint scores, pose scores (B, N), valid (B, N)).

    Pose score = part heatmap at the peak, keypoint score = pose score x keypoint heatmap at
    the keypoint (read as the convention says). With several scales the maps of all scales are
    resized to the largest one and averaged, and every proposal is scored on them.
    """
    largest = max(scales, key=lambda sc: sc.heatmaps.shape[-1] * sc.heatmaps.shape[-2])
    h, w = largest.heatmaps.shape[-2:]

    def resized(m: Tensor) -> Tensor:
        if m.shape[-2:] == (h, w):
            return m
        return F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)

    if len(scales) == 1:
        heatmaps, parts = largest.heatmaps, largest.part_heatmaps
    else:
        heatmaps = torch.stack([resized(sc.heatmaps) for sc in scales]).mean(0)
        parts = torch.stack([resized(sc.part_heatmaps) for sc in scales]).mean(0)

    def to_largest(xy: Tensor, sc: ScaleDecoding) -> Tensor:
        # scale-s cells -> its input px -> base input px -> largest input px -> cells
        if sc is largest:
            return xy
        ratio = xy.new_tensor(sc.input_scale) / xy.new_tensor(largest.input_scale)
        px = (convention.cell_to_input(xy, stride) + 0.5) * ratio - 0.5
        return convention.input_to_cell(px, stride)

    scored = []
    for sc in scales:
        b, n, k, _ = sc.poses.shape
        pose_scores = sample_maps(parts, to_largest(sc.cells, sc), sc.part)
        kpts = to_largest(sc.poses, sc).reshape(b, n * k, 2)
        channels = torch.arange(k, device=kpts.device).repeat(n)
        sampled = convention.keypoint_scores(heatmaps, kpts, channels, stride).view(b, n, k)
        poses = torch.cat([sc.poses, (pose_scores[..., None] * sampled)[..., None]], -1)
        scored.append((poses, pose_scores, sc.valid & (pose_scores > score_threshold)))
    return scored


def decode_outputs(outputs: Mapping[str, Tensor], layout: Layout | str,
                   cfg: DecodeConfig | None = None, refine_fn: RefineFn | None = None,
                   flip: bool | None = None, convention: str | Convention | None = None,
                   stride: int = 4) -> dict[str, Tensor]:
    """Decode network outputs of one scale into scored proposals, without fusion.

    Args:
        outputs: ``heatmaps``, ``part_heatmaps``, ``offsets`` (and ``features`` when
            ``refine_fn`` is given) for B images, or 2B when ``flip`` (direct then mirrored).
        layout: keypoint layout (flip order, K).
        cfg: decode settings; ``flip`` defaults to ``cfg.flip_test``.
        refine_fn: ``net.refine`` (features, poses, cells, batch_index) -> correction, or
            None for coarse poses (e.g. target maps fed as outputs).
        convention, stride: the network's cell/pixel convention and output stride.

    Returns:
        fixed-size tensors, N = P * T proposals an image: ``poses`` (B, N, K, 3) (x, y in
        output cells, keypoint score), ``scores`` (B, N) pose scores, ``valid`` (B, N) bool,
        ``cells`` (B, N, 2) peak cells, ``part`` (B, N), plus the averaged ``heatmaps`` and
        ``part_heatmaps``.
    """
    layout = get_layout(layout)
    cfg = cfg or DecodeConfig()
    flip = cfg.flip_test if flip is None else flip
    if flip and outputs["heatmaps"].shape[0] % 2:
        raise ValueError("decoding: flip test needs 2B outputs (the batch, then its mirror)")
    sc = decode_scale(outputs, layout, cfg, refine_fn, flip)
    (poses, scores, valid), = score_scales([sc], get_convention(convention), stride,
                                           cfg.score_threshold)
    return {"poses": poses, "scores": scores, "valid": valid, "cells": sc.cells,
            "part": sc.part, "heatmaps": sc.heatmaps, "part_heatmaps": sc.part_heatmaps}


def fuse_batch(poses: Tensor, valid: Tensor, sigmas: Sequence[float],
               cfg: DecodeConfig | None = None) -> list[tuple[Tensor, Tensor]]:
    """Pose fusion per image, proposals ordered by their mean keypoint score (algorithm.md 5.7); one
    device -> host transfer for the whole batch.

    Args:
        poses (B, N, K, 3), valid (B, N): scored proposals in original pixels.

    Returns:
        per image (fused poses (F, K, 3), fused scores (F,)) float32 CPU tensors, best first
        when ``cfg.max_people`` truncates.
    """
    cfg = cfg or DecodeConfig()
    b, n, k, _ = poses.shape
    packed = torch.cat([poses.reshape(b, n, k * 3).float(), valid[..., None].float()],
                       -1).cpu().numpy()
    results = []
    for item in packed:
        keep = item[:, -1] > 0
        proposals = item[keep, : k * 3].reshape(-1, k, 3)
        fused, fused_scores = pose_fusion(proposals, proposals[..., 2].mean(-1),
                                          np.asarray(sigmas), cfg.oks_threshold)
        if cfg.max_people is not None and len(fused_scores) > cfg.max_people:
            best = np.argsort(-fused_scores, kind="stable")[: cfg.max_people]
            fused, fused_scores = fused[best], fused_scores[best]
        results.append((torch.from_numpy(np.ascontiguousarray(fused, dtype=np.float32)),
                        torch.from_numpy(np.ascontiguousarray(fused_scores, dtype=np.float32))))
    return results


def _device_of(net: Any, fallback: torch.device) -> torch.device:
    if isinstance(net, torch.nn.Module):
        for tensor in net.parameters():
            return tensor.device
    return fallback


def _keep_autocast(fn: RefineFn, device_type: str) -> RefineFn:
    """``fn`` run under the autocast state current now (decoding disables it around)."""
    if not torch.is_autocast_enabled(device_type):
        return fn
    dtype = torch.get_autocast_dtype(device_type)

    def run(*args: Tensor) -> Tensor:
        with torch.autocast(device_type, dtype=dtype):
            return fn(*args)

    return run


def _resize_input(images: Tensor, scale: float, multiple: int) -> Tensor:
    h, w = images.shape[-2:]
    size = [max(multiple, int(round(s * scale / multiple)) * multiple) for s in (h, w)]
    if tuple(size) == (h, w):
        return images
    return F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False)


def _full_precision(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off while it is on (decoding arithmetic stays float32); nothing otherwise, so
    that graph exporters see no autocast region."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def decode_images(net: Any, images: Tensor, layout: Layout, cfg: DecodeConfig
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Everything before pose fusion, on fixed-size tensors: the network on the images (and
    their mirror), peaks, coarse poses, refinement, flip merge, multi-scale and scores.

    Both inference paths run it: :func:`predict_poses` (PyTorch) and the exported ONNX graph
    (:mod:`pinet_lightning.inference.export`), which is this function traced. Runs under the
    caller's grad mode and autocast (the network and refine under autocast, the decoding in
    float32).

    Args:
        net: as for :func:`predict_poses`, on the images' device.
        images: (B, 3, H, W) RGB, uint8 or float in 0..255, network input.

    Returns:
        candidates (B, N, K, 3): x, y in network-input pixels and the keypoint score; pose
        scores (B, N); valid (B, N) bool. N = P * top_k per scale.
    """
    convention = get_convention(getattr(net, "convention", None))
    stride = int(getattr(net, "output_stride", 4))
    device_type = images.device.type
    refine = getattr(net, "refine", None)
    refine_fn = _keep_autocast(refine, device_type) if cfg.refine and refine else None
    base_h, base_w = images.shape[-2:]
    scales = []
    for scale in cfg.scales:
        x = _resize_input(images, scale, cfg.scale_multiple) if scale != 1.0 else images
        if cfg.flip_test:
            mirror = convention.mirror(x, stride)
            batch = torch.cat([x.to(mirror.dtype), mirror])
        else:
            batch = x
        outputs = net(batch)
        with _full_precision(device_type):
            input_scale = (base_w / x.shape[-1], base_h / x.shape[-2])
            scales.append(decode_scale(outputs, layout, cfg, refine_fn, cfg.flip_test,
                                       input_scale))
        del outputs
    with _full_precision(device_type):
        scored = score_scales(scales, convention, stride, cfg.score_threshold)
        poses = torch.cat([cells_to_input(p, convention, stride, sc.input_scale)
                           for (p, _, _), sc in zip(scored, scales, strict=True)], 1)
        scores = torch.cat([s for _, s, _ in scored], 1)
        valid = torch.cat([v for _, _, v in scored], 1)
    return poses, scores, valid


def fuse_candidates(poses: Tensor, valid: Tensor, back_transforms: Tensor,
                    sigmas: Sequence[float], cfg: DecodeConfig | None = None,
                    ) -> list[tuple[Tensor, Tensor]]:
    """The candidates of :func:`decode_images` (network-input pixels) in original pixels
    (``back_transforms`` (B, 2, 3)), fused per image (:func:`fuse_batch`)."""
    return fuse_batch(input_to_image(poses, back_transforms), valid, sigmas, cfg)


def predict_poses(net: Any, images: Tensor, layout: Layout | str | None,
                  back_transforms: Tensor | np.ndarray,
                  cfg: DecodeConfig | Mapping[str, Any] | None = None,
                  ) -> list[tuple[Tensor, Tensor]]:
    """Poses of a batch of same-size images, in original-image pixels, fused (algorithm.md 5).

    Args:
        net: a ``PINet`` (anything with ``__call__(images) -> outputs dict`` and
            ``refine(features, poses, cells, batch_index)``; its ``convention`` and
            ``output_stride``, when it has them, else ``cell_center`` and 4).
        images: (B, 3, H, W) RGB, uint8 or float in 0..255, as the convention's ``resize``
            makes them (``Predictor`` does).
        layout: keypoint layout; None takes ``net.layout``.
        back_transforms: (B, 2, 3) network-input pixels -> original pixels.
        cfg: DecodeConfig or a mapping of its fields.

    Returns:
        per image: poses (F, K, 3) (x, y, keypoint score) and scores (F,), CPU float32.
    """
    cfg = DecodeConfig.from_any(cfg)
    layout = get_layout(layout if layout is not None else net.layout)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"predict_poses: images must be (B, 3, H, W), got {tuple(images.shape)}")
    back_transforms = torch.as_tensor(np.asarray(back_transforms) if not isinstance(
        back_transforms, Tensor) else back_transforms, dtype=torch.float32)
    if back_transforms.shape != (images.shape[0], 2, 3):
        raise ValueError(f"predict_poses: back_transforms must be (B, 2, 3) = "
                         f"({images.shape[0]}, 2, 3), got {tuple(back_transforms.shape)}")
    device = _device_of(net, images.device)
    images = images.to(device, non_blocking=True)
    back_transforms = back_transforms.to(device, non_blocking=True)
    with torch.inference_mode():
        poses, _, valid = decode_images(net, images, layout, cfg)
        with _full_precision(device.type):
            return fuse_candidates(poses, valid, back_transforms, layout.sigmas, cfg)
