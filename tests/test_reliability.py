"""Issue 10 (and issue 9 point 9): bad input is refused at once with the file / id named,
evaluation never returns a silent wrong metric, training never loses work, the reported
checkpoint is the last one. Training tests use the tiny synthetic config (64 px, 8 train
images, 2 steps an epoch, HRNet-W18-small, CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from tiny_run import compose_config, read_checkpoint, tiny_run

from pinet_lightning.cli.predict import predict
from pinet_lightning.cli.train import train
from pinet_lightning.codec.codec import PINetCodec
from pinet_lightning.core.layouts import get_layout
from pinet_lightning.data.datasets import CocoKeypointDataset
from pinet_lightning.evaluation.coco import evaluate_keypoints
from pinet_lightning.inference.predictor import Predictor
from pinet_lightning.model.checkpoints import save_model
from pinet_lightning.model.network import PINet
from pinet_lightning.training.losses import PINetLoss
from pinet_lightning.training.module import PINetModule
from pinet_lightning.training.report import reported_checkpoint

K = 14
SIGMAS = list(get_layout("crowdpose").sigmas)
PROTOCOLS = ["coco", "crowdpose"]


# ----------------------------------------------------------------- evaluation
def _gt(with_dog: bool = False) -> tuple[dict, list[dict]]:
    """Two images, three people with every keypoint labelled; perfect predictions."""
    rng = np.random.default_rng(1)
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480,
               "crowdIndex": 0.1} for i in (1, 2)]
    anns, preds = [], []
    for n, (image_id, x0) in enumerate([(1, 20), (1, 320), (2, 100)]):
        xy = rng.uniform(0, 1, (K, 2)) * [200, 300] + [x0, 50]
        kp = np.concatenate([xy, np.full((K, 1), 2.0)], 1).ravel().round(2).tolist()
        box = [float(xy[:, 0].min()), float(xy[:, 1].min()), float(np.ptp(xy[:, 0])),
               float(np.ptp(xy[:, 1]))]
        anns.append({"id": n + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                     "keypoints": kp, "num_keypoints": K, "bbox": box})
        preds.append({"image_id": image_id, "category_id": 1, "keypoints": list(kp),
                      "score": 0.9 - 0.1 * n})
    cats = [{"id": 1, "name": "person", "keypoints": [f"k{i}" for i in range(K)]}]
    if with_dog:  # same poses, labelled as another category that also has keypoints
        cats.append({"id": 2, "name": "dog", "keypoints": [f"k{i}" for i in range(K)]})
        anns += [dict(a, id=a["id"] + 10, category_id=2) for a in anns]
    return {"images": images, "annotations": anns, "categories": cats}, preds


def _evaluate(gt, preds, protocol, **kwargs):
    return evaluate_keypoints(gt, preds, protocol, sigmas=SIGMAS, **kwargs)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_perfect_predictions_score_one(protocol):
    gt, preds = _gt()
    assert _evaluate(gt, preds, protocol)["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_nan_prediction_keypoints_are_refused_naming_the_entry(protocol, tmp_path):
    gt, preds = _gt()
    preds[1]["keypoints"] = [float("nan")] * (3 * K)  # scored AP 1.0 under coco before
    path = tmp_path / "preds.json"
    path.write_text(json.dumps(preds))  # json writes NaN, Python reads it back
    with pytest.raises(ValueError, match=r"preds\.json: 1 predictions have NaN or infinite "
                                         r"keypoint values; the first is entry 1 \(image_id 1\)"):
        _evaluate(gt, path, protocol)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_nan_in_the_ground_truth_is_refused_naming_file_and_id(protocol, tmp_path):
    gt, preds = _gt()
    gt["annotations"][2]["keypoints"][4] = float("nan")
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    with pytest.raises(ValueError, match=r"gt\.json(.|\n)*'keypoints' values NaN or infinite: "
                                         r"1 annotation, id 3"):
        _evaluate(path, preds, protocol)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_nan_scores_are_refused_under_both_protocols(protocol):
    gt, preds = _gt()
    preds[2]["score"] = float("nan")
    with pytest.raises(ValueError, match=r"'score' that is not a finite number; the first is "
                                         r"entry 2 \(image_id 2\)"):
        _evaluate(gt, preds, protocol)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_missing_score_is_a_clear_error_not_a_key_error(protocol):
    gt, preds = _gt()
    del preds[0]["score"]
    with pytest.raises(ValueError, match=r"predictions: 1 predictions have no 'score'; the "
                                         r"first is entry 0"):
        _evaluate(gt, preds, protocol)


def test_invalid_json_files_name_the_file(tmp_path):
    gt, preds = _gt()
    bad = tmp_path / "preds.json"
    bad.write_text('[{"image_id": 1,')
    with pytest.raises(ValueError, match=r"preds\.json is not valid JSON"):
        _evaluate(gt, bad, "coco")
    with pytest.raises(ValueError, match=r"preds\.json is not valid JSON"):
        _evaluate(bad, preds, "coco")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_other_categories_do_not_change_the_person_ap(protocol):
    gt, preds = _gt(with_dog=True)  # halved the AP of perfect predictions before
    assert _evaluate(gt, preds, protocol)["AP"] == pytest.approx(1.0)


def test_ground_truth_without_bbox_is_evaluated(tmp_path):
    gt, preds = _gt()
    for ann in gt["annotations"]:
        del ann["bbox"]  # a KeyError in the coco protocol before
    metrics = _evaluate(gt, preds, "coco")
    assert metrics["AP"] == pytest.approx(1.0)


def test_prediction_category_must_be_the_person_category():
    gt, preds = _gt()
    preds[0]["category_id"] = 2
    with pytest.raises(ValueError, match=r"category_id other than the ground truth's person "
                                         r"category \(1\); the first is entry 0"):
        _evaluate(gt, preds, "coco")
    del preds[0]["category_id"]  # absent: the person category
    assert _evaluate(gt, preds, "coco")["AP"] == pytest.approx(1.0)


def test_skip_invalid_leaves_bad_ground_truth_images_out():
    gt, preds = _gt()
    gt["annotations"][2]["keypoints"][4] = None
    # image 2 (person 3) is left out, with its prediction: the rest still scores 1.0
    metrics = _evaluate(gt, preds, "crowdpose", skip_invalid=True)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AR"] == pytest.approx(1.0)


# ----------------------------------------------------------------- config time

def test_input_size_not_a_multiple_of_32_fails_at_construction(tmp_path):
    cfg = compose_config(tmp_path, ["codec.input_size=500"])
    # before: the first training step crashed inside HRNet, naming no setting
    with pytest.raises((ValueError, InstantiationException),
                       match=r"codec\.input_size=500 must be a positive multiple of 32.*"
                             r"codec\.input_size=480 or 512"):
        instantiate(cfg.data, _convert_="all")
    dm = instantiate(compose_config(tmp_path, ["codec.input_size=96"]).data, _convert_="all")
    assert dm.codec.input_size == 96


def test_keypoint_count_hint_names_the_working_override(tmp_path):
    gt, _ = _gt()
    for ann in gt["annotations"]:  # 17 keypoints, as COCO
        ann["keypoints"] = ann["keypoints"] + [1.0, 1.0, 2] * 3
    gt["categories"][0]["keypoints"] = [f"k{i}" for i in range(17)]
    path = tmp_path / "coco17.json"
    path.write_text(json.dumps(gt))
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError) as err:
        CocoKeypointDataset(tmp_path / "images", path, codec=PINetCodec("crowdpose"))
    text = str(err.value)
    assert "coco17.json" in text and "17 keypoints" in text and "14 are expected" in text
    assert "layout=coco" in text and "data.layout" not in text  # data.layout=... crashed later


# ----------------------------------------------------------------- predictor and predict
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """An untrained HRNet-W18-small PINet saved as model.pt (input size 64)."""

    torch.manual_seed(0)
    net = PINet("crowdpose", backbone="hrnet_w18_small", refine_layers=1)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(path, net, extra={"input_size": 64, "decode": {"flip_test": False}})
    return path


def test_predictor_on_an_empty_image_is_a_value_error(tiny_model):
    predictor = Predictor.from_checkpoint(tiny_model, device="cpu")
    with pytest.raises(ValueError, match=r"empty \(0 x 0 pixels\)"):
        predictor(np.zeros((0, 0, 3), np.uint8))  # ZeroDivisionError before


def test_pinet_predict_goes_past_unreadable_images(tiny_model, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    image = np.full((64, 80, 3), 120, np.uint8)
    cv2.imwrite(str(folder / "a.jpg"), image)
    cv2.imwrite(str(folder / "d.png"), image)
    data = cv2.imencode(".jpg", image)[1].tobytes()
    (folder / "b.jpg").write_bytes(data[: len(data) // 2])  # truncated
    (folder / "c.jpg").mkdir()  # a folder named like an image
    (folder / "e.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    cfg = compose_config(tmp_path, [f"ckpt_path={tiny_model}", f"input={folder}",
                                    f"output_dir={out}", f"paths.output_dir={out}", "device=cpu",
                                    "draw=false"], "predict")
    summary = predict(cfg)
    assert summary["images"] == 2 and summary["unreadable"] == 3
    ids = json.loads((out / "image_ids.json").read_text())
    assert [i["file_name"] for i in ids] == ["a.jpg", "d.png"]
    results = json.loads((out / "results.json").read_text())
    assert {r["image_id"] for r in results} <= {1, 2}
    unreadable = {u["file_name"]: u["error"] for u in
                  json.loads((out / "unreadable.json").read_text())}
    assert sorted(unreadable) == ["b.jpg", "c.jpg", "e.png"]
    assert "truncated JPEG" in unreadable["b.jpg"]
    assert "is a folder" in unreadable["c.jpg"]  # "does not exist" before
    assert "cannot decode" in unreadable["e.png"]


def test_pinet_predict_writes_results_for_what_it_read_when_stopped(tiny_model, tmp_path,
                                                                   monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        cv2.imwrite(str(folder / name), np.full((64, 64, 3), 100, np.uint8))
    real = Predictor.predict
    calls = []

    def second_fails(self, images):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real(self, images)

    monkeypatch.setattr(Predictor, "predict", second_fails)
    out = tmp_path / "out"
    cfg = compose_config(tmp_path, [f"ckpt_path={tiny_model}", f"input={folder}",
                                    f"output_dir={out}", f"paths.output_dir={out}", "device=cpu",
                                    "draw=false"], "predict")
    with pytest.raises(RuntimeError, match="device lost"):
        predict(cfg)
    ids = json.loads((out / "image_ids.json").read_text())
    assert [i["file_name"] for i in ids] == ["a.jpg"]
    assert isinstance(json.loads((out / "results.json").read_text()), list)


# ----------------------------------------------------------------- training
TINY = tiny_run("data.batch_size=4", "trainer.accelerator=cpu",
                "callbacks.prediction_figure.num_images=0", "logger=[]")


def _train_cfg(root: Path, run_dir: Path, overrides: list[str]):
    return compose_config(root, [f"paths.output_dir={run_dir}", f"run_dir={run_dir}", *TINY,
                                 *overrides])


def test_reported_checkpoint_rule():
    assert reported_checkpoint("last", "epoch_001.ckpt", "last.ckpt") == "last.ckpt"
    assert reported_checkpoint("best", "epoch_001.ckpt", "last.ckpt") == "epoch_001.ckpt"
    assert reported_checkpoint("best", None, "last.ckpt") == "last.ckpt"  # no validation
    assert reported_checkpoint("last", None, None) is None
    with pytest.raises(ValueError, match="reported_checkpoint"):
        reported_checkpoint("top", None, None)


def test_flat_val_ap_keeps_last_ckpt_current_and_reports_it(tmp_path):
    run = tmp_path / "run"
    # no pose passes the peak threshold: val/AP is 0.0 at every epoch (flat)
    flat = ["trainer.max_epochs=4", "decode.score_threshold=1e9"]
    metrics = train(_train_cfg(tmp_path, run, flat))
    ckpts = run / "checkpoints"
    assert metrics["global_step"] == 8 and metrics["val/AP"] == 0.0
    last = read_checkpoint(ckpts / "last.ckpt")
    assert last["global_step"] == 8 and last["epoch"] == 3  # step 2 (epoch 0) before
    # the best val/AP file is the first epoch's; the reported one is the last (published)
    assert Path(metrics["best_checkpoint"]).name == "epoch_000.ckpt"
    assert metrics["reported_checkpoint"] == str(ckpts / "last.ckpt")
    model = torch.load(ckpts / "model.pt", map_location="cpu", weights_only=True)
    key = next(k for k in model["state_dict"] if k.endswith("weight"))
    assert torch.equal(model["state_dict"][key], last["state_dict"][f"net.{key}"])
    assert model["extra"]["checkpoint"] == str(ckpts / "last.ckpt")
    # written once tested: the model file records the metrics of the weights it holds
    assert model["extra"]["metrics"]["test/AP"] == pytest.approx(metrics["test/AP"])
    assert metrics["model_path"] == str(ckpts / "model.pt")

    # a resume that gets no further leaves metrics.json and model.pt alone
    saved = (run / "metrics.json").read_text()
    model_time = (ckpts / "model.pt").stat().st_mtime_ns
    again = train(_train_cfg(tmp_path, run, [*flat, "ckpt_path=last"]))
    assert again["start_step"] == 8 and again["global_step"] == 8
    assert again["outputs_kept_from_step"] == 8
    assert (run / "metrics.json").read_text() == saved
    assert (ckpts / "model.pt").stat().st_mtime_ns == model_time


def test_interrupted_run_resumes_at_the_step_it_reached(tmp_path, monkeypatch):
    real_step = PINetModule.training_step

    def interrupted_at_3(self, batch, batch_idx):
        if self.global_step == 3:  # Ctrl-C in the middle of epoch 1
            raise KeyboardInterrupt
        return real_step(self, batch, batch_idx)

    run = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(PINetModule, "training_step", interrupted_at_3)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown
            train(_train_cfg(tmp_path, run, ["trainer.max_epochs=3", "test=false"]))
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT afterwards
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 3
    monkeypatch.setattr(PINetModule, "training_step", real_step)
    resumed = train(_train_cfg(tmp_path, run, ["trainer.max_epochs=3", "test=false"]))
    assert resumed["start_step"] == 3 and resumed["global_step"] == 6
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 6


@pytest.mark.parametrize("every,where", [(None, "at step 3"), (2, "between steps 2 and 3")])
def test_non_finite_loss_stops_training_and_keeps_last_ckpt(tmp_path, monkeypatch, every,
                                                            where):
    real_loss = PINetLoss.forward
    steps = []

    def diverges_at_3(self, outputs, targets, net):
        losses = real_loss(self, outputs, targets, net)
        steps.append(1)
        if len(steps) == 4:  # step 3: as lr=1e6 does, a little later
            losses = {**losses, "loss": losses["loss"] * float("inf"),
                      "heatmap": losses["heatmap"] * float("nan")}
        return losses

    monkeypatch.setattr(PINetLoss, "forward", diverges_at_3)
    # every=2: the accelerator path, an on-device flag read every 2 steps
    check = [] if every is None else [f"+model.finite_check_every={every}"]
    run = tmp_path / "run"
    # FloatingPointError: module.NonFiniteLossError (before: the run went on, exit 0)
    with pytest.raises(FloatingPointError, match=rf"NaN or infinite \(loss, heatmap\) "
                                                 rf"{where} \(epoch 1\)"):
        train(_train_cfg(tmp_path, run, ["trainer.max_epochs=3", "test=false", *check]))
    last = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2  # the end of epoch 0; not overwritten by the crash
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values()
               if v.is_floating_point())
    assert not (run / "metrics.json").exists()


@pytest.mark.slow
def test_ddp_training_writes_last_ckpt_every_epoch(tmp_path):
    """2 CPU processes: the epoch-end last.ckpt (a collective save) and the per-step finite
    check (a summed flag) run on both ranks in the same order; no deadlock."""

    exe = Path(sys.executable).with_name("pinet-train")
    if not exe.exists():
        pytest.skip("console script pinet-train not installed (pip install -e .)")
    run = tmp_path / "run"
    args = [a for a in TINY if not a.startswith(("trainer.accelerator", "data.batch_size"))]
    env = {**os.environ, "PINET_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cmd = [str(exe), "trainer=ddp_cpu", "trainer.devices=2", *args, "data.batch_size=2",
           "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=2", "test=false",
           f"run_dir={run}", "+model.finite_check_every=3"]  # epoch-end checks too
    # its own process group: a deadlock (the failure this test guards) is killed whole
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("DDP training did not finish in 300 s (a collective deadlock?)")
    assert proc.returncode == 0, err[-3000:]
    # 8 images, 2 ranks x batch 2: 2 steps an epoch
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 6
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 6
