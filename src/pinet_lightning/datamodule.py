"""``PINetDataModule``: datasets, loaders and collates (keyword names fixed by
docs/architecture.md, Hydra instantiates them).

Data comes from explicit ``train`` / ``val`` / ``test`` ``{"images": dir, "annotations": json}``
entries, or from a synthetic crowd that :meth:`prepare_data` writes once into
``synthetic.root/{train,val,test}`` (cached: a ``synthetic_meta.json`` beside each annotation
file records the knobs, and a set whose knobs match is not regenerated). The three splits are
drawn by the same generator from different seeds: the synthetic ``test`` split is held out
(``num_test`` images; None: as many as ``num_val``), so test AP is not val AP. An explicit
``test`` entry replaces it.

Checked when the data module is built (config time, before any data is read):
``input_size`` a multiple of 32 (:data:`INPUT_MULTIPLE`). Checked when the datasets are built
(``setup``, before training): the annotation files and image files
(:mod:`pinet_lightning.annotations`); ``skip_invalid=True`` skips bad records and files with
a logged count instead of stopping, and evaluation applies the same rule to the ground truth.

The train loader shuffles with the default sampler: under DDP Lightning swaps in a
``DistributedSampler`` itself (``use_distributed_sampler``), so none is created here. The
eval collate stacks images of one size; when sizes differ it raises (use
``eval_batch_size=1``, the default).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from pinet_lightning.augmentation import TrainAugmentation
from pinet_lightning.config import to_plain
from pinet_lightning.conventions import get_convention
from pinet_lightning.datasets import CocoKeypointDataset
from pinet_lightning.evaluation import KeypointEvaluator
from pinet_lightning.layouts import get_layout
from pinet_lightning.synthetic import generate_synthetic_crowd
from pinet_lightning.targets import OMEGA_KEYS, WINDOW_KEYS, PINetTargetCodec

__all__ = ["PINetDataModule", "train_collate", "eval_collate", "SYNTHETIC_DEFAULTS"]

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
_TARGET_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(PINetTargetCodec)
    if f.name not in ("layout", "output_size", "offsets_format", "heatmaps_format")
}
# data.sparse_targets: what the loader workers emit (and what crosses to the main process)
_FORMATS = {True: {"offsets_format": "omega", "heatmaps_format": "windows"},
            False: {"offsets_format": "dense", "heatmaps_format": "dense"}}
_AUGMENTATION_DEFAULTS: dict[str, Any] = {
    name: p.default for name, p in inspect.signature(TrainAugmentation).parameters.items()
    if name not in ("flip_index", "input_size", "seed")
}
_PEOPLE_DEFAULTS: dict[str, Any] = {
    name: p.default for name, p in inspect.signature(CocoKeypointDataset).parameters.items()
    if name in ("ignore_regions", "min_image_keypoints")
}
INPUT_MULTIPLE = 32  # the backbone's coarsest stride (HRNet's 1/32 branch)
_SYNTHETIC_VERSION = 1  # bump when the generator's output changes
# each synthetic split draws its scenes from its own seed: synthetic.seed + this
_SYNTHETIC_SEED_OFFSETS = {"train": 0, "val": 1_000_003, "test": 2_000_006}


# the per-entry keys of the sparse targets (targets.py owns the names): concatenated over the
# batch; the per-sample ones (ignore_mask, bg_weight) are stacked, target_shape is shared
_OMEGA_KEYS = tuple(key for key in OMEGA_KEYS if key.startswith("omega_"))
_WINDOW_KEYS = tuple(key for key in WINDOW_KEYS if key.startswith("window_"))


def train_collate(batch: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Stack the dense keys of the training samples; concatenate the sparse ones.

    Sparse samples (``offsets_format="omega"`` / ``heatmaps_format="windows"`` of
    :func:`~pinet_lightning.targets.encode_targets`) carry ``target_shape`` (K, P, H, W).
    Their Omega entries are concatenated with batch offsets: ``omega_index`` becomes the
    ascending flat position in (B, P*K, H, W) (int32 while that fits, the bytes that cross
    the worker boundary), and each Gaussian window's ``window_channel`` its channel in
    (B * (K + P)); ``target_shape`` stays a tuple of ints (never moved to a device).
    :func:`~pinet_lightning.targets.heatmap_targets` and
    :class:`~pinet_lightning.targets.OmegaBatch` read the result on the device.
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


def _check_input_size(value: Any) -> int:
    """``data.input_size``: a positive multiple of :data:`INPUT_MULTIPLE`."""
    size = int(value)
    if size <= 0 or size % INPUT_MULTIPLE:
        below = max(size // INPUT_MULTIPLE, 1) * INPUT_MULTIPLE
        above = (max(size, 0) // INPUT_MULTIPLE + 1) * INPUT_MULTIPLE
        near = sorted({below, above})
        raise ValueError(
            f"data.input_size={value} must be a positive multiple of {INPUT_MULTIPLE}: HRNet "
            f"(and the other timm backbones) halve the input 5 times and add the branches back "
            f"together, so the sides must divide by {INPUT_MULTIPLE}; use data.input_size="
            f"{' or '.join(map(str, near))}"
        )
    return size


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
        layout: Any = "crowdpose",
        protocol: str = "crowdpose",
        train: Mapping[str, Any] | None = None,
        val: Mapping[str, Any] | None = None,
        test: Mapping[str, Any] | None = None,
        synthetic: Mapping[str, Any] | None = None,
        input_size: int = 512,
        output_stride: int = 4,
        targets: Mapping[str, Any] | None = None,
        augmentation: Mapping[str, Any] | None = None,
        people: Mapping[str, Any] | None = None,
        batch_size: int = 20,
        eval_batch_size: int = 1,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        skip_invalid: bool = False,
        convention: str = "cell_center",
        sparse_targets: bool = True,
    ) -> None:
        super().__init__()
        # Every checkpoint then carries the data settings (``datamodule_hyper_parameters``):
        # pinet-eval and the Predictor read them there, not from the run's config.yaml.
        self.save_hyperparameters(to_plain({
            key: value for key, value in locals().items() if key not in ("self", "__class__")
        }), logger=False)
        self.layout = get_layout(layout)
        self.convention = get_convention(convention).name  # the network's (model.network)
        if protocol not in ("coco", "crowdpose"):
            raise ValueError(f"protocol must be 'coco' or 'crowdpose', got '{protocol}'")
        self.protocol = protocol
        self.input_size = _check_input_size(input_size)
        self.output_stride = int(output_stride)
        self.skip_invalid = bool(skip_invalid)
        # the effective settings: the codec's / augmentation's own defaults, then the overrides
        self.targets = {**_TARGET_DEFAULTS, **dict(targets or {})}
        clash = sorted(set(self.targets) & set(_FORMATS[True]))
        if clash:
            raise ValueError(f"data.targets.{clash[0]} is chosen by data.sparse_targets "
                             "(true: Omega and Gaussian windows, false: dense maps); remove it")
        self.sparse_targets = bool(sparse_targets)
        self.augmentation = {**_AUGMENTATION_DEFAULTS, **dict(augmentation or {})}
        unknown = sorted(set(people or {}) - set(_PEOPLE_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown data.people keys {unknown}; known: "
                             f"{sorted(_PEOPLE_DEFAULTS)}")
        self.people = {**_PEOPLE_DEFAULTS, **dict(people or {})}  # which images and people
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
        self._synthetic_splits: list[str] = []  # the splits prepare_data generates
        if self.synthetic is not None:
            root = Path(str(self.synthetic["root"]))
            for split in ("train", "val", "test"):
                if self.splits[split] is None:
                    out = root / split
                    self.splits[split] = (out / "images", out / "annotations.json")
                    self._synthetic_splits.append(split)
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
        for split in self._synthetic_splits:
            knobs = self._synthetic_knobs(split)
            out = root / split
            meta_path = out / "synthetic_meta.json"
            meta = {**knobs, "version": _SYNTHETIC_VERSION}
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
        return CocoKeypointDataset(
            entry[0], entry[1], layout=self.layout, train=train, input_size=self.input_size,
            output_stride=self.output_stride,
            targets={**self.targets, **_FORMATS[self.sparse_targets]},
            augmentation=self.augmentation, **self.people,
            skip_invalid=self.skip_invalid, convention=self.convention,
        )

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
        return self._loader(ds, self.batch_size, True, train_collate,
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
