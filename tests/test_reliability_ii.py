"""Issue 20 (Reliability II): the cases that crashed, passed silently or lost work, each with
the behaviour a user needs: a clear error at once naming the file / override and a fix that
works when followed, a logged and counted skip that was asked for, a non-zero exit for every
run that did not finish, and output files written whole or not at all. Training tests use
the tiny synthetic config (64 px, 8 train images, 2 steps an epoch, HRNet-W18-small, CPU)."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from pytorch_lightning.utilities._pytree import _tree_flatten
from tiny_run import SYNTHETIC, TINY_TRAINING, compose_config, read_checkpoint

from pinet_lightning.cli.config import check_trainer_settings, moved_settings
from pinet_lightning.cli.convert import main
from pinet_lightning.cli.eval import evaluate
from pinet_lightning.cli.predict import predict
from pinet_lightning.cli.train import train
from pinet_lightning.cli.warning_filters import quiet_third_party_warnings
from pinet_lightning.codec.codec import PINetCodec
from pinet_lightning.core import atomic
from pinet_lightning.core.images import read_image
from pinet_lightning.data.datamodule import PINetDataModule
from pinet_lightning.data.datasets import CocoKeypointDataset
from pinet_lightning.data.synthetic import generate_synthetic_crowd
from pinet_lightning.inference.predictor import Predictor, load_image
from pinet_lightning.model.checkpoints import save_model
from pinet_lightning.model.network import PINet
from pinet_lightning.training.losses import PINetLoss
from pinet_lightning.training.module import (
    DivergenceError,
    NonFiniteLossError,
    PINetModule,
    check_same_frame,
)

TINY = [*TINY_TRAINING, "data.batch_size=4", "trainer.accelerator=cpu",
        "callbacks.prediction_figure.num_images=0", "logger=[]"]


def _train_cfg(root: Path, run: Path, overrides: list[str], synthetic: bool = True):
    return compose_config(root, [f"paths.output_dir={run}", f"run_dir={run}", *TINY,
                                 *(SYNTHETIC if synthetic else []), *overrides])


def _all_finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


@pytest.fixture(scope="module")
def crowd(tmp_path_factory) -> Path:
    """8 synthetic 64 px CrowdPose-layout images, and variants of the annotation file."""
    root = tmp_path_factory.mktemp("crowd")
    generate_synthetic_crowd(root, num_images=8, image_size=64, max_people=3, seed=0)
    gt = json.loads((root / "annotations.json").read_text())
    (root / "no_images.json").write_text(json.dumps({**gt, "images": [], "annotations": []}))
    (root / "no_annotations.json").write_text(json.dumps({**gt, "annotations": []}))
    return root


def _custom(crowd: Path, **files: str) -> list[str]:
    """data=custom on the crowd; ``files``: split -> another annotation file name."""
    out = ["data=custom", "data.protocol=crowdpose"]
    for split in ("train", "val", "test"):
        out += [f"data.{split}.images={crowd / 'images'}",
                f"data.{split}.annotations={crowd / files.get(split, 'annotations.json')}"]
    return out


# ----------------------------------------------------------------- 1. divergence
def test_lr_1e6_stops_the_run_and_writes_no_diverged_weights(tmp_path):
    """The issue's case: lr=1e6 kept a finite loss while batch-norm variances became inf;
    the run ended with exit 0 and an inf model.pt / last.ckpt."""

    run = tmp_path / "run"
    with pytest.raises(DivergenceError, match="diverged and was stopped"):
        train(_train_cfg(tmp_path, run, ["trainer.max_epochs=3", "model.optimizer.lr=1e6"]))
    assert not (run / "checkpoints" / "model.pt").exists()
    assert not (run / "metrics.json").exists()
    last = run / "checkpoints" / "last.ckpt"
    assert not last.exists() or _all_finite(read_checkpoint(last)["state_dict"])


def test_non_finite_batch_norm_statistics_stop_the_run(tmp_path, monkeypatch):
    """A weight or buffer that becomes inf while the loss stays finite is found at the check
    interval (here 2 steps: the accelerator's on-device flag) and at the epoch end."""

    real_step = PINetModule.training_step

    def poisons_a_variance_at_3(self, batch, batch_idx):
        out = real_step(self, batch, batch_idx)
        if self.global_step == 3:
            self.net.pose_refinement.blocks[0].block1.norm.running_var.fill_(float("inf"))
        return out

    monkeypatch.setattr(PINetModule, "training_step", poisons_a_variance_at_3)
    run = tmp_path / "run"
    # the check of step 3 ran before its update and poisoning: the epoch end finds it
    with pytest.raises(DivergenceError, match=r"the weights became NaN or infinite after "
                                              r"step 3 \(epoch 1\) \(net\.pose_"
                                              r"refinement\.blocks\.0\.block1\.norm\."
                                              r"running_var\)"):
        train(_train_cfg(tmp_path, run, ["trainer.max_epochs=3", "test=false",
                                         "+model.finite_check_every=2"]))
    last = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2 and _all_finite(last["state_dict"])


def _exploding_loss(monkeypatch, at_step: int, factor: float) -> None:
    real_loss = PINetLoss.forward
    calls = []

    def explodes(self, outputs, targets, net):
        losses = real_loss(self, outputs, targets, net)
        calls.append(1)
        if len(calls) == at_step + 1:  # factor x larger (a NaN factor: a NaN loss)
            losses = {**losses, "loss": losses["loss"] * factor}
        return losses

    monkeypatch.setattr(PINetLoss, "forward", explodes)


def test_a_finite_loss_explosion_stops_the_run(tmp_path, monkeypatch):
    _exploding_loss(monkeypatch, at_step=4, factor=1e8)  # epoch 2; finite
    run = tmp_path / "run"
    with pytest.raises(DivergenceError, match=r"the training loss exploded at step 4 \(epoch "
                                              r"2\): it reached .* over 1e\+06 x the mean loss "
                                              r"of the run's first epoch"):
        train(_train_cfg(tmp_path, run, ["trainer.max_epochs=3", "test=false"]))
    last = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4 and last["loss_reference"] > 0  # carried for a resume


def test_the_explosion_rule_is_a_setting(tmp_path, monkeypatch):
    _exploding_loss(monkeypatch, at_step=4, factor=1e3)  # under the factor: goes on
    metrics = train(_train_cfg(tmp_path, tmp_path / "a", ["trainer.max_epochs=3",
                                                          "test=false"]))
    assert metrics["global_step"] == 6
    _exploding_loss(monkeypatch, at_step=4, factor=1e8)
    off = train(_train_cfg(tmp_path, tmp_path / "b", ["trainer.max_epochs=3", "test=false",
                                                      "model.explosion_factor=null"]))
    assert off["global_step"] == 6
    with pytest.raises((ValueError, InstantiationException), match="explosion_factor"):
        instantiate(compose_config(tmp_path, ["model.explosion_factor=0.5"]).model)


def test_epoch_end_check_keeps_a_late_nan_out_of_last_ckpt(tmp_path, monkeypatch):
    """The GPU interval (100 steps) does not land on the epoch's last step and no
    validation runs that epoch: only the epoch-end check stands between a NaN in the last
    step and last.ckpt."""

    _exploding_loss(monkeypatch, at_step=1, factor=float("nan"))  # step 1: epoch 0's last
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"between steps 0 and 1 \(epoch 0\)"):
        train(_train_cfg(tmp_path, run, ["trainer.max_epochs=2", "test=false",
                                         "trainer.check_val_every_n_epoch=5",
                                         "+model.finite_check_every=100"]))
    last = run / "checkpoints" / "last.ckpt"
    assert not last.exists() or _all_finite(read_checkpoint(last)["state_dict"])


def test_save_model_refuses_non_finite_weights(tmp_path):
    net = PINet("crowdpose", backbone="hrnet_w18_small", refine_layers=1)
    path = tmp_path / "model.pt"
    save_model(path, net)
    before = path.read_bytes()
    with torch.no_grad():
        net.pose_refinement.blocks[0].block1.norm.running_var[0] = float("inf")
    with pytest.raises(ValueError, match=r"refusing to write .*model\.pt: 1 tensors hold NaN"):
        save_model(path, net)
    assert path.read_bytes() == before


# ----------------------------------------------------------------- 2. SIGTERM
def test_sigterm_exits_143_with_the_resume_command(tmp_path, monkeypatch, caplog):
    real_step = PINetModule.training_step

    def terminated_at_3(self, batch, batch_idx):
        if self.global_step == 3:  # a preempted job: Lightning's handler notes the signal
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(PINetModule, "training_step", terminated_at_3)
    run = tmp_path / "run"
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as stop:
            train(_train_cfg(tmp_path, run, ["trainer.max_epochs=3", "test=false"]))
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert stop.value.code == 143  # None (exit status 0) before
    assert "stopped by SIGTERM" in caplog.text
    assert f"run_dir={run} ckpt_path=last" in caplog.text
    step = read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"]
    assert step in (3, 4)
    monkeypatch.setattr(PINetModule, "training_step", real_step)
    resumed = train(_train_cfg(tmp_path, run, ["trainer.max_epochs=3", "test=false",
                                               "ckpt_path=last"]))
    assert resumed["start_step"] == step and resumed["global_step"] == 6


# ----------------------------------------------------------------- 3, 6. empty splits
def test_an_empty_val_split_stops_before_training(tmp_path, crowd):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"data\.val: .*no_images\.json has no image to "
                                         r"evaluate(.|\n)*lists 0 images(.|\n)*Fix: point "
                                         r"data\.val\.annotations at a COCO keypoint file"):
        train(_train_cfg(tmp_path, run, [*_custom(crowd, val="no_images.json", test="x.json"),
                                         "trainer.max_epochs=1"], synthetic=False))
    assert not (run / "checkpoints").exists()  # nothing trained


def test_an_empty_test_split_stops_before_training_and_test_false_skips_it(tmp_path, crowd):
    files = _custom(crowd, test="no_images.json")
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"data\.test: .*no_images\.json has no image(.|\n)*"
                                         r"with pinet-train, test=false skips the test"):
        train(_train_cfg(tmp_path, run, [*files, "trainer.max_epochs=1"], synthetic=False))
    assert not (run / "checkpoints").exists()  # before: trained, then tested nothing, rc 0
    metrics = train(_train_cfg(tmp_path, run, [*files, "trainer.max_epochs=1", "test=false"],
                               synthetic=False))  # the fix, followed
    assert metrics["global_step"] == 2 and "val/AP" in metrics


@pytest.mark.parametrize("file,what", [("no_images.json", "0 images and 0 person"),
                                       ("no_annotations.json", "8 images and 0 person")])
def test_a_training_file_without_people_is_a_clear_error(tmp_path, crowd, file, what):
    dm = PINetDataModule(codec=PINetCodec(input_size=64),
                         train={"images": crowd / "images", "annotations": crowd / file},
                         num_workers=0)
    # before: torch's "num_samples=0" from the sampler, after a log line "training on 0 images"
    with pytest.raises(ValueError, match=rf"data\.train: .*{file} has no image to train on "
                                         rf"\(training needs an image with at least one "
                                         rf"annotation\): it lists {what}"):
        dm.setup("fit")


def test_pinet_eval_on_an_empty_split_fails(tmp_path, crowd, tiny_model):
    cfg = compose_config(tmp_path, [f"ckpt_path={tiny_model}",
                                    *_custom(crowd, test="no_images.json"), "input_size=64",
                                    "data.num_workers=0",
                                    "trainer.accelerator=cpu", f"run_dir={tmp_path / 'e'}",
                                    f"paths.output_dir={tmp_path / 'e'}"], "eval")
    with pytest.raises(ValueError, match=r"data\.test: .*no_images\.json has no image to "
                                         r"evaluate"):
        evaluate(cfg)  # before: exit 0 and a metrics.json without metrics
    assert not (tmp_path / "e" / "metrics.json").exists()


# ----------------------------------------------------------------- 4. EXIF orientation
def test_inference_reads_a_photo_the_way_it_is_displayed(rotated_photo):
    path, upright = rotated_photo
    shown = load_image(path)
    assert shown.shape == (40, 60, 3)  # (60, 40, 3) before: the stored, sideways pixels
    assert np.abs(shown.astype(int) - upright).mean() < 4  # JPEG noise only
    assert shown[:15, :20, 0].mean() > 200 and shown[25:, 40:, 0].mean() < 60  # red top left
    # training and evaluation data keep the stored pixels: tests/core/test_images.py


def test_predicted_keypoints_are_in_the_displayed_frame(rotated_photo, tiny_model, tmp_path):
    path, _ = rotated_photo
    predictor = Predictor.from_checkpoint(tiny_model, device="cpu")
    displayed = np.ascontiguousarray(np.rot90(read_image(path), -1))  # turned by hand
    from_file, from_array = predictor(path), predictor(displayed)
    assert len(from_file) == len(from_array) > 0
    for a, b in zip(from_file, from_array, strict=True):
        np.testing.assert_array_equal(a.keypoints, b.keypoints)
    # pinet-predict records the displayed size

    out = tmp_path / "out"
    predict(compose_config(tmp_path, [f"ckpt_path={tiny_model}", f"input={path}",
                                      f"output_dir={out}", f"paths.output_dir={out}",
                                      "device=cpu", "draw=false"],
                           "predict"))
    (record,) = json.loads((out / "image_ids.json").read_text())
    assert (record["height"], record["width"]) == (40, 60)


# ----------------------------------------------------------------- 5. 0-byte images
@pytest.fixture()
def with_empty_image(tmp_path, crowd) -> tuple[Path, str]:
    images = tmp_path / "images"
    images.mkdir()
    for path in (crowd / "images").iterdir():
        (images / path.name).write_bytes(path.read_bytes())
    empty = sorted(images.iterdir())[2]
    empty.write_bytes(b"")
    return images, empty.name


def test_a_zero_byte_image_is_named_when_the_dataset_is_built(with_empty_image, crowd):
    images, name = with_empty_image
    # before: cv2's "!buf.empty()" assertion at the first step, naming no file
    with pytest.raises(FileNotFoundError, match=rf"1 empty file \(0 bytes\) \(image id file\): "
                                                rf"3 {name}(.|\n)*data\.skip_invalid=true"):
        CocoKeypointDataset(images, crowd / "annotations.json", codec=PINetCodec(input_size=64))
    with pytest.raises(OSError, match=rf"image .*{name} is empty \(0 bytes\)"):
        read_image(images / name)


def test_skip_invalid_skips_a_zero_byte_image_with_a_count(with_empty_image, crowd, caplog):
    images, name = with_empty_image
    with caplog.at_level(logging.WARNING):
        dataset = CocoKeypointDataset(images, crowd / "annotations.json",
                                      codec=PINetCodec(input_size=64), skip_invalid=True)
    assert len(dataset) == 7 and 3 not in dataset.image_ids
    assert "skipped 1 images" in caplog.text and name in caplog.text
    assert all(dataset[i]["image"].shape[0] == 3 for i in range(len(dataset)))


def test_pinet_predict_lists_a_zero_byte_image_as_unreadable(with_empty_image, tiny_model,
                                                             tmp_path):
    images, name = with_empty_image
    out = tmp_path / "out"
    summary = predict(compose_config(tmp_path, [f"ckpt_path={tiny_model}", f"input={images}",
                                                f"output_dir={out}", f"paths.output_dir={out}",
                                                "device=cpu", "draw=false"], "predict"))
    assert summary["images"] == 7 and summary["unreadable"] == 1
    (entry,) = json.loads((out / "unreadable.json").read_text())
    assert entry["file_name"] == name and "empty (0 bytes)" in entry["error"]


# ----------------------------------------------------------------- 7. trainer types
def test_a_trainer_setting_of_the_wrong_type_names_the_override(tmp_path):
    with pytest.raises(ValueError, match=r"trainer\.max_epochs='abc' is not valid: Lightning's "
                                         r"Trainer takes an integer or null there; pass e\.g\. "
                                         r"trainer\.max_epochs=10"):
        train(_train_cfg(tmp_path, tmp_path / "run", ["trainer.max_epochs=abc"]))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_trainer_settings_check_accepts_good_values_and_refuses_wrong_types():
    # every trainer config: tests/cli/test_configs.py::test_trainer_options_compose
    good = {"precision": "bf16-mixed", "limit_val_batches": 0.5, "gradient_clip_val": 1,
            "deterministic": "warn", "devices": "auto", "max_steps": -1}
    check_trainer_settings(good)
    for key, value in [("max_epochs", 2.5), ("precision", "bf17"), ("max_steps", None),
                       ("log_every_n_steps", "often"), ("limit_val_batches", "half")]:
        with pytest.raises(ValueError, match=rf"trainer\.{key}="):
            check_trainer_settings({key: value})


# ----------------------------------------------------------------- 8, 9. layouts
def test_data_layout_alone_is_refused_before_the_first_step(tmp_path):
    """``data.layout=coco`` (instead of the top-level ``layout=coco``) no longer reaches the
    first step: it names no setting (the codec holds the layout) and is answered with the
    override that works; a data module built with another codec than the model's is refused
    at setup, naming what differs."""

    # before: a shape mismatch at step 1 saying only "check the layout"
    assert moved_settings(["data.layout=coco"])[0].endswith("pass layout=coco")
    with pytest.raises(ValueError, match=r"codec differs from the model's in \['layout'\]"):
        check_same_frame(PINetCodec("coco", input_size=64), PINetCodec("crowdpose",
                                                                      input_size=64))
    cfg = compose_config(tmp_path, ["layout=coco"])  # the fix, followed
    dm, model = instantiate(cfg.data, _convert_="all"), instantiate(cfg.model, _convert_="all")
    check_same_frame(dm.codec, model.codec)
    assert model.net.layout.name == dm.codec.layout.name == "coco"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, crowd) -> Path:
    """An untrained HRNet-W18-small PINet saved as model.pt (input 64), carrying the data
    settings of a run on the crowd (what training's model.pt holds)."""
    torch.manual_seed(0)
    net = PINet("crowdpose", backbone="hrnet_w18_small", refine_layers=1)
    split = {"images": str(crowd / "images"), "annotations": str(crowd / "annotations.json")}
    data = {"protocol": "crowdpose", "train": split, "val": split, "test": split,
            "num_workers": 0, "pin_memory": False}
    codec = PINetCodec("crowdpose", input_size=64).to_dict()
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(path, net, extra={"codec": codec, "decode": {"flip_test": False},
                                 "data": data})
    return path


def test_pinet_eval_on_another_layout_gives_a_fix_that_works(tmp_path, tiny_model):
    coco = tmp_path / "coco17"
    generate_synthetic_crowd(coco, num_images=2, image_size=64, max_people=2, layout="coco")
    data = ["data=custom", *[f"data.{s}.{k}={coco / v}" for s in ("train", "val", "test")
                             for k, v in (("images", "images"),
                                          ("annotations", "annotations.json"))],
            "input_size=64", "data.num_workers=0"]
    base = [f"ckpt_path={tiny_model}", "trainer.accelerator=cpu"]
    # before: "choose ... with the top-level override layout=coco", which pinet-eval ignores
    with pytest.raises(ValueError, match=r"17 keypoints, but the checkpoint .* layout "
                                         r"'crowdpose' \(14 keypoints\)(.|\n)*layout=\.\.\. does "
                                         r"not change it\): drop data=\.\.\."):
        evaluate(compose_config(tmp_path, [*base, *data, f"run_dir={tmp_path / 'a'}",
                                           f"paths.output_dir={tmp_path / 'a'}"], "eval"))
    metrics = evaluate(compose_config(tmp_path, [*base, f"run_dir={tmp_path / 'b'}",
                                                 f"paths.output_dir={tmp_path / 'b'}"], "eval"))
    assert metrics["split"] == "test" and 0.0 <= metrics["test/AP"] <= 1.0  # followed: works


# ----------------------------------------------------------------- 10. pinet-convert
def test_pinet_convert_names_its_own_trust_flag(tmp_path, capsys):
    crafted = tmp_path / "crafted.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "meta": argparse.Namespace(a=1)}, crafted)
    with pytest.raises(SystemExit) as stop:
        main([str(crafted), str(tmp_path / "out.pt")])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert "--trust-checkpoint" in err and "trust_checkpoint=" not in err  # a Hydra key before
    with pytest.raises(SystemExit):  # the hint followed: past the refusal, on to the content
        main([str(crafted), str(tmp_path / "out.pt"), "--trust-checkpoint"])
    err = capsys.readouterr().err
    assert "not the published PINet's weights" in err and "refused" not in err


# ----------------------------------------------------------------- 11. atomic outputs
def _disk_full_for(monkeypatch, name_part: str) -> None:
    """Writes of files whose name holds ``name_part`` fail half-way with ENOSPC."""
    real = atomic._write

    def full(path, file, data):
        if name_part in Path(path).name:
            file.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, file, data)

    monkeypatch.setattr(atomic, "_write", full)


def test_a_full_disk_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic.write_json(path, {"AP": 0.5})
    _disk_full_for(monkeypatch, "metrics")
    with pytest.raises(OSError, match=r"cannot write .*metrics\.json: No space left on device"
                                      ) as err:
        atomic.write_json(path, {"AP": 0.6, "more": list(range(1000))})
    assert err.value.errno == errno.ENOSPC
    assert json.loads(path.read_text()) == {"AP": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left


def test_pinet_predict_on_a_full_disk_writes_no_truncated_results(tiny_model, crowd, tmp_path,
                                                                  monkeypatch):
    _disk_full_for(monkeypatch, "results.json")
    out = tmp_path / "out"
    cfg = compose_config(tmp_path, [f"ckpt_path={tiny_model}", f"input={crowd / 'images'}",
                                    f"output_dir={out}", f"paths.output_dir={out}", "device=cpu",
                                    "draw=false"], "predict")
    # before: a truncated results.json (not JSON), no image_ids.json, no path in the error
    with pytest.raises(OSError, match=rf"cannot write {out / 'results.json'}: No space left"):
        predict(cfg)
    assert not (out / "results.json").exists()
    assert len(json.loads((out / "image_ids.json").read_text())) == 8
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_full_disk_never_leaves_a_cut_short_checkpoint(tmp_path, monkeypatch):
    _disk_full_for(monkeypatch, "epoch_000.ckpt")
    run = tmp_path / "run"
    with pytest.raises(OSError, match=r"cannot write .*epoch_000\.ckpt: No space left"):
        train(_train_cfg(tmp_path, run, ["trainer.max_epochs=2"]))
    ckpts = run / "checkpoints"
    assert not (ckpts / "epoch_000.ckpt").exists()  # before: a partial file, a valid name
    assert not [p for p in ckpts.iterdir() if p.name.endswith(".tmp")]
    assert read_checkpoint(ckpts / "last.ckpt")["global_step"] == 2  # written on the error, whole


# ----------------------------------------------------------------- noise
def test_the_lightning_leafspec_warning_is_filtered_narrowly():
    text = "`isinstance(treespec, LeafSpec)` is deprecated, use something else"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_third_party_warnings()
        _tree_flatten(1)  # Lightning's own code path that raised it on every batch
        warnings.warn_explicit(text, FutureWarning, "module.py", 1, module="pinet_lightning.x")
        warnings.warn_explicit("another message", FutureWarning, "_pytree.py", 21,
                               module="pytorch_lightning.utilities._pytree")
    shown = [(w.category, str(w.message)) for w in seen]
    assert (FutureWarning, text) in shown  # ours, same text: kept
    assert (FutureWarning, "another message") in shown  # Lightning's, another text: kept
    assert sum("LeafSpec" in m for _, m in shown) == 1


# ----------------------------------------------------------------- planted bugs
def test_the_data_module_defaults_to_the_crowdpose_protocol():
    """Built bare (the API), the default CrowdPose layout is scored by CrowdPose's rules."""
    dm = PINetDataModule(val={"images": "x", "annotations": "x.json"})
    assert dm.layout.name == "crowdpose" and dm.protocol == "crowdpose"
    assert dm.evaluator("val").protocol == "crowdpose"
