"""PINetDataModule: synthetic caching, loaders (0 and 1 workers), collates, DDP sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pytorch_lightning.utilities.data import _update_dataloader
from torch.utils.data import DistributedSampler, RandomSampler

from pinet_lightning.codec.codec import PINetCodec
from pinet_lightning.codec.conventions import get_convention
from pinet_lightning.data.datamodule import PINetDataModule, eval_collate


def _dm(root, workers=0, codec=None, **kw):
    synthetic = {"root": str(root), "num_train": 4, "num_val": 2, "image_size": 96,
                 "min_people": 2, "max_people": 3, "overlap": 0.5, "seed": 0}
    synthetic.update(kw.pop("synthetic", {}))
    return PINetDataModule(codec=PINetCodec(input_size=64, **(codec or {})), synthetic=synthetic,
                           batch_size=2, num_workers=workers, pin_memory=False, **kw)


def test_prepare_data_caches_and_regenerates_on_change(tmp_path):
    dm = _dm(tmp_path)
    dm.prepare_data()
    ann = tmp_path / "train" / "annotations.json"
    first = ann.stat().st_mtime_ns
    assert (tmp_path / "val" / "annotations.json").is_file()
    assert (tmp_path / "train" / "synthetic_meta.json").is_file()
    test_meta = tmp_path / "test" / "synthetic_meta.json"
    assert test_meta.is_file()
    dm.prepare_data()
    assert ann.stat().st_mtime_ns == first  # cached
    _dm(tmp_path, synthetic={"num_train": 5}).prepare_data()
    assert ann.stat().st_mtime_ns != first
    assert len(list((tmp_path / "train" / "images").glob("*.jpg"))) == 5


def test_attributes(tmp_path):
    dm = _dm(tmp_path, protocol="coco")
    assert dm.layout.name == "crowdpose" and dm.protocol == "coco"
    assert dm.val_annotation_file == str(tmp_path / "val" / "annotations.json")
    assert dm.test_annotation_file == str(tmp_path / "test" / "annotations.json")
    given = {"images": str(tmp_path / "x"), "annotations": str(tmp_path / "x.json")}
    assert _dm(tmp_path, test=given).test_annotation_file == given["annotations"]
    with pytest.raises(ValueError, match="protocol"):
        PINetDataModule(protocol="mpii")


def test_synthetic_test_split_is_held_out(tmp_path):
    """The same generator, another seed: the test scenes are not the val scenes (so test AP is
    not val AP); as many as val unless num_test says."""

    def scenes(split):
        data = json.loads((tmp_path / split / "annotations.json").read_text())
        return [[a["keypoints"] for a in data["annotations"] if a["image_id"] == im["id"]]
                for im in data["images"]]

    _dm(tmp_path, synthetic={"num_val": 3}).prepare_data()
    val, test = scenes("val"), scenes("test")
    assert len(val) == len(test) == 3
    assert not any(t == v for t in test for v in val)
    meta = {s: json.loads((tmp_path / s / "synthetic_meta.json").read_text())
            for s in ("train", "val", "test")}
    assert len({m["seed"] for m in meta.values()}) == 3
    assert {k: v for k, v in meta["test"].items() if k != "seed"} == \
        {k: v for k, v in meta["val"].items() if k != "seed"}  # the same generator settings
    _dm(tmp_path, synthetic={"num_val": 3, "num_test": 5}).prepare_data()
    assert len(scenes("test")) == 5 and scenes("val") == val  # val kept (cached)


@pytest.mark.parametrize(("workers", "sparse"), [(0, True), (1, True), (0, False), (1, False)])
def test_loaders_yield_batches(tmp_path, workers, sparse):
    dm = _dm(tmp_path, workers=workers, codec={"sparse": sparse})
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, RandomSampler)  # Lightning may swap it for DDP
    assert loader.persistent_workers == (workers > 0)
    batch = next(iter(loader))
    assert tuple(batch["image"].shape) == (2, 3, 64, 64) and batch["image"].dtype == torch.uint8
    if not sparse:
        assert tuple(batch["heatmaps"].shape) == (2, 14, 16, 16)
        assert tuple(batch["offsets"].shape) == (2, 3 * 14 * 2, 16, 16)
        assert tuple(batch["offset_weights"].shape) == (2, 84, 16, 16)
    else:
        assert "offsets" not in batch and "heatmaps" not in batch
        assert batch["target_shape"] == (14, 3, 16, 16)  # a tuple, not a tensor
        index = batch["omega_index"]
        assert index.dtype == torch.int32 and len(index) > 0
        assert bool((index[1:] > index[:-1]).all()) and int(index[-1]) < 2 * 42 * 16 * 16
        assert batch["omega_offsets"].shape == (len(index), 2)
        assert tuple(batch["ignore_mask"].shape) == (2, 16, 16)
        assert tuple(batch["bg_weight"].shape) == (2,)
        assert int(batch["window_channel"].max()) < 2 * 17
    val = next(iter(dm.val_dataloader()))
    assert tuple(val["image"].shape) == (1, 3, 64, 64)
    assert tuple(val["back_transform"].shape) == (1, 2, 3)
    assert isinstance(val["image_id"], list) and val["orig_size"] == [(96, 96)]
    dm.setup("test")
    assert len(dm.test_dataloader()) == 2


def test_eval_batch_of_equal_sizes_and_mixed_sizes_error(tmp_path):
    dm = _dm(tmp_path, eval_batch_size=2)
    dm.prepare_data()
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert tuple(batch["image"].shape) == (2, 3, 64, 64) and len(batch["image_id"]) == 2
    a = {"image": torch.zeros(3, 64, 64, dtype=torch.uint8), "back_transform": torch.eye(2, 3),
         "image_id": 1, "orig_size": (64, 64)}
    b = {**a, "image": torch.zeros(3, 64, 128, dtype=torch.uint8), "image_id": 2}
    with pytest.raises(ValueError, match="eval_batch_size=1"):
        eval_collate([a, b])


def test_lightning_can_inject_a_distributed_sampler(tmp_path):
    dm = _dm(tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=1, shuffle=True)
    new = _update_dataloader(loader, sampler)
    assert new.sampler is sampler and new.collate_fn == dm.codec.collate
    batch = next(iter(new))
    assert tuple(batch["image"].shape) == (2, 3, 64, 64)


def test_eval_samples_follow_the_network_convention(tmp_path):
    """Evaluation images are resized as the network's convention says: ours pads right /
    bottom, the published one warps the image centred."""

    ours, published = _dm(tmp_path), _dm(tmp_path, codec={"convention": "published"})
    for dm in (ours, published):
        dm.prepare_data()
        dm.setup("validate")
    image, _, _ = ours.val_dataset.load(0)
    a, b = ours.val_dataset[0], published.val_dataset[0]
    want = get_convention("published").resize(image, 64)
    assert torch.equal(b["image"], torch.from_numpy(want[0]).permute(2, 0, 1))
    np.testing.assert_allclose(b["back_transform"].numpy(), want[1], atol=1e-6)
    assert not torch.allclose(a["back_transform"], b["back_transform"])
    with pytest.raises(ValueError, match="unknown convention"):
        _dm(tmp_path, codec={"convention": "pixel"})
