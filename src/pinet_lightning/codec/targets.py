"""PINet training targets (algorithm.md 2): the codec the data loader workers run per sample.

Everything is in output cells after augmentation, with the pixel-center convention of
docs/architecture.md (cell ``(i, j)`` sits at coordinate ``(i, j)``). Choices the paper leaves
open, fixed here and tested in tests/test_targets.py:

- A keypoint counts when ``v > 0`` and it lies inside the map, ``0 <= x < W`` and
  ``0 <= y < H`` (NaN coordinates never count).
- Gaussian window (the published generator's): the cells ``(i, j)`` with
  ``|i - x| < 3 sigma + 2`` and ``|j - y| < 3 sigma + 2`` (strictly; ``window_sigmas`` = 3,
  ``window_margin`` = 2 cells: 15 cells a side for an integer point at sigma 2, 16 otherwise),
  clipped to the map. Inside it the value is ``exp(-((i - x)^2 + (j - y)^2) / (2 sigma^2))``
  at the exact sub-cell point; people combine by maximum. The loss mask is 1 on the union of
  windows.
- Part center (default, algorithm.md 2.2 and the published code): mean of the part's keypoints with
  ``v > 0``, in the map or not. As the published generators: it writes offsets when
  ``int(cx)``, ``int(cy)`` (truncation toward zero) fall inside the map, and its Gaussian
  only when ``0 <= cx < W`` and ``0 <= cy < H``; so a center at ``x = -0.2`` claims the
  offset cells 0 and 1 but draws no part Gaussian (its cells then score 0 as proposals).
  ``part_center_in_map=True`` (codec.targets.part_center_in_map) averages the keypoints that
  count (``v > 0`` *and* inside the map) instead: keypoints outside the map have no heatmap
  and no offset target, and a center built from them can leave the map (then the part
  writes nothing although some of its keypoints are visible) or sit far from what the
  network sees; the mean of in-map points is always in the map.
- Offsets: for a center ``(cx, cy)`` the cells ``int(cx) - r <= i < int(cx) + r``,
  ``int(cy) - r <= j < int(cy) + r`` (``int`` truncates toward zero, algorithm.md 2.4), clipped.
  Where several people claim one cell and channel the smaller box area keeps it; equal
  areas go to the lower person index (deterministic, independent of numpy's write order).
- Offset weights ``1 / sqrt(max(area, 1))``: the clamp keeps degenerate boxes finite.

Sparse forms (what the loader workers send by default, ``codec.sparse``): Omega's
entries instead of the dense offsets and weights (``offsets_format="omega"``), and each
Gaussian as its window's two 1-D factors instead of the four heatmap maps
(``heatmaps_format="windows"``); their size against the dense maps: scripts/bench_loader.py.
The torch half of this module reads a collated sparse batch on the device:
:func:`heatmap_targets` renders the heatmaps (the float32 products and maxima of the dense
encoder, so bit for bit the same maps) and :class:`OmegaBatch` serves the offset loss and
the proposal sampling, with static shapes (no host sync).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from pinet_lightning.core.layouts import Layout, get_layout

__all__ = [
    "encode_targets",
    "densify_offsets",
    "PINetTargetCodec",
    "part_centers",
    "TARGET_KEYS",
]

TARGET_KEYS: tuple[str, ...] = (
    "heatmaps",
    "heatmap_mask",
    "part_heatmaps",
    "part_mask",
    "offsets",
    "offset_weights",
)


def _check_inputs(
    keypoints: np.ndarray,
    areas: np.ndarray | None,
    layout: Layout,
    output_size: tuple[int, int],
    ignore_mask: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, int, int, np.ndarray | None]:
    k = layout.num_keypoints
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.size == 0:
        kp = kp.reshape(0, k, 3)
    if kp.ndim != 3 or kp.shape[1:] != (k, 3):
        raise ValueError(
            f"keypoints must have shape (N, {k}, 3) = (x, y, v) in output cells for "
            f"layout '{layout.name}', got {kp.shape}; pass one row per person, or check that "
            "the dataset's layout matches its annotations"
        )
    ar = np.zeros(kp.shape[0]) if areas is None else np.asarray(areas, np.float64).reshape(-1)
    if ar.shape[0] != kp.shape[0]:
        raise ValueError(
            f"got {kp.shape[0]} people but {ar.shape[0]} areas; pass one box area "
            "(in input pixels) per person"
        )
    if not np.isfinite(ar).all():
        raise ValueError(f"areas must be finite, got {ar[~np.isfinite(ar)][:3]}; "
                         "check the boxes given to the augmentation")
    try:
        height, width = (int(s) for s in output_size)
    except (TypeError, ValueError):
        raise ValueError(
            f"output_size must be (H, W), got {output_size!r}"
        ) from None
    if height <= 0 or width <= 0:
        raise ValueError(f"output_size must be positive, got {(height, width)}")
    mask = None
    if ignore_mask is not None:
        mask = np.asarray(ignore_mask, dtype=np.float32)
        if mask.shape != (height, width):
            raise ValueError(
                f"ignore_mask must have the output shape {(height, width)} "
                f"(0 = ignore), got {mask.shape}; resize it to the output map first"
            )
    return kp, ar, height, width, mask


def _check_settings(sigma: float, radius: int, bg_weight: float, window_sigmas: float,
                    window_margin: float, offsets_format: str, heatmaps_format: str) -> None:
    """The target settings' checks, shared by :func:`encode_targets` and the codec."""
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if not window_sigmas > 0:
        raise ValueError(f"window_sigmas must be positive, got {window_sigmas}")
    if not window_margin >= 0:
        raise ValueError(f"window_margin must be >= 0 cells, got {window_margin}")
    if int(radius) != radius or radius < 1:
        raise ValueError(f"radius must be a positive integer, got {radius}")
    if offsets_format not in ("dense", "omega"):
        raise ValueError(f"offsets_format must be 'dense' or 'omega', "
                         f"got {offsets_format!r}")
    if heatmaps_format not in ("dense", "windows"):
        raise ValueError(f"heatmaps_format must be 'dense' or 'windows', "
                         f"got {heatmaps_format!r}")
    if not 0.0 <= bg_weight <= 1.0:
        raise ValueError(f"bg_weight must be in [0, 1], got {bg_weight}")


def _counting(kp: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, K) bool: v > 0 and inside [0, W) x [0, H) (False for NaN)."""
    x, y, v = kp[..., 0], kp[..., 1], kp[..., 2]
    return (v > 0) & (x >= 0) & (x < width) & (y >= 0) & (y < height)


def part_centers(
    keypoints: np.ndarray,
    layout: Layout | str | Mapping[str, Any],
    output_size: tuple[int, int],
    in_map: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Part centers ``(N, P, 2)`` and whether each exists ``(N, P)`` bool.

    A center is the mean of the part's keypoints with ``v > 0`` (and inside the map when
    ``in_map``); a part with none of them has no center, and a center counts when
    ``int(cx)``, ``int(cy)`` (truncation toward zero) fall inside the map.
    """
    layout = get_layout(layout)
    kp, _, height, width, _ = _check_inputs(keypoints, None, layout, output_size, None)
    use = _counting(kp, height, width) if in_map else kp[..., 2] > 0
    return _part_centers(kp, layout, height, width, use)


@lru_cache(maxsize=32)
def _part_membership(layout: Layout) -> np.ndarray:
    """(P, K) 0/1 table: which keypoints make up each part."""
    member = np.zeros((layout.num_parts, layout.num_keypoints), dtype=np.float64)
    for p, part in enumerate(layout.parts):  # P is 3: building a tiny table once per layout
        member[p, list(part)] = 1.0
    member.flags.writeable = False
    return member


def _part_centers(
    kp: np.ndarray, layout: Layout, height: int, width: int, use: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Centers (N, P, 2) of the keypoints flagged in ``use`` (N, K) and whether each exists
    (at least one keypoint, ``int()`` of the center inside the map)."""
    member = _part_membership(layout)  # (P, K)
    xy = np.where(use[..., None], kp[..., :2], 0.0)  # NaN-safe: unused points are zeroed
    total = member @ xy  # (N, P, 2)
    count = use @ member.T  # (N, P)
    centers = total / np.maximum(count, 1.0)[..., None]
    # int() truncates toward zero: a center at x = -0.2 is on cell 0 (the published rule)
    cx, cy = np.trunc(centers[..., 0]), np.trunc(centers[..., 1])
    exists = (count > 0) & (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
    return centers, exists


def _gaussian_windows(
    xy: np.ndarray,
    sigma: float,
    height: int,
    width: int,
    window_sigmas: float = 3.0,
    window_margin: float = 2.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Gaussian window of each point ``xy`` (M, 2), clipped to the map, in separable form.

    Returns ``first`` (M, 2) int32, the first window cell on the map (x, then y);
    ``length`` (M, 2) int32, how many cells follow it (L at most); ``gauss`` (M, 2, L)
    float32, the 1-D factors ``exp(-(c - x)^2 / 2 sigma^2)`` at cells ``first + 0..L-1``
    (0 past ``length``). The window's value at cell (i, j) is ``gauss_y[j] * gauss_x[i]``
    in float32: the dense encoder and :func:`render_windows` both compute exactly that.
    """
    reach = window_sigmas * sigma + window_margin  # the window: cells strictly closer
    size = max(int(np.ceil(2.0 * reach)), 1)  # most cells a window spans along one axis
    start = np.floor(xy - reach).astype(np.int64) + 1  # (M, 2) first cell of the window
    stop = np.ceil(xy + reach).astype(np.int64) - 1  # (M, 2) last cell (inclusive)
    first = np.maximum(start, 0)
    last = np.minimum(stop, np.array([width - 1, height - 1]))
    length = np.clip(last - first + 1, 0, size)
    cells = first[:, :, None] + np.arange(size)  # (M, 2, L): x cells, then y cells
    # exp(-d^2 / 2 sigma^2) separates into an x factor times a y factor.
    gauss = np.exp(-((cells - xy[:, :, None]) ** 2) / (2.0 * sigma**2)).astype(np.float32)
    gauss[np.arange(size) >= length[:, :, None]] = 0.0
    return first.astype(np.int32), length.astype(np.int32), gauss


def _draw_windows(
    heat: np.ndarray,
    window: np.ndarray,
    first: np.ndarray,
    length: np.ndarray,
    gauss: np.ndarray,
    channel: np.ndarray,
    height: int,
    width: int,
) -> None:
    """Max-combine the windows of :func:`_gaussian_windows` into ``heat`` and set ``window``
    to 1 on them, in place. ``heat``/``window`` are flat float32 (C * H * W + 1,) buffers
    whose last entry is a dump slot for the cells outside a window; ``channel`` (M,)."""
    if not len(first):
        return
    dump = heat.size - 1
    steps = np.arange(gauss.shape[-1])
    inside = steps < length[:, :, None]  # (M, 2, L)
    cols = first[:, 0, None] + steps  # (M, L)
    rows = (channel[:, None] * height + first[:, 1, None] + steps) * width  # (M, L)
    flat = np.where(inside[:, 1, :, None] & inside[:, 0, None, :],
                    rows[:, :, None] + cols[:, None, :], dump)
    values = gauss[:, 1, :, None] * gauss[:, 0, None, :]  # (M, L rows, L cols) float32
    np.maximum.at(heat, flat.ravel(), values.ravel())
    window[flat.ravel()] = 1.0


def encode_targets(
    keypoints: np.ndarray,
    areas: np.ndarray,
    layout: Layout | str | Mapping[str, Any],
    output_size: tuple[int, int],
    sigma: float = 2.0,
    radius: int = 2,
    bg_weight: float = 0.1,
    ignore_mask: np.ndarray | None = None,
    min_part_area: float = 0.0,
    part_center_in_map: bool = False,
    offsets_format: str = "dense",
    window_sigmas: float = 3.0,
    window_margin: float = 2.0,
    heatmaps_format: str = "dense",
) -> dict[str, np.ndarray]:
    """Build PINet's training targets for one sample (algorithm.md 2).

    Args:
        keypoints: (N, K, 3) ``(x, y, v)`` in output cells.
        areas: (N,) person box areas in input pixels (offset weights, conflicts,
            ``min_part_area``).
        layout: the keypoint layout (name, mapping or :class:`Layout`).
        output_size: (H, W) of the output maps.
        sigma: Gaussian standard deviation in cells.
        radius: half-size r of the 2r x 2r offset square around each part center.
        bg_weight: heatmap-loss weight outside every Gaussian window.
        ignore_mask: (H, W), 0 where the heatmap losses ignore the image (crowd regions).
        min_part_area: people with a smaller box area get no part centers (COCO: 32**2).
        part_center_in_map: centers from in-map keypoints only (see the module docstring;
            False, algorithm.md 2.2: every ``v > 0`` keypoint of the part).
        offsets_format: ``"dense"`` (the contract) or ``"omega"``: instead of ``offsets``
            and ``offset_weights``, the entries of Omega alone, ``omega_index`` (E,) int64
            ascending into the flattened (P*K, H, W) (channel pair ``p * K + k``, row,
            column), ``omega_offsets`` (E, 2) float32 (x, y) and ``omega_weights`` (E,)
            float32 (sizes: scripts/bench_loader.py); :func:`densify_offsets` rebuilds the
            dense pair.
        window_sigmas, window_margin: the Gaussian windows hold the cells strictly closer
            than ``window_sigmas * sigma + window_margin`` on each axis (algorithm.md 2.1: the
            published generator's 3 sigma + 2 cells).
        heatmaps_format: ``"dense"`` (the contract) or ``"windows"``: instead of the four
            heatmap keys, one Gaussian window per counting keypoint and drawn part center:
            ``window_channel`` (M,) int32 (keypoint k, or K + part), ``window_first`` (M, 2)
            and ``window_length`` (M, 2) int32 (the window's cells on the map, x then y),
            ``window_gauss`` (M, 2, L) float32 (the x and y factors), ``ignore_mask`` (H, W)
            uint8 (0/1; other values are refused) and ``bg_weight`` () float32;
            :func:`heatmap_targets` renders the dense maps from them.
            Either sparse form adds ``target_shape`` (4,) int64 = (K, P, H, W).

    Returns:
        float32 ``heatmaps`` (K,H,W), ``heatmap_mask`` (K,H,W), ``part_heatmaps`` (P,H,W),
        ``part_mask`` (P,H,W), ``offsets`` (P*K*2,H,W) and ``offset_weights`` (P*K*2,H,W),
        offset channel ``(p * K + k) * 2 + c``; keypoint = cell - offset. The keypoint and
        part maps are views of one (K+P, H, W) block each (one Gaussian pass for both).
    """
    layout = get_layout(layout)
    _check_settings(sigma, radius, bg_weight, window_sigmas, window_margin, offsets_format,
                    heatmaps_format)
    radius = int(radius)
    kp, ar, height, width, mask = _check_inputs(keypoints, areas, layout, output_size, ignore_mask)
    k, p = layout.num_keypoints, layout.num_parts

    # Gaussians: counting keypoints into channels 0..K-1, part centers into K..K+P-1.
    valid = _counting(kp, height, width)  # (N, K)
    vn, vk = np.nonzero(valid)
    use = valid if part_center_in_map else kp[..., 2] > 0
    centers, has_center = _part_centers(kp, layout, height, width, use)
    has_center &= (ar >= min_part_area)[:, None]
    cn, cp = np.nonzero(has_center)  # (C,) person and part of each center
    center_xy = centers[cn, cp]
    # The part Gaussian needs the center itself in the map (offsets only its int() cell).
    drawn = (center_xy[:, 0] >= 0) & (center_xy[:, 0] < width) & (center_xy[:, 1] >= 0) & (
        center_xy[:, 1] < height)
    xy = np.concatenate([kp[vn, vk, :2], center_xy[drawn]]).reshape(-1, 2)
    channel = np.concatenate([vk, k + cp[drawn]])
    first, length, gauss = _gaussian_windows(xy, sigma, height, width, window_sigmas,
                                             window_margin)
    out: dict[str, np.ndarray] = {}
    if heatmaps_format == "windows":
        if mask is None:
            ignore = np.ones((height, width), np.uint8)
        elif ((mask == 0) | (mask == 1)).all():
            ignore = mask.astype(np.uint8)
        else:
            raise ValueError("heatmaps_format='windows' carries the ignore mask as "
                             "0/1 bytes, but it holds other values; threshold it first "
                             "(0 = ignore, 1 = keep) or use heatmaps_format='dense'")
        out.update(window_channel=channel.astype(np.int32), window_first=first,
                   window_length=length, window_gauss=gauss, ignore_mask=ignore,
                   bg_weight=np.array(bg_weight, np.float32))
    else:
        hw = height * width
        heat = np.zeros((k + p) * hw + 1, dtype=np.float32)
        loss_mask = np.full((k + p) * hw + 1, bg_weight, dtype=np.float32)
        _draw_windows(heat, loss_mask, first, length, gauss, channel, height, width)
        heat = heat[:-1].reshape(k + p, height, width)
        loss_mask = loss_mask[:-1].reshape(k + p, height, width)
        if mask is not None:
            loss_mask *= mask
        out.update(heatmaps=heat[:k], heatmap_mask=loss_mask[:k], part_heatmaps=heat[k:],
                   part_mask=loss_mask[k:])

    at_pair, offset_xy, offset_w = _offset_claims(
        kp, ar, valid, cn, cp, center_xy, k, height, width, radius
    )
    if offsets_format == "omega":
        out.update(omega_index=at_pair, omega_offsets=offset_xy, omega_weights=offset_w)
    else:
        out["offsets"], out["offset_weights"] = densify_offsets(
            at_pair, offset_xy, offset_w, (p * k * 2, height, width)
        )
    if offsets_format == "omega" or heatmaps_format == "windows":
        out["target_shape"] = np.array([k, p, height, width], np.int64)
    return out


def _offset_claims(
    kp: np.ndarray,
    ar: np.ndarray,
    valid: np.ndarray,
    cn: np.ndarray,
    cp: np.ndarray,
    center_xy: np.ndarray,
    k: int,
    height: int,
    width: int,
    radius: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Omega: flat index into (P*K, H, W), offsets (E, 2) and weights (E,) of the winning
    claims. Every (center, cell of its 2r x 2r square, counting keypoint) is a claim."""
    if not len(cn):
        return np.zeros(0, np.int64), np.zeros((0, 2), np.float32), np.zeros(0, np.float32)
    hw = height * width
    # Centers go in priority order (smaller area, then lower person index): sorting the
    # claims by (destination, center rank) puts each destination's winner first.
    rank = np.lexsort((cn, ar[cn]))
    cn, cp, center_xy = cn[rank], cp[rank], center_xy[rank]
    side = np.arange(2 * radius)
    corner = np.trunc(center_xy).astype(np.int64) - radius  # (C, 2), int() of algorithm.md 2.4
    ci = corner[:, 0:1] + side  # (C, 2r) cell columns
    cj = corner[:, 1:2] + side  # (C, 2r) cell rows
    claim = (
        ((cj >= 0) & (cj < height))[:, :, None, None]
        & ((ci >= 0) & (ci < width))[:, None, :, None]
        & valid[cn][:, None, None, :]
    )  # (C, rows, cols, K)
    pair = cp[:, None] * k + np.arange(k)  # (C, K) channel pair p * K + k
    at = (pair[:, None, None, :] * hw + cj[:, :, None, None] * width) + ci[:, None, :, None]
    num = len(cn)
    key = np.sort((at * num + np.arange(num)[:, None, None, None])[claim])
    at, c = np.divmod(key, num)
    first = np.ones(len(key), dtype=bool)
    first[1:] = at[1:] != at[:-1]
    at, c = at[first], c[first]
    cell, kk = at % hw, (at // hw) % k
    person = cn[c]
    xy = np.stack([cell % width, cell // width], -1) - kp[person, kk, :2]  # cell - keypoint
    w = 1.0 / np.sqrt(np.maximum(ar[person], 1.0))
    return at, xy.astype(np.float32), w.astype(np.float32)


def densify_offsets(
    omega_index: np.ndarray,
    omega_offsets: np.ndarray,
    omega_weights: np.ndarray,
    shape: tuple[int, int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Dense ``offsets`` and ``offset_weights`` (P*K*2, H, W) float32 from the Omega form of
    :func:`encode_targets` (``offsets_format="omega"``)."""
    channels, height, width = shape
    hw = height * width
    offsets = np.zeros(channels * hw, dtype=np.float32)
    weights = np.zeros(channels * hw, dtype=np.float32)
    index = np.asarray(omega_index, dtype=np.int64)
    at_x = index + (index // hw) * hw  # channel pair c -> x channel 2c; y is one plane on
    offsets[at_x] = omega_offsets[:, 0]
    offsets[at_x + hw] = omega_offsets[:, 1]
    weights[at_x] = omega_weights
    weights[at_x + hw] = omega_weights
    return offsets.reshape(shape), weights.reshape(shape)


@dataclass(frozen=True)
class PINetTargetCodec:
    """Holds the target settings so a dataset keeps one object (mmpose-codec style).

    ``layout`` may be a name or mapping; it is resolved to a :class:`Layout`. ``output_size``
    is (H, W) or one int for a square map.
    """

    layout: Layout | str | Mapping[str, Any]
    output_size: tuple[int, int] | int
    sigma: float = 2.0
    radius: int = 2
    bg_weight: float = 0.1
    min_part_area: float = 0.0
    part_center_in_map: bool = False
    offsets_format: str = "dense"
    window_sigmas: float = 3.0
    window_margin: float = 2.0
    heatmaps_format: str = "dense"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layout", get_layout(self.layout))
        size = self.output_size
        size = (int(size), int(size)) if np.isscalar(size) else tuple(int(s) for s in size)
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"output_size must be (H, W) > 0, got {self.output_size}")
        object.__setattr__(self, "output_size", size)
        _check_settings(self.sigma, self.radius, self.bg_weight, self.window_sigmas,
                        self.window_margin, self.offsets_format, self.heatmaps_format)

    def encode(
        self, keypoints: np.ndarray, areas: np.ndarray, ignore_mask: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """:func:`encode_targets` with this codec's settings."""
        return encode_targets(
            keypoints,
            areas,
            self.layout,
            self.output_size,
            sigma=self.sigma,
            radius=self.radius,
            bg_weight=self.bg_weight,
            ignore_mask=ignore_mask,
            min_part_area=self.min_part_area,
            part_center_in_map=self.part_center_in_map,
            offsets_format=self.offsets_format,
            window_sigmas=self.window_sigmas,
            window_margin=self.window_margin,
            heatmaps_format=self.heatmaps_format,
        )
