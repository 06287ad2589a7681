"""COCO-format keypoint datasets (any layout) for training and evaluation.

Train mode returns the training sample of docs/architecture.md: ``image`` uint8 (3, S, S)
after :class:`~pinet_lightning.data.augmentation.TrainAugmentation` and the PINet targets its
codec (:class:`~pinet_lightning.codec.codec.PINetCodec`) encodes in the loader worker: the
sparse form by default (Omega's entries and the Gaussian windows), the six dense maps with
``codec.sparse=false``. Eval mode returns ``image`` uint8 (3, H, W) resized as the codec's
convention says, ``back_transform`` (2, 3), ``image_id`` and ``orig_size`` (h, w).

Choices:

- The codec takes the augmented keypoints and ignore mask in input pixels to output cells
  (its convention; the mask shrunk by area averaging).
- The areas handed to the codec are person box areas (``bbox`` w x h; the keypoint hull
  where a box is missing) times the determinant of the augmentation.
- People (algorithm.md 2.0, the published dataset; :mod:`pinet_lightning.core.people` owns the
  rule): every annotation that is not a crowd region, plus crowd regions whose stored
  ``num_keypoints`` is above 0 (CrowdPose's counts its 12 body joints, not head and neck: a
  crowd region with only those two labelled is not a person). A file without the field
  counts the keypoints with v > 0 instead.
- Ignore mask (0 = ignore), ``ignore_regions=True`` (COCO): crowd regions (``iscrowd`` 1)
  and annotations with ``num_keypoints`` 0, from their segmentation (RLE or polygons,
  pycocotools) or, without one, their box. CrowdPose and OCHuman have none (the default).
  The padding the augmentation brings in is ignored too (``augmentation.ignore_padding``).
  The mask is warped with the image and shrunk to the output size by area averaging: a
  cell is ignored when at least half of its pixels are, kept only when more than half are
  kept (the published ``> 0.5`` on the warped mask).
- Train mode keeps every image with at least one annotation (CrowdPose, OCHuman), or with
  ``min_image_keypoints=n`` those whose annotations' ``num_keypoints`` sum to more than n
  (COCO: 10). Eval mode keeps every image.
- The annotation file goes through :func:`~pinet_lightning.core.annotations.validate_coco_keypoints`
  when the dataset is built (only the person category is kept, boxes are derived where
  absent), and every image file it will read is checked then too (present, not a folder, a
  JPEG not cut short): bad data stops the run before training, naming file, ids and fix;
  ``skip_invalid=True`` skips it with a logged count and ids instead.

Where each dataset's files sit in its official release is written once, in the config that
reads them (conf/data/<dataset>.yaml).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from pinet_lightning.codec.codec import PINetCodec
from pinet_lightning.core.annotations import load_json, validate_coco_keypoints
from pinet_lightning.core.images import check_image_files, image_file_problem, read_image
from pinet_lightning.core.layouts import Layout
from pinet_lightning.core.people import is_crowd, is_person, num_keypoints
from pinet_lightning.data.augmentation import TrainAugmentation

__all__ = ["CocoKeypointDataset", "read_image", "check_image_files", "image_file_problem"]

log = logging.getLogger(__name__)

def _load_coco(annotation_file: Path, layout: Layout | None = None,
               skip_invalid: bool = False) -> COCO:
    """The annotation file read, validated (:mod:`pinet_lightning.core.annotations`) and indexed;
    the validation report is kept as ``coco.validation``."""
    data = load_json(annotation_file, "annotation file")
    hint = ""
    if layout is not None:
        hint = (f"The layout is '{layout.name}': choose the matching one with the top-level "
                "override layout=crowdpose (14 keypoints) or layout=coco / layout=ochuman "
                "(17), or describe yours in conf/layout/ and pass layout=<its name>")
    clean, report = validate_coco_keypoints(
        data, annotation_file, num_keypoints=None if layout is None else layout.num_keypoints,
        skip_invalid=skip_invalid, count_hint=hint)
    coco = COCO()
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.dataset = clean
        coco.createIndex()
    coco.validation = report  # type: ignore[attr-defined]
    return coco


class CocoKeypointDataset(Dataset):
    """A COCO keypoint file read with pycocotools, for any layout.

    Args:
        images_dir: folder the ``file_name`` of each image is relative to.
        annotation_file: COCO keypoint json.
        codec: the frame and the targets (:class:`~pinet_lightning.codec.codec.PINetCodec`,
            or a mapping of its fields): layout (its keypoint count must match the file),
            input size S (the square training input, the inference short side), output
            stride, cell/pixel convention and target settings.
        train: training samples (augmentation + targets) or evaluation samples.
        augmentation: ``max_rotation``, ``min_scale``, ``max_scale``, ``max_translate``,
            ``flip_prob``, ``ignore_padding``.
        multiple: the inference long side is rounded up to a multiple of this.
        ignore_regions: the heatmap loss ignores crowd regions and people without keypoints
            (COCO); False: no ignore mask besides the padding (CrowdPose, OCHuman).
        min_image_keypoints: train on an image when its annotations' labelled keypoints sum
            to more than this (COCO: 10); None: every image with an annotation.
        skip_invalid: invalid records and unusable image files (see
            :mod:`pinet_lightning.core.annotations`) are skipped with a logged count and ids
            instead of raising.
    """

    def __init__(
        self,
        images_dir: str | Path,
        annotation_file: str | Path,
        codec: PINetCodec | Mapping[str, Any] | None = None,
        train: bool = True,
        augmentation: Mapping[str, Any] | None = None,
        multiple: int = 64,
        ignore_regions: bool = False,
        min_image_keypoints: int | None = None,
        skip_invalid: bool = False,
    ) -> None:
        self.images_dir = Path(images_dir)
        self.annotation_file = Path(annotation_file)
        if not self.annotation_file.is_file():
            raise FileNotFoundError(
                f"annotation file {self.annotation_file} does not exist; check the dataset root "
                "(paths.data_dir or paths.<dataset>_dir) and the split; conf/data/<dataset>.yaml "
                "shows where the official release keeps each file"
            )
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"image folder {self.images_dir} does not exist; check the "
                                    f"dataset root (images of {self.annotation_file})")
        self.codec = PINetCodec.from_any(codec)
        self.layout = self.codec.layout
        self.train = bool(train)
        self.multiple = int(multiple)
        self.ignore_regions = bool(ignore_regions)
        self.min_image_keypoints = None if min_image_keypoints is None else int(
            min_image_keypoints)
        self.skip_invalid = bool(skip_invalid)
        self.coco = _load_coco(self.annotation_file, self.layout, self.skip_invalid)
        ids = sorted(self.coco.getImgIds())
        if self.train:
            keep = [i for i in ids if self._keep_for_training(i)]
            skipped = len(ids) - len(keep)
            if skipped:
                why = ("without annotations" if self.min_image_keypoints is None else
                       f"with {self.min_image_keypoints} labelled keypoints or fewer")
                log.info("%s: training on %d images, skipped %d %s",
                         self.annotation_file.name, len(keep), skipped, why)
            ids = keep
        self.image_ids = ids
        self._check_image_files()
        self._seeded_for: int | None = None
        if self.train:
            self.augment = TrainAugmentation(self.layout.flip_index, self.codec.input_size,
                                             **dict(augmentation or {}))

    # ------------------------------------------------------------------ checks and reading
    def _check_image_files(self) -> None:
        """Every image this dataset reads exists and is whole, checked once at the start."""
        records = self.coco.loadImgs(self.image_ids)
        bad = check_image_files(self.images_dir, records, self.annotation_file,
                                self.skip_invalid)
        if bad:
            self.image_ids = [i for i in self.image_ids if i not in bad]

    def _annotations(self, image_id: int) -> list[dict]:
        return self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id, iscrowd=None))

    def _keep_for_training(self, image_id: int) -> bool:
        anns = self._annotations(image_id)
        if self.min_image_keypoints is None:
            return len(anns) > 0
        return sum(num_keypoints(a) for a in anns) > self.min_image_keypoints

    def __len__(self) -> int:
        return len(self.image_ids)

    def load(self, index: int) -> tuple[np.ndarray, dict, list[dict]]:
        """Image (RGB), its COCO image record and annotations."""
        image_id = self.image_ids[index]
        info = self.coco.loadImgs(image_id)[0]
        try:
            image = read_image(self.images_dir / info["file_name"])
        except (FileNotFoundError, OSError) as exc:
            raise type(exc)(f"{exc} (image id {image_id} of {self.annotation_file})") from None
        return image, info, self._annotations(image_id)

    def people(self, anns: list[dict], height: int, width: int) -> tuple[np.ndarray, ...]:
        """Keypoints (N, K, 3), boxes (N, 4) xywh, ignore mask (H, W) uint8 (0 = ignore; all
        1 unless ``ignore_regions``)."""
        k = self.layout.num_keypoints
        persons = [a for a in anns if is_person(a)]
        kps = np.array([a.get("keypoints") or [0.0] * (3 * k) for a in persons],
                       dtype=np.float64).reshape(-1, k, 3)
        boxes = np.array([a.get("bbox") or _hull(kp) for a, kp in zip(persons, kps, strict=True)],
                         dtype=np.float64).reshape(-1, 4)
        mask = np.ones((height, width), np.uint8)
        if self.ignore_regions:
            for a in anns:
                if is_crowd(a) or num_keypoints(a) == 0:
                    mask[_region(a, height, width) > 0] = 0
        return kps, boxes, mask

    # ------------------------------------------------------------------ samples
    def _maybe_reseed(self) -> None:
        # Forked loader workers inherit one albumentations generator: reseed from torch's
        # per-worker seed (it changes per worker and per epoch) so augmentations differ.
        seed = torch.initial_seed()
        if seed != self._seeded_for:
            self.augment.reseed(seed)
            self._seeded_for = seed

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, info, anns = self.load(index)
        h, w = image.shape[:2]
        if not self.train:
            resized, back = self.codec.resize(image, self.multiple)
            return {
                "image": torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))),
                "back_transform": torch.from_numpy(back.astype(np.float32)),
                "image_id": int(info["id"]),
                "orig_size": (h, w),
            }
        self._maybe_reseed()
        kps, boxes, mask = self.people(anns, h, w)
        out = self.augment(image, kps, mask=mask, boxes=boxes, areas=boxes[:, 2] * boxes[:, 3])
        targets = self.codec.encode(out["keypoints"], out["areas"], ignore_mask=out["mask"])
        sample: dict[str, Any] = {
            "image": torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1)))
        }
        sample.update({key: torch.from_numpy(v) for key, v in targets.items()})
        return sample


def _hull(kp: np.ndarray) -> list[float]:
    lab = kp[kp[:, 2] > 0, :2]
    if not len(lab):
        return [0.0, 0.0, 0.0, 0.0]
    lo, hi = lab.min(0), lab.max(0)
    return [float(lo[0]), float(lo[1]), float(hi[0] - lo[0]), float(hi[1] - lo[1])]


def _region(ann: dict, height: int, width: int) -> np.ndarray:
    """Pixel mask of an annotation: its segmentation (RLE / polygons), else its box."""
    seg = ann.get("segmentation")
    if seg:
        if isinstance(seg, list):
            rles = mask_utils.frPyObjects(seg, height, width)
            rle = mask_utils.merge(rles)
        elif isinstance(seg["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = seg
        return mask_utils.decode(rle)
    m = np.zeros((height, width), np.uint8)
    if ann.get("bbox"):
        x, y, bw, bh = ann["bbox"]
        x0, y0 = max(int(np.floor(x)), 0), max(int(np.floor(y)), 0)
        x1, y1 = min(int(np.ceil(x + bw)), width), min(int(np.ceil(y + bh)), height)
        m[y0:y1, x0:x1] = 1
    return m
