"""Draw poses on images (skeleton lines and keypoint dots, one colour per person) and tile
several images into one picture.

Poses are ``(F, K, 3)``: ``(x, y, s)`` in image pixels, ``s`` a keypoint score (predictions)
or a visibility flag (ground truth, 0 absent). A keypoint is drawn when ``s > threshold``;
an edge when both ends are. Each person is drawn with two OpenCV calls (all its limbs, all
its dots), so drawing costs no Python loop over keypoints or edges.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pinet_lightning.core.atomic import write_bytes
from pinet_lightning.core.layouts import Layout, get_layout

__all__ = ["person_colors", "draw_poses", "make_grid", "save_image", "to_hwc_uint8"]


def person_colors(n: int, saturation: float = 0.85, value: float = 1.0) -> np.ndarray:
    """``n`` well separated RGB colours (uint8, (n, 3)): hues spaced by the golden ratio."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    hsv = np.stack([hues * 180.0, np.full(n, saturation * 255.0), np.full(n, value * 255.0)],
                   axis=-1).astype(np.uint8)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0] if n else np.zeros((0, 3), np.uint8)


def to_hwc_uint8(image: Any) -> np.ndarray:
    """A (H, W, 3) uint8 copy of ``image``: numpy or torch, HWC or CHW, uint8 or 0..255."""
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = image.transpose(1, 2, 0)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected an (H, W, 3) or (3, H, W) image, got shape "
                         f"{image.shape}")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image).copy()


def draw_poses(
    image: Any,
    poses: Any,
    layout: Layout | str | Mapping[str, Any],
    scores: Any = None,
    threshold: float = 0.2,
    min_score: float = 0.0,
    colors: np.ndarray | None = None,
    thickness: int | None = None,
    radius: int | None = None,
) -> np.ndarray:
    """Return a copy of ``image`` with ``poses`` drawn.

    Args:
        image: (H, W, 3) or (3, H, W), uint8 or float 0..255 (numpy or torch).
        poses: (F, K, 3) ``(x, y, score or visibility)`` in image pixels.
        layout: keypoint layout (its skeleton gives the lines).
        scores: (F,) pose scores; poses scoring below ``min_score`` are skipped and the
            drawing order is worst first, so the best poses end on top.
        threshold: a keypoint is drawn when its third value is above this.
        colors: (F, 3) RGB per person (default: :func:`person_colors`).
        thickness, radius: line width and dot radius (default: from the image size).
    """
    layout = get_layout(layout)
    canvas = to_hwc_uint8(image)
    if hasattr(poses, "detach"):
        poses = poses.detach().cpu().numpy()
    poses = np.asarray(poses, dtype=np.float64)
    if poses.size == 0:
        return canvas
    if poses.ndim != 3 or poses.shape[1:] != (layout.num_keypoints, 3):
        raise ValueError(f"poses must be (F, {layout.num_keypoints}, 3) for "
                         f"layout '{layout.name}', got {poses.shape}")
    n = poses.shape[0]
    order = np.arange(n)
    if scores is not None:
        if hasattr(scores, "detach"):
            scores = scores.detach().cpu().numpy()
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if scores.shape[0] != n:
            raise ValueError(f"{n} poses but {scores.shape[0]} scores")
        order = np.argsort(scores, kind="stable")
        order = order[scores[order] >= min_score]
    colors = person_colors(n) if colors is None else np.asarray(colors, dtype=np.uint8)
    side = min(canvas.shape[:2])
    thickness = thickness or max(1, int(round(side / 200)))
    radius = radius or max(2, int(round(side / 130)))
    edges = np.asarray(layout.skeleton, dtype=np.int64).reshape(-1, 2)
    shift = 2  # fixed-point bits: sub-pixel positions
    fixed = np.rint(poses[..., :2] * (1 << shift)).astype(np.int32)
    shown = (poses[..., 2] > threshold) & np.isfinite(poses[..., :2]).all(-1)
    for i in order.tolist():
        color = tuple(int(c) for c in colors[i % len(colors)])
        if len(edges):
            keep = shown[i, edges[:, 0]] & shown[i, edges[:, 1]]
            segments = fixed[i][edges[keep]]  # (E, 2, 2)
            if len(segments):
                cv2.polylines(canvas, list(segments), False, color, thickness, cv2.LINE_AA,
                              shift)
        dots = fixed[i][shown[i]]
        if len(dots):
            # a zero-length round-capped line is a filled dot: all dots in one call
            cv2.polylines(canvas, list(np.repeat(dots[:, None], 2, axis=1)), False, color,
                          2 * radius, cv2.LINE_AA, shift)
            cv2.polylines(canvas, list(np.repeat(dots[:, None], 2, axis=1)), False,
                          (255, 255, 255), max(1, radius), cv2.LINE_AA, shift)
    return canvas


def make_grid(images: Sequence[Any], columns: int | None = None, cell_size: int | None = None,
              pad: int = 4, background: int = 255) -> np.ndarray:
    """Tile images (any sizes) into one RGB picture; each is fitted into a square cell.

    Args:
        images: (H, W, 3) / (3, H, W) images.
        columns: images per row (default: about a square grid).
        cell_size: cell side in pixels (default: the largest image side, at most 512).
        pad: pixels between cells and around the grid.
    """
    tiles = [to_hwc_uint8(im) for im in images]
    if not tiles:
        raise ValueError("make_grid needs at least one image")
    n = len(tiles)
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    cell = cell_size or min(512, max(max(t.shape[:2]) for t in tiles))
    grid = np.full((rows * cell + (rows + 1) * pad, columns * cell + (columns + 1) * pad, 3),
                   background, np.uint8)
    for i, tile in enumerate(tiles):
        h, w = tile.shape[:2]
        scale = cell / max(h, w)
        nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        tile = cv2.resize(tile, (nw, nh), interpolation=interp)
        r, c = divmod(i, columns)
        y = pad + r * (cell + pad) + (cell - nh) // 2
        x = pad + c * (cell + pad) + (cell - nw) // 2
        grid[y:y + nh, x:x + nw] = tile
    return grid


def save_image(path: str | Path, image: Any) -> Path:
    """Write an RGB image (png / jpg by the suffix), whole or not at all
    (:mod:`pinet_lightning.core.atomic`: an error names the path)."""
    path = Path(path)
    try:
        ok, encoded = cv2.imencode(path.suffix or ".png",
                                   cv2.cvtColor(to_hwc_uint8(image), cv2.COLOR_RGB2BGR))
    except cv2.error:  # an extension OpenCV has no encoder for
        ok = False
    if not ok:
        raise OSError(f"could not encode {path}: unknown image suffix '{path.suffix}'")
    return write_bytes(path, encoded.tobytes())


# ---------------------------------------------------------------- learning curve
Series = tuple[Sequence[float], Sequence[float]]  # (steps, values)

_CURVE_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40),
                 (148, 103, 189), (140, 86, 75))  # RGB, one per series of a panel
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _nice_step(span: float, ticks: int = 5) -> float:
    """A 1, 2 or 5 times a power of ten close to ``span / ticks``."""
    raw = max(span, 1e-12) / ticks
    power = 10.0 ** np.floor(np.log10(raw))
    return float(power * min((1, 2, 5, 10), key=lambda m: abs(m * power - raw)))


def _tick_label(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 or value == int(value) else f"{value:g}"


def _panel(canvas: np.ndarray, box: tuple[int, int, int, int], title: str,
           series: Mapping[str, Series], x_max: float, log_y: bool,
           y_range: tuple[float, float] | None = None,
           thin: Mapping[str, Series] | None = None) -> None:
    """Draw one panel of line plots into ``canvas`` inside ``box`` (x0, y0, x1, y1):
    axes, ticks, a legend; ``thin`` series are drawn faint under the ``series`` of the same
    name (raw step values under epoch means)."""
    x0, y0, x1, y1 = box
    plot = (x0 + 62, y0 + 28, x1 - 12, y1 - 30)  # left, top, right, bottom
    cv2.putText(canvas, title, (plot[0], y0 + 18), _FONT, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    every = [np.asarray(v, float) for _, v in [*series.values(), *(thin or {}).values()]]
    lo, hi = y_range if y_range is not None else _y_limits(every, log_y)
    to_px = _Axes(plot, max(float(x_max), 1.0), lo, hi, log_y)
    _draw_axes(canvas, to_px, x0)
    _draw_series(canvas, to_px, series, thin or {})


def _y_limits(values: list[np.ndarray], log_y: bool) -> tuple[float, float]:
    """The y range of a panel: the values' range (quarter decades around them on a log axis),
    widened when flat."""
    flat = np.concatenate(values) if values else np.zeros(0)
    flat = flat[np.isfinite(flat) & ((flat > 0) if log_y else True)]
    lo, hi = (flat.min(), flat.max()) if len(flat) else (0.1, 1.0)
    if log_y:
        lo, hi = 10 ** (np.floor(np.log10(lo) * 4) / 4), 10 ** (np.ceil(np.log10(hi) * 4) / 4)
    elif hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    return float(lo), float(hi)


class _Axes:
    """Data -> pixel mapping of one panel (``plot`` = left, top, right, bottom)."""

    def __init__(self, plot: tuple[int, int, int, int], x_max: float, lo: float, hi: float,
                 log_y: bool) -> None:
        self.left, self.top, self.right, self.bottom = plot
        self.x_max, self.lo, self.hi, self.log_y = x_max, lo, hi, log_y
        self.f = np.log10 if log_y else (lambda v: np.asarray(v, float))
        self.flo, self.fhi = float(self.f(lo)), float(self.f(hi))
        if self.fhi - self.flo < 1e-12:
            self.fhi = self.flo + 1.0

    def __call__(self, xs: Any, ys: Any) -> np.ndarray:
        xs, ys = np.asarray(xs, float), np.asarray(ys, float)
        with np.errstate(divide="ignore", invalid="ignore"):
            fy = self.f(np.where(ys > 0, ys, np.nan)) if self.log_y else ys
        px = self.left + xs / self.x_max * (self.right - self.left)
        py = self.bottom - (fy - self.flo) / (self.fhi - self.flo) * (self.bottom - self.top)
        return np.stack([px, py], -1)

    def y_ticks(self) -> np.ndarray:
        """Decades (and 2, 5) on a log axis, nice steps on a linear one."""
        lo, hi = self.lo, self.hi
        if self.log_y:
            decades = 10.0 ** np.arange(np.floor(self.flo), np.ceil(self.fhi) + 1)
            ticks = (decades[:, None] * np.array([1.0, 2.0, 5.0])[None]).reshape(-1)
            if len(ticks[(ticks >= lo) & (ticks <= hi)]) > 8:
                ticks = decades
        else:
            step = _nice_step(hi - lo)
            ticks = np.arange(np.ceil(lo / step) * step, hi + step / 2, step)
        return ticks[(ticks >= lo * (1 - 1e-9)) & (ticks <= hi * (1 + 1e-9))]


def _draw_axes(canvas: np.ndarray, ax: _Axes, label_x: int) -> None:
    """Grid lines, tick labels (y labels start at ``label_x``) and the frame."""
    grey, dark = (225, 225, 225), (60, 60, 60)
    left, top, right, bottom = ax.left, ax.top, ax.right, ax.bottom
    for t in ax.y_ticks():
        py = int(round(ax([0.0], [t])[0, 1]))
        cv2.line(canvas, (left, py), (right, py), grey, 1)
        label = f"{t:.0e}" if ax.log_y and (t < 1e-3 or t >= 1e4) else _tick_label(float(t))
        cv2.putText(canvas, label, (label_x + 4, py + 4), _FONT, 0.38, dark, 1, cv2.LINE_AA)
    x_step = _nice_step(ax.x_max)
    for t in np.arange(0.0, ax.x_max + x_step / 2, x_step):
        px = int(round(left + t / ax.x_max * (right - left)))
        cv2.line(canvas, (px, top), (px, bottom), grey, 1)
        cv2.putText(canvas, _tick_label(float(t)), (px - 10, bottom + 15), _FONT, 0.38, dark, 1,
                    cv2.LINE_AA)
    cv2.putText(canvas, "step", (right - 30, bottom + 27), _FONT, 0.4, dark, 1, cv2.LINE_AA)
    cv2.rectangle(canvas, (left, top), (right, bottom), dark, 1)


def _draw_series(canvas: np.ndarray, ax: _Axes, series: Mapping[str, Series],
                 thin: Mapping[str, Series]) -> None:
    """Each series as a line with markers over its faint ``thin`` twin, and the legend."""
    shift = 2
    for i, (name, (xs, ys)) in enumerate(series.items()):
        color = _CURVE_COLORS[i % len(_CURVE_COLORS)]
        faint = tuple(int(c + (255 - c) * 0.65) for c in color)
        for (sx, sy), col, width in ((thin.get(name, ((), ())), faint, 1), ((xs, ys), color, 2)):
            pts = ax(sx, sy)
            pts = pts[np.isfinite(pts).all(-1)]
            if len(pts) == 0:
                continue
            fixed = np.rint(pts * (1 << shift)).astype(np.int32)
            if len(fixed) > 1:
                cv2.polylines(canvas, [fixed], False, col, width, cv2.LINE_AA, shift)
            if width > 1:  # markers show single points and where the values were read
                cv2.polylines(canvas, list(np.repeat(fixed[:, None], 2, axis=1)), False, col,
                              5, cv2.LINE_AA, shift)
        ly = ax.top + 14 + 16 * i
        cv2.line(canvas, (ax.right - 130, ly - 4), (ax.right - 110, ly - 4), color, 2,
                 cv2.LINE_AA)
        last = np.asarray(ys, float)
        text = f"{name} {last[-1]:.3g}" if len(last) else name
        cv2.putText(canvas, text, (ax.right - 104, ly), _FONT, 0.4, (0, 0, 0), 1, cv2.LINE_AA)


def learning_curve_figure(losses: Mapping[str, Series], metrics: Mapping[str, Series],
                          step_losses: Mapping[str, Series] | None = None,
                          title: str = "", size: tuple[int, int] = (900, 680)) -> np.ndarray:
    """A two-panel RGB picture of a training run against the global step: the training
    losses (log scale; ``losses`` epoch means drawn bold over the faint per-step values of
    ``step_losses`` of the same names) above, the validation metrics (0 to 1) below.
    Every series is ``(steps, values)``; the legend shows each series' last value."""
    width, height = size
    canvas = np.full((height, width, 3), 255, np.uint8)
    every = [np.asarray(s, float) for s, _ in [*losses.values(), *metrics.values(),
                                               *(step_losses or {}).values()]]
    steps = np.concatenate(every) if every else np.zeros(0)
    x_max = float(steps.max()) if len(steps) else 1.0
    if title:
        cv2.putText(canvas, title, (10, 20), _FONT, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    split = 28 + (height - 28) * 11 // 20
    _panel(canvas, (0, 28, width, split), "training losses (bold: epoch mean, faint: steps)",
           losses, x_max, log_y=True, thin=step_losses)
    _panel(canvas, (0, split, width, height), "validation", metrics, x_max, log_y=False,
           y_range=(0.0, 1.0))
    return canvas
