"""Image files and image geometry shared by training and inference.

- Reading: :func:`read_image` (RGB uint8), with the start-up check of every training /
  evaluation image (:func:`check_image_files`: missing, empty (0 bytes), folders, truncated
  JPEGs). EXIF orientation (a phone photo stored sideways with an ``Orientation`` tag): the
  datasets read the stored pixels, as COCO-format annotations are made on them (the image
  records' width and height are the stored ones, and the published PINet reads its training
  and test images with ``IMREAD_IGNORE_ORIENTATION``); inference on a file
  (``read_image(path, orientation=True)``: the Predictor, ``pinet-predict``) reads the
  displayed image, so that the keypoints are in the frame the user sees.
- Resizing, with the pixel-center convention (pixel ``(i, j)`` has coordinate ``(i, j)``, so
  a resize by ``s`` maps ``x -> (x + 0.5) s - 0.5``, what ``cv2.resize`` does):
  :func:`inference_resize` (algorithm.md 5.1, our convention's network input) and
  :func:`fit_short_side` (the first step of the training augmentation).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import cv2
import numpy as np

__all__ = ["read_image", "image_file_problem", "check_image_files", "check_image",
           "inference_resize", "fit_short_side"]

log = logging.getLogger(__name__)


def read_image(path: str | Path, orientation: bool = False) -> np.ndarray:
    """RGB uint8 (H, W, 3).

    ``orientation``: False (training and evaluation data) ignores the EXIF orientation: the
    stored pixels, which COCO-format annotations refer to; True (inference) applies it: the
    image as a viewer displays it (rotated / mirrored as its ``Orientation`` tag says).

    A folder, a missing or empty file, a truncated JPEG (OpenCV would fill the missing part
    with gray and only print a warning) and an undecodable file are errors naming the file.
    """
    path = Path(path)
    problem = image_file_problem(path, full=True)
    if problem is not None:
        raise _image_error(path, problem)
    data = np.frombuffer(path.read_bytes(), np.uint8)
    flags = cv2.IMREAD_COLOR if orientation else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        image = cv2.imdecode(data, flags)
    except cv2.error:  # OpenCV asserts on some damaged files instead of returning None
        image = None
    if image is None or image.size == 0:
        raise OSError(f"cannot decode image {path}: the file is corrupt or not an image; "
                      "replace it or remove it from the annotation file")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _image_error(path: Path, problem: str) -> OSError:
    if problem == "missing":
        return FileNotFoundError(f"image {path} does not exist; check the images folder")
    if problem == "folder":
        return IsADirectoryError(f"image {path} is a folder, not an image file")
    if problem == "empty":
        return OSError(f"image {path} is empty (0 bytes): an interrupted download or copy? "
                       "replace it, or set data.skip_invalid=true to skip it")
    return OSError(f"image {path} is a truncated JPEG ({problem}): the file was cut short "
                   "(an interrupted download or copy?); replace it, or set "
                   "data.skip_invalid=true to skip it")


def _jpeg_truncation(data: bytes) -> str | None:
    """Why a JPEG byte string is cut short, or None when it is whole (or not a JPEG).

    The marker segments are walked to the first scan (SOS); the image is whole when an
    end-of-image marker (FF D9) follows it. Inside scan data FF is always followed by 00 or
    a restart marker, so an FF D9 there is the real end; data after it (a motion photo's
    video, padding) is allowed.
    """
    if data[:2] != b"\xff\xd8":
        return None
    pos, n = 2, len(data)
    while True:
        if pos + 4 > n:
            return "it ends inside its header"
        if data[pos] != 0xFF:
            return None  # not a marker: left to the decoder
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0xDA:  # start of scan
            break
        elif marker == 0xD9:  # an end before any image data: left to the decoder
            return None
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    if data.rfind(b"\xff\xd9") < pos:
        return "no end-of-image marker after its image data"
    return None


def image_file_problem(path: Path, full: bool = False) -> str | None:
    """``"missing"``, ``"folder"``, ``"empty"`` (0 bytes), why a JPEG is truncated, or None
    when the file looks whole. ``full=False`` (the start-up check of every image) reads the
    first and last bytes, and the whole file only when these do not end the image."""
    if not path.is_file():
        return "folder" if path.is_dir() else "missing"
    with open(path, "rb") as f:
        head = f.read(2)
        if not head:
            return "empty"
        if head != b"\xff\xd8":
            return None  # not a JPEG: the decoder finds other damage
        if not full:
            f.seek(0, 2)
            f.seek(max(f.tell() - 64, 0))
            if f.read().rstrip(b"\x00").endswith(b"\xff\xd9"):  # the common case
                return None
        f.seek(0)
        return _jpeg_truncation(f.read())


def check_image_files(images_dir: Path, records: list[dict], source: str | Path,
                      skip_invalid: bool = False) -> set[int]:
    """Ids of the image records whose files are missing, folders or truncated JPEGs: an
    error naming them (and the fix) unless ``skip_invalid``, then logged and returned."""
    found: dict[str, list[tuple[int, str]]] = {}
    for info in records:
        problem = image_file_problem(images_dir / info["file_name"])
        if problem is not None:
            kind = {"missing": "missing", "folder": "folder",
                    "empty": "empty file (0 bytes)"}.get(problem, "truncated JPEG")
            found.setdefault(kind, []).append((info["id"], info["file_name"]))
    if not found:
        return set()
    lines = [f"  {len(v)} {kind} (image id file): "
             + ", ".join(f"{i} {name}" for i, name in v[:5])
             + (f" and {len(v) - 5} more" if len(v) > 5 else "") for kind, v in found.items()]
    if not skip_invalid:
        raise FileNotFoundError(
            f"{source}: image files under {images_dir} that cannot be used:\n"
            + "\n".join(lines) + "\nfix the images folder (data.<split>.images) or the files, "
            "or set data.skip_invalid=true to skip these images"
        )
    log.warning("%s: skipped %d images whose files cannot be used (data.skip_invalid):\n%s",
                source, sum(len(v) for v in found.values()), "\n".join(lines))
    return {i for v in found.values() for i, _ in v}


def _resize_matrix(sx: float, sy: float) -> np.ndarray:
    """2x3 affine of ``cv2.resize`` by (sx, sy) in pixel-center coordinates."""
    return np.array([[sx, 0.0, 0.5 * (sx - 1.0)], [0.0, sy, 0.5 * (sy - 1.0)]])


def _invert(m: np.ndarray) -> np.ndarray:
    return cv2.invertAffineTransform(np.asarray(m, dtype=np.float64))


def _resize(image: np.ndarray, width: int, height: int, interp: int | None = None) -> np.ndarray:
    if interp is None:  # area averaging when shrinking avoids aliasing
        interp = cv2.INTER_AREA if width < image.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interp)


def check_image(image: np.ndarray, where: str) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        got = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"{where}: expected an (H, W, 3) numpy image, got {got}")


def inference_resize(
    image: np.ndarray, input_size: int = 512, multiple: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Resize for inference (algorithm.md 5.1).

    Returns the network input (H', W', 3), both sides multiples of ``multiple`` (short side
    ``input_size`` rounded up), and the float64 2x3 affine mapping network-input pixels back to
    original pixels. The content fills the top-left ``round(w s) x round(h s)``; the rest is 0.
    """
    check_image(image, "inference_resize")
    if input_size < 1 or multiple < 1:
        raise ValueError(f"input_size and multiple must be positive ({input_size}, {multiple})")
    h, w = image.shape[:2]
    scale = input_size / min(h, w)
    cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
    out_w = math.ceil(cw / multiple) * multiple
    out_h = math.ceil(ch / multiple) * multiple
    resized = _resize(image, cw, ch)
    if (out_h, out_w) != (ch, cw):
        canvas = np.zeros((out_h, out_w, 3), dtype=image.dtype)
        canvas[:ch, :cw] = resized
        resized = canvas
    # cv2.resize scales each axis by the integer size ratio, not exactly by ``scale``
    back = _invert(_resize_matrix(cw / w, ch / h))
    return resized, back


def fit_short_side(image: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize so the short side is ``size`` (aspect kept); returns the image and the forward
    2x3 affine original px -> resized px."""
    h, w = image.shape[:2]
    scale = size / min(h, w)
    cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
    return _resize(image, cw, ch), _resize_matrix(cw / w, ch / h)
