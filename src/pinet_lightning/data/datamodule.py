"""``PINetDataModule``: datasets, loaders and collates (Hydra instantiates it from conf/data).

The frame and the targets are the codec's (:class:`~pinet_lightning.codec.codec.PINetCodec`,
the ``codec`` config group): its layout, input size, convention and target settings reach the
datasets, and its collate builds the training batches. The dataset class is a Hydra node
(``dataset``: ``_target_`` and ``_partial_: true``; default
:class:`~pinet_lightning.data.datasets.CocoKeypointDataset`), called once per split with the
images folder, the annotation file, the codec and the data settings: a new annotation format
is a new class named there.

Data comes from explicit ``train`` / ``val`` / ``test`` ``{"images": dir, "annotations": json}``
entries, or from a synthetic crowd that :meth:`prepare_data` writes once into
``synthetic.root/{train,val,test}`` (cached: a ``synthetic_meta.json`` beside each annotation
file records the knobs, and a set whose knobs match is not regenerated). The three splits are
drawn by the same generator from different seeds: the synthetic ``test`` split is held out
(``num_test`` images; None: as many as ``num_val``), so test AP is not val AP. An explicit
``test`` entry replaces it.

Checked when the data module is built (config time, before any data is read): the codec
(``codec.input_size`` a multiple of 32, ...). Checked when the datasets are built
(``setup``, before training): the annotation files and image files
(:mod:`pinet_lightning.core.annotations`); ``skip_invalid=True`` skips bad records and files with
a logged count instead of stopping, and evaluation applies the same rule to the ground truth.

The train loader shuffles with the default sampler: under DDP Lightning swaps in a
``DistributedSampler`` itself (``use_distributed_sampler``), so none is created here. The
eval collate stacks images of one size; when sizes differ it raises (use
``eval_batch_size=1``, the default).
"""

from __future__ import annotations

import fcntl
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from pinet_lightning.codec.codec import PINetCodec
from pinet_lightning.core.config import to_plain
from pinet_lightning.data.augmentation import TrainAugmentation
from pinet_lightning.data.datasets import CocoKeypointDataset
from pinet_lightning.data.synthetic import generate_synthetic_crowd
from pinet_lightning.evaluation.coco import KeypointEvaluator

__all__ = ["PINetDataModule", "eval_collate", "SYNTHETIC_DEFAULTS", "DATASET_DEFAULT"]

SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "root": "data/synthetic",
    "num_train": 200,
    "num_val": 50,
    "num_test": None,  # None: as many as num_val
    "image_size": 512,
    "min_people": 2,
    "max_people": 8,
    "overlap": 0.5,
    "seed": 0,
}
_AUGMENTATION_DEFAULTS: dict[str, Any] = {
    name: p.default for name, p in inspect.signature(TrainAugmentation).parameters.items()
    if name not in ("flip_index", "input_size", "seed")
}
DATASET_DEFAULT: dict[str, Any] = {
    "_target_": f"{CocoKeypointDataset.__module__}.{CocoKeypointDataset.__qualname__}",
    "_partial_": True,
}
_PEOPLE_DEFAULTS: dict[str, Any] = {
    name: p.default for name, p in inspect.signature(CocoKeypointDataset).parameters.items()
    if name in ("ignore_regions", "min_image_keypoints")
}
_SYNTHETIC_VERSION = 1  # bump when the generator's output changes
# each synthetic split draws its scenes from its own seed: synthetic.seed + this
_SYNTHETIC_SEED_OFFSETS = {"train": 0, "val": 1_000_003, "test": 2_000_006}


def eval_collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images (one size per batch) and back transforms; ids and sizes stay lists."""
    shapes = {tuple(s["image"].shape) for s in batch}
    if len(shapes) > 1:
        raise ValueError(
            f"eval batch holds images of different sizes {sorted(shapes)}; set "
            "data.eval_batch_size=1 (the default) or use images of one aspect ratio"
        )
    return {
        "image": torch.stack([s["image"] for s in batch]),
        "back_transform": torch.stack([s["back_transform"] for s in batch]),
        "image_id": [int(s["image_id"]) for s in batch],
        "orig_size": [tuple(s["orig_size"]) for s in batch],
    }


def _split_entry(entry: Mapping[str, Any] | None, name: str) -> tuple[Path, Path] | None:
    if entry is None:
        return None
    if "images" not in entry or "annotations" not in entry:
        raise ValueError(f"data.{name} needs 'images' (folder) and 'annotations' (json), "
                         f"got keys {sorted(entry)}")
    return Path(str(entry["images"])), Path(str(entry["annotations"]))


class PINetDataModule(pl.LightningDataModule):
    """Datasets and loaders for PINet training and evaluation (see the module docstring)."""

    def __init__(
        self,
        codec: PINetCodec | Mapping[str, Any] | None = None,
        protocol: str = "crowdpose",
        train: Mapping[str, Any] | None = None,
        val: Mapping[str, Any] | None = None,
        test: Mapping[str, Any] | None = None,
        synthetic: Mapping[str, Any] | None = None,
        augmentation: Mapping[str, Any] | None = None,
        people: Mapping[str, Any] | None = None,
        batch_size: int = 20,
        eval_batch_size: int = 1,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        skip_invalid: bool = False,
        dataset: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.codec = PINetCodec.from_any(codec)
        # Every checkpoint then carries the data settings (``datamodule_hyper_parameters``,
        # the codec as plain data): pinet-eval reads them there, not from the run's config.
        settings = {key: value for key, value in locals().items()
                    if key not in ("self", "__class__", "settings")}
        settings["codec"] = self.codec.to_dict()
        self.save_hyperparameters(to_plain(settings), logger=False)
        self.layout = self.codec.layout
        if protocol not in ("coco", "crowdpose"):
            raise ValueError(f"protocol must be 'coco' or 'crowdpose', got '{protocol}'")
        self.protocol = protocol
        self.skip_invalid = bool(skip_invalid)
        self.augmentation = {**_AUGMENTATION_DEFAULTS, **dict(augmentation or {})}
        unknown = sorted(set(people or {}) - set(_PEOPLE_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown data.people keys {unknown}; known: "
                             f"{sorted(_PEOPLE_DEFAULTS)}")
        self.people = {**_PEOPLE_DEFAULTS, **dict(people or {})}  # which images and people
        # the dataset class, a Hydra node (_target_, _partial_: true): called per split
        self.dataset = {**DATASET_DEFAULT, **dict(dataset or {})}
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)

        self.synthetic = None if synthetic is None else {**SYNTHETIC_DEFAULTS, **dict(synthetic)}
        self.splits: dict[str, tuple[Path, Path] | None] = {
            "train": _split_entry(train, "train"),
            "val": _split_entry(val, "val"),
            "test": _split_entry(test, "test"),
        }
        self._synthetic_splits: dict[str, str] = {}  # split -> the synthetic set it reads
        if self.synthetic is not None:
            root = Path(str(self.synthetic["root"]))
            for split in ("train", "val", "test"):
                if self.splits[split] is None:
                    out = root / split
                    self.splits[split] = (out / "images", out / "annotations.json")
                    self._synthetic_splits[split] = split
        self.train_dataset: CocoKeypointDataset | None = None
        self.val_dataset: CocoKeypointDataset | None = None
        self.test_dataset: CocoKeypointDataset | None = None

    # ------------------------------------------------------------------ attributes
    @property
    def val_annotation_file(self) -> str | None:
        return None if self.splits["val"] is None else str(self.splits["val"][1])

    @property
    def test_annotation_file(self) -> str | None:
        return None if self.splits["test"] is None else str(self.splits["test"][1])

    def evaluator(self, stage: str) -> KeypointEvaluator:
        """The evaluator of the ``val`` or ``test`` split: its annotation file, this data's
        protocol, the layout's OKS sigmas and the ``skip_invalid`` rule."""
        entry = self.splits.get(stage)
        if entry is None:
            raise ValueError(f"no {stage} data configured: set data.{stage}.images/annotations "
                             "or data.synthetic")
        return KeypointEvaluator(str(entry[1]), self.protocol, tuple(self.layout.sigmas),
                                 skip_invalid=self.skip_invalid)

    # ------------------------------------------------------------------ data
    def _synthetic_knobs(self, split: str) -> dict[str, Any]:
        cfg = self.synthetic or {}
        count = cfg[f"num_{split}"]
        if split == "test" and count is None:
            count = cfg["num_val"]
        return {
            "num_images": int(count),
            "image_size": int(cfg["image_size"]),
            "min_people": int(cfg["min_people"]),
            "max_people": int(cfg["max_people"]),
            "overlap": float(cfg["overlap"]),
            "layout": self.layout.to_dict(),
            # train, val and the held-out test draw different scenes
            "seed": int(cfg["seed"]) + _SYNTHETIC_SEED_OFFSETS[split],
        }

    def prepare_data(self) -> None:
        """Generate the synthetic crowd once (rank 0 of each node; skipped when cached)."""
        if self.synthetic is None:
            return
        root = Path(str(self.synthetic["root"]))
        root.mkdir(parents=True, exist_ok=True)
        for split in self._synthetic_splits:
            knobs = self._synthetic_knobs(split)
            out = root / split
            meta_path = out / "synthetic_meta.json"
            meta = {**knobs, "version": _SYNTHETIC_VERSION}
            # the jobs of a parallel sweep (hydra/launcher=local or slurm) share the cache:
            # one generates, the others wait for it and read the finished set
            with open(root / f".{split}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if (out / "annotations.json").is_file() and meta_path.is_file():
                    try:
                        if json.loads(meta_path.read_text()) == meta:
                            continue
                    except json.JSONDecodeError:
                        pass
                generate_synthetic_crowd(out, **knobs)
                meta_path.write_text(json.dumps(meta, indent=1))

    def _dataset(self, split: str, train: bool) -> CocoKeypointDataset:
        entry = self.splits[split]
        if entry is None:
            raise ValueError(f"no {split} data configured: set data.{split}.images/annotations "
                             "or data.synthetic")
        make = instantiate(self.dataset, _convert_="all")
        dataset = make(entry[0], entry[1], codec=self.codec, train=train,
                       augmentation=self.augmentation, **self.people,
                       skip_invalid=self.skip_invalid)
        if len(dataset) == 0:  # training would stop in the sampler, evaluation report nothing
            raise ValueError(self._empty_split_message(split, dataset))
        return dataset

    def _empty_split_message(self, split: str, dataset: CocoKeypointDataset) -> str:
        """Why a split has no image to use, and the setting that fixes it."""
        data = dataset.coco.dataset
        images, people = len(data.get("images", [])), len(data.get("annotations", []))
        found = f"it lists {images} images and {people} person annotations"
        if images and self.skip_invalid:
            found += " (after data.skip_invalid dropped the invalid ones, logged above)"
        if split == "train":
            rule = ("an image with at least one annotation" if
                    self.people["min_image_keypoints"] is None else
                    f"an image whose annotations label more than "
                    f"{self.people['min_image_keypoints']} keypoints "
                    "(data.people.min_image_keypoints)")
            problem = f"no image to train on (training needs {rule})"
            fix = ("point data.train.annotations at a COCO keypoint file with annotated "
                   "people (and data.train.images at its images)")
        else:
            stage = "validation" if split == "val" else "the test"
            problem = f"no image to evaluate, so {stage} would report no metric"
            fix = (f"point data.{split}.annotations at a COCO keypoint file with images (and "
                   f"data.{split}.images at their folder)")
            if split == "test":
                fix += "; with pinet-train, test=false skips the test"
        synthetic = self._synthetic_splits.get(split)
        if synthetic is not None:
            fix = f"set data.synthetic.num_{synthetic} to 1 or more"
        return f"data.{split}: {dataset.annotation_file} has {problem}: {found}. Fix: {fix}"

    def check_split(self, split: str) -> None:
        """Build ``split``'s dataset now (its files read and validated, kept for later) unless
        the split is not configured or comes from the synthetic generator (``prepare_data``
        writes those during ``fit``). ``pinet-train`` checks the test split before training,
        so that a missing or empty test file stops the run before the training, not after."""
        if self.splits.get(split) is None or split in self._synthetic_splits:
            return
        attribute = f"{split}_dataset"
        if getattr(self, attribute) is None:
            setattr(self, attribute, self._dataset(split, train=split == "train"))

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._dataset("train", train=True)
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            if self.splits["val"] is not None:
                self.val_dataset = self._dataset("val", train=False)
        if stage in (None, "test") and self.test_dataset is None:
            self.test_dataset = self._dataset("test", train=False)

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset, batch_size: int, shuffle: bool, collate, drop_last=False):
        workers = self.num_workers
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
            pin_memory=self.pin_memory, persistent_workers=self.persistent_workers and workers > 0,
            collate_fn=collate, drop_last=drop_last,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        ds = self.train_dataset
        # drop the ragged last batch (batch norm, proposal count); keep it for tiny sets
        return self._loader(ds, self.batch_size, True, self.codec.collate,
                            drop_last=len(ds) > self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            self.setup("validate")
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, self.eval_batch_size, False, eval_collate)

    def test_dataloader(self) -> DataLoader:
        if self.test_dataset is None:
            self.setup("test")
        return self._loader(self.test_dataset, self.eval_batch_size, False, eval_collate)
