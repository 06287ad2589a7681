"""PINetModule: optimizer schedule, hyperparameters, fit + validation, result merging,
oracle evaluation, predict and checkpoint round trip (CPU, small backbone, 128 px)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from pinet_lightning.codec.codec import PINetCodec
from pinet_lightning.data.datamodule import PINetDataModule
from pinet_lightning.training.module import (
    NonFiniteLossError,
    PINetModule,
    merge_gathered_results,
    resolve_switch,
)

SMALL = {"backbone": "hrnet_w18_small", "pretrained": None, "refine_layers": 1}
INPUT = 128


def small_module(**kwargs) -> PINetModule:
    torch.manual_seed(0)
    kwargs.setdefault("network", SMALL)
    kwargs.setdefault("decode", {"flip_test": True, "top_k": 10})
    kwargs.setdefault("codec", PINetCodec("crowdpose", input_size=INPUT))
    return PINetModule(**kwargs)


def make_datamodule(synthetic_crowd):
    images, ann = synthetic_crowd
    split = {"images": str(images), "annotations": str(ann)}
    return PINetDataModule(codec=PINetCodec("crowdpose", input_size=INPUT), protocol="crowdpose",
                           train=split, val=split, test=split, batch_size=2, eval_batch_size=1,
                           num_workers=0, pin_memory=False, persistent_workers=False)


def make_trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=str(tmp_path))
    return pl.Trainer(**{**defaults, **kwargs})


def oracle_results(ann_file: Path, image_ids) -> dict[int, list[dict]]:
    """Ground-truth people as COCO results (score 1), grouped by image id."""
    data = json.loads(Path(ann_file).read_text())
    out: dict[int, list[dict]] = {int(i): [] for i in image_ids}
    for a in data["annotations"]:
        if a["image_id"] in out and a.get("num_keypoints", 1) > 0:
            out[a["image_id"]].append({"image_id": a["image_id"], "category_id": 1,
                                       "keypoints": [float(v) for v in a["keypoints"]],
                                       "score": 1.0})
    return out


class OracleModule(PINetModule):
    """Predicts the ground truth: exercises evaluation without a trained network."""

    def _predict_batch(self, batch):
        return oracle_results(self.hparams.val_annotation_file, batch["image_id"])


# ----------------------------------------------------------------- unit tests
def test_merge_gathered_results_drops_padded_duplicates():
    r = lambda i, s: {"image_id": i, "score": s}  # noqa: E731
    rank0 = {1: [r(1, 0.9), r(1, 0.5)], 3: [r(3, 0.7)], 5: []}
    rank1 = {2: [r(2, 0.8)], 4: [], 1: [r(1, 0.9), r(1, 0.5)]}  # image 1 padded in again
    flat, ids = merge_gathered_results([rank0, rank1])
    assert ids == [1, 2, 3, 4, 5]  # images with no pose still count as evaluated
    assert [(d["image_id"], d["score"]) for d in flat] == [
        (1, 0.9), (1, 0.5), (2, 0.8), (3, 0.7)]
    # the first copy wins, even when the duplicate differs
    flat, _ = merge_gathered_results([{7: [r(7, 0.1)]}, {7: [r(7, 0.2), r(7, 0.3)]}])
    assert flat == [r(7, 0.1)]
    assert merge_gathered_results([{}, {}]) == ([], [])


def test_resolve_switch():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_switch("auto", cuda, "x") and not resolve_switch("auto", cpu, "x")
    assert resolve_switch(True, cpu, "x") and not resolve_switch(False, cuda, "x")
    assert resolve_switch("true", cpu, "x") and not resolve_switch("False", cuda, "x")
    with pytest.raises(ValueError, match="compile"):
        resolve_switch("sometimes", cpu, "compile")


def test_scheduler_drops_lr_at_epoch_milestones():
    module = small_module(optimizer={"lr": 2e-3}, scheduler={"milestones": [2, 4], "gamma": 0.1})
    cfg = module.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.Adam)
    assert cfg["lr_scheduler"]["interval"] == "epoch"
    lrs = []
    for _ in range(5):  # one scheduler step per epoch
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([2e-3, 2e-3, 2e-4, 2e-4, 2e-5])
    assert {id(p) for p in module.parameters()} == {id(p) for p in opt.param_groups[0]["params"]}


def test_hparams_plain_and_defaults():
    layout = {"name": "tiny", "names": ["a", "b", "c"], "flip_index": [1, 0, 2],
              "sigmas": [0.1, 0.1, 0.1], "parts": {"top": [2], "pair": [0, 1]},
              "skeleton": [[0, 2], [1, 2]]}
    module = PINetModule(codec=OmegaConf.create({"layout": layout, "input_size": 64}),
                         network=OmegaConf.create(SMALL),
                         scheduler=OmegaConf.create({"milestones": [3]}),
                         decode={"scales": (1.0,)})
    hp = module.hparams
    assert type(hp["codec"]) is dict and type(hp["codec"]["layout"]) is dict  # plain data
    assert hp["codec"]["layout"]["names"] == layout["names"] and hp["codec"]["input_size"] == 64
    assert type(hp["network"]) is dict and hp["network"]["backbone"] == "hrnet_w18_small"
    assert hp["network"]["convention"] == "cell_center"  # the codec's
    assert hp["optimizer"] == {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}
    assert hp["scheduler"] == {"_target_": "torch.optim.lr_scheduler.MultiStepLR",
                               "_partial_": True, "milestones": [3], "gamma": 0.1}
    assert hp["loss"]["offset_weight"] == 0.03 and hp["loss"]["proposals_per_part"] == 40
    assert hp["decode"]["scales"] == [1.0]
    assert module.layout.num_keypoints == 3
    out = module(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    assert out["offsets"].shape[1] == 2 * 3 * 2
    with pytest.raises(ValueError, match="unknown PINetModule loss keys"):
        PINetModule(network=SMALL, loss={"heatmap_wieght": 1.0})


def test_speed_switches_keep_checkpoint_keys(tmp_path):
    """channels_last / compile forced on (CPU): weights go channels_last, the compiled
    forward stays off the module tree (compilation itself is lazy: nothing is compiled)."""
    module = small_module(channels_last=True, compile=True)
    keys = set(module.state_dict())
    module.trainer = make_trainer(tmp_path)
    module.configure_model()
    conv = module.net.heads.offset.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert "_train_forward" in module.__dict__
    assert set(module.state_dict()) == keys and all(k.startswith("net.") for k in keys)
    x = module._prepare(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    assert x.is_contiguous(memory_format=torch.channels_last)
    off = small_module()  # "auto" on a CPU trainer: both off
    off.trainer = make_trainer(tmp_path)
    off.configure_model()
    assert "_train_forward" not in off.__dict__ and not off._channels_last


def test_missing_ground_truth_is_a_clear_error(tmp_path):
    module = small_module()
    trainer = make_trainer(tmp_path)
    module.trainer = trainer
    with pytest.raises(ValueError, match="val_annotation_file"):
        module.evaluator("val")


# ----------------------------------------------------------- trainer tests
@pytest.fixture(scope="module")
def fitted(synthetic_crowd, tmp_path_factory):
    """A 2-step fit with validation (sanity check included) and its checkpoint."""
    root = tmp_path_factory.mktemp("fit")
    pl.seed_everything(0, workers=True)
    module = small_module(optimizer={"lr": 1e-3}, scheduler={"milestones": [1]})
    dm = make_datamodule(synthetic_crowd)
    trainer = make_trainer(root, max_epochs=1, limit_train_batches=2,
                           num_sanity_val_steps=1, log_every_n_steps=1)
    trainer.fit(module, datamodule=dm)
    ckpt = root / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return module, trainer, dm, ckpt, root


def test_fit_logs_finite_losses_and_val_metrics(fitted):
    module, trainer, dm, _, root = fitted
    metrics = trainer.callback_metrics
    for name in ("loss", "heatmap", "offset", "refine"):
        assert math.isfinite(float(metrics[f"train/{name}"])), name
        assert math.isfinite(float(metrics[f"train/{name}_epoch"])), name
    for key in ("AP", "AP50", "AP75", "AR", "AP_easy", "AP_medium", "AP_hard"):
        assert f"val/{key}" in metrics, key
        assert math.isfinite(float(metrics[f"val/{key}"]))
    assert float(metrics["val/images"]) == 8  # every val image evaluated once
    assert trainer.global_step == 2
    # the scheduler stepped once (milestone 1, in epochs)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4)
    assert (root / "results" / "val_epoch0.json").is_file()
    assert (root / "results" / "val_sanity.json").is_file()
    # the last evaluation of the stage: its metrics and its results file, no globbing
    evaluation = module.evaluations["val"]
    assert evaluation.results_path == root / "results" / "val_epoch0.json"
    assert evaluation.metrics["AP"] == pytest.approx(float(metrics["val/AP"]))
    assert module.evaluator("val") == dm.evaluator("val")  # the data module's by default
    assert dm.evaluator("val").protocol == "crowdpose"


def test_checkpoint_reloads_with_identical_outputs(fitted):
    module, _, _, ckpt, _ = fitted
    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert raw["hyper_parameters"]["codec"]["layout"]["name"] == "crowdpose"
    assert raw["hyper_parameters"]["codec"]["input_size"] == INPUT
    assert raw["datamodule_hyper_parameters"]["codec"] == raw["hyper_parameters"]["codec"]
    assert raw["hyper_parameters"]["network"]["pretrained"] is None
    assert all(k.startswith(("net.", "criterion.")) for k in raw["state_dict"])
    assert any(k.startswith("net.") for k in raw["state_dict"])
    reloaded = PINetModule.load_from_checkpoint(ckpt, map_location="cpu")
    module.eval()
    reloaded.eval()
    x = torch.randint(0, 256, (1, 3, INPUT, INPUT), dtype=torch.uint8)
    with torch.no_grad():
        a, b = module(x), reloaded(x)
    for key in ("heatmaps", "part_heatmaps", "offsets", "features"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert reloaded.hparams["decode"] == module.hparams["decode"]


def test_predict_step_returns_poses_per_image(fitted):
    module, _, dm, _, root = fitted
    trainer = make_trainer(root, limit_predict_batches=3)
    out = trainer.predict(module, dataloaders=dm.val_dataloader())
    flat = [d for batch in out for d in batch]
    assert len(flat) == 3
    assert sorted(d["image_id"] for d in flat) == sorted({d["image_id"] for d in flat})
    for d in flat:
        assert d["poses"].ndim == 3 and d["poses"].shape[1:] == (14, 3)
        assert d["scores"].shape == (d["poses"].shape[0],)


def test_oracle_validation_and_test_metrics(synthetic_crowd, tmp_path):
    _, ann = synthetic_crowd
    dm = make_datamodule(synthetic_crowd)
    module = OracleModule(codec=dm.codec, network=SMALL, val_annotation_file=str(ann),
                          test_annotation_file=str(ann), eval_protocol="crowdpose")
    trainer = make_trainer(tmp_path)
    (val,) = trainer.validate(module, datamodule=dm)
    assert val["val/AP"] == pytest.approx(1.0) and val["val/AR"] == pytest.approx(1.0)
    assert val["val/images"] == 8
    (test,) = trainer.test(module, datamodule=dm)
    assert test["test/AP"] == pytest.approx(1.0)
    saved = json.loads((tmp_path / "results" / "val_epoch0.json").read_text())
    assert len(saved) == val["val/poses"] > 0


def test_zero_predictions_give_zero_metrics(synthetic_crowd, tmp_path):
    _, ann = synthetic_crowd

    class Empty(PINetModule):
        def _predict_batch(self, batch):
            return {int(i): [] for i in batch["image_id"]}

    dm = make_datamodule(synthetic_crowd)
    module = Empty(codec=dm.codec, network=SMALL, val_annotation_file=str(ann))
    (val,) = make_trainer(tmp_path).validate(module, datamodule=dm)
    assert val["val/AP"] == 0.0 and val["val/poses"] == 0 and val["val/images"] == 8


def test_training_step_runs_without_a_trainer(synthetic_crowd):
    """A step run by hand (scripts/bench_train.py does) works, divergence guard included;
    a NaN loss is still caught."""
    dm = make_datamodule(synthetic_crowd)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = small_module()
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss) and loss.requires_grad
    with torch.no_grad():
        module.net.heads.offset.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="NaN or infinite"):
        module.training_step(batch, 1)
