"""The Hydra entry points end to end on tiny synthetic data (CPU): train (fast_dev_run and a
real short fit), resume from ``last.ckpt``, ``pinet-eval`` on the checkpoint,
``pinet-predict`` on a folder and a video, wandb offline, the ``scripts/`` wrappers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from tiny_run import compose_config, tiny_run

from pinet_lightning.cli.train import train
from pinet_lightning.model.checkpoints import convert_published

REPO = Path(__file__).resolve().parents[2]

# tiny and fast: 64 px images, 8 train / 2 val images, 2 steps an epoch, 1 refine block
NO_FIGURE = "callbacks.prediction_figure.num_images=0"
TINY = tiny_run("data.batch_size=4", "trainer.accelerator=cpu",
                "callbacks.prediction_figure.num_images=1")


def _compose(root: Path, run_dir: Path, overrides: list[str], tiny: bool = True):
    return compose_config(root, [f"paths.output_dir={run_dir}", f"run_dir={run_dir}",
                                 *(TINY if tiny else []), *overrides])


def _env(root: Path) -> dict[str, str]:
    """Subprocess environment: outputs under ``root``, no network, no user wandb config."""
    env = {**os.environ, "PINET_ROOT": str(root), "WANDB_MODE": "offline",
           "WANDB_CONFIG_DIR": str(root / ".wandb_config"),
           "WANDB_CACHE_DIR": str(root / ".wandb_cache"), "WANDB_DATA_DIR": str(root / ".wandb"),
           "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_API_KEY", None)
    return env


def _run(args: list[str], root: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=root, env=_env(root), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def _bin(name: str) -> str:
    """The console script installed beside this interpreter."""
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        pytest.skip(f"console script {name} not installed (pip install -e .)")
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short real fit (one epoch = 2 steps): run dir and its metrics."""
    root = tmp_path_factory.mktemp("trained")
    run_dir = root / "run"
    metrics = train(_compose(root, run_dir, ["trainer.max_epochs=1"]))
    return run_dir, metrics


def test_train_writes_a_complete_run_directory(trained):
    run_dir, metrics = trained
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["global_step"] == 2 and saved["start_step"] == 0
    for key in ("val/AP", "test/AP", "test/AP50", "test/AR", "test/AP_easy", "best/val/AP"):
        assert 0.0 <= saved[key] <= 1.0 or saved[key] == -1.0, key
    assert saved["test/images"] == 2.0  # the whole synthetic val/test set was evaluated
    assert saved["test/AP"] == pytest.approx(metrics["test/AP"])
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "last.ckpt").is_file() and (ckpts / "model.pt").is_file()
    assert Path(saved["best_checkpoint"]).parent == ckpts
    assert saved["last_checkpoint"] == str(ckpts / "last.ckpt")
    assert (run_dir / "predictions.png").stat().st_size > 0
    assert (run_dir / "learning_curve.png").stat().st_size > 0  # callbacks.LearningCurve
    # the resolved config: no interpolation left, the tiny settings in it
    text = (run_dir / "config.yaml").read_text()
    assert "${" not in text and "input_size: 64" in text
    # CSV logging by default: per-step losses and the per-epoch evaluation
    (csv_file,) = (run_dir / "csv").glob("version_*/metrics.csv")
    header = csv_file.read_text().splitlines()[0].split(",")
    assert "train/loss" in header and "val/AP" in header
    # data generated once into <root>/data/synthetic
    assert (run_dir.parent / "data" / "synthetic" / "train" / "annotations.json").is_file()


def test_train_false_tests_the_given_checkpoint(trained, tmp_path):
    run_dir, metrics = trained
    out = train(_compose(run_dir.parent, tmp_path / "t", [
        "train=false", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        NO_FIGURE]))
    assert out["test/AP"] == pytest.approx(metrics["test/AP"], abs=1e-9)
    assert out["test/AR"] == pytest.approx(metrics["test/AR"], abs=1e-9)
    assert out["global_step"] == 0  # nothing trained


def test_fast_dev_run_on_synthetic_cpu(tmp_path):
    run_dir = tmp_path / "dev"
    metrics = train(_compose(tmp_path, run_dir, ["trainer.fast_dev_run=true"]))
    assert metrics["global_step"] == 1
    assert "val/AP" in metrics and "test/AP" in metrics
    assert metrics["test/images"] == 1.0  # fast_dev_run: one batch of one image
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 1


def test_resume_continues_from_the_saved_step(tmp_path):
    run_dir = tmp_path / "run"
    first = train(_compose(tmp_path, run_dir, ["trainer.max_steps=2", "test=false",
                                               NO_FIGURE]))
    assert first["global_step"] == 2 and first["start_step"] == 0
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file()
    # explicit: ckpt_path=last, with more steps
    second = train(_compose(tmp_path, run_dir, ["trainer.max_steps=4", "ckpt_path=last",
                                                "test=false", NO_FIGURE]))
    assert second["start_step"] == 2 and second["global_step"] == 4
    assert second["resumed_from"] == str(last)
    assert second["epoch"] == 2
    # automatic: the run directory already holds last.ckpt (a requeued job)
    third = train(_compose(tmp_path, run_dir, ["trainer.max_steps=6", "test=false",
                                               NO_FIGURE]))
    assert third["start_step"] == 4 and third["global_step"] == 6
    # resume=never starts over
    fourth = train(_compose(tmp_path, tmp_path / "fresh", ["trainer.max_steps=2", "test=false",
                                                           NO_FIGURE,
                                                           "resume=never"]))
    assert fourth["start_step"] == 0


def test_ckpt_path_last_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run_dir=<the run directory"):
        train(_compose(tmp_path, tmp_path / "empty", ["ckpt_path=last"]))


def test_custom_data_without_paths_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"data\.train\.images"):
        train(_compose(tmp_path, tmp_path / "c", ["data=custom"], tiny=False))
    assert not (tmp_path / "c").exists()  # nothing written


def test_pinet_eval_reproduces_the_test_metrics(trained, tmp_path):
    run_dir, metrics = trained
    out = tmp_path / "eval"
    proc = _run([_bin("pinet-eval"), f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
                 f"run_dir={out}", "trainer.accelerator=cpu", "threads=1"], tmp_path)
    result = json.loads((out / "metrics.json").read_text())
    # same weights (one epoch: best = last), same data (the run's config.yaml), same decoding
    assert result["test/AP"] == pytest.approx(metrics["test/AP"], abs=1e-9)
    assert result["test/AR"] == pytest.approx(metrics["test/AR"], abs=1e-9)
    assert result["split"] == "test" and result["protocol"] == "crowdpose"
    results = json.loads((out / "results.json").read_text())
    assert isinstance(results, list)
    assert all(len(r["keypoints"]) == 14 * 3 for r in results)
    assert "AP" in proc.stdout  # the printed table
    assert "LeafSpec" not in proc.stderr  # Lightning's deprecation noise is filtered (issue 20)
    # the inference model file works too, on the val split, away from its run directory:
    # the data settings travel in the file, no config.yaml is read
    moved = tmp_path / "elsewhere" / "model.pt"
    moved.parent.mkdir()
    moved.write_bytes((run_dir / "checkpoints" / "model.pt").read_bytes())
    out2 = tmp_path / "eval_val"
    _run([_bin("pinet-eval"), f"ckpt_path={moved}",
          f"run_dir={out2}", "split=val", "trainer.accelerator=cpu", "threads=1"], tmp_path)
    val = json.loads((out2 / "metrics.json").read_text())
    assert val["val/AP"] == pytest.approx(metrics["val/AP"], abs=1e-9)


def test_eval_and_predict_with_converted_published_weights(trained, tmp_path):
    """pinet-convert's model.pt (random published weights) through pinet-eval and
    pinet-predict: the data follow the network's published convention."""

    run_dir, _ = trained
    spec = json.loads((REPO / "tests" / "fixtures" / "published_crowdpose_state.json").read_text())
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v, generator=gen) * 0.01 for k, v in spec["tensors"].items()}
    torch.save(state, tmp_path / "pub.pth")
    model = convert_published(tmp_path / "pub.pth", tmp_path / "pub.pt")
    out = tmp_path / "eval"
    data = run_dir.parent / "data"
    _run([_bin("pinet-eval"), f"ckpt_path={model}", f"run_dir={out}", "data=synthetic",
          f"paths.data_dir={data}", *[o for o in TINY if o.startswith("data.")],
          "trainer.accelerator=cpu", "threads=1"], tmp_path)
    result = json.loads((out / "metrics.json").read_text())
    assert result["convention"] == "published" and result["protocol"] == "crowdpose"
    assert 0.0 <= result["test/AP"] <= 1.0
    images = tmp_path / "in"
    images.mkdir()
    for path in sorted((data / "synthetic" / "val" / "images").glob("*.jpg")):
        (images / path.name).write_bytes(path.read_bytes())
    pred = tmp_path / "pred"
    _run([_bin("pinet-predict"), f"ckpt_path={model}", f"input={images}", f"output_dir={pred}",
          "device=cpu", "threads=1", "input_size=64", "draw=false"], tmp_path)
    ids = json.loads((pred / "image_ids.json").read_text())
    assert len(ids) == 2
    assert all(len(r["keypoints"]) == 42 for r in json.loads((pred / "results.json").read_text()))


def test_pinet_predict_on_a_folder_and_a_video(trained, tmp_path):
    run_dir, _ = trained
    images = sorted((run_dir.parent / "data" / "synthetic" / "val" / "images").glob("*.jpg"))
    folder = tmp_path / "in"
    folder.mkdir()
    for i, path in enumerate(images):
        (folder / f"img{i}.jpg").write_bytes(path.read_bytes())
    (folder / "notes.txt").write_text("not an image")
    frame = cv2.imread(str(images[0]))
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5,
                             (frame.shape[1], frame.shape[0]))
    for _ in range(3):
        writer.write(frame)
    writer.release()

    ckpt = run_dir / "checkpoints" / "last.ckpt"
    out = tmp_path / "pred"
    # threshold/min_score 0: every predicted pose is drawn, trained or not
    _run([_bin("pinet-predict"), f"ckpt_path={ckpt}", f"input={folder}", f"output_dir={out}",
          "device=cpu", "threads=1", "threshold=0", "min_score=0"], tmp_path)
    results = json.loads((out / "results.json").read_text())
    ids = json.loads((out / "image_ids.json").read_text())
    assert [i["file_name"] for i in ids] == [f"img{i}.jpg" for i in range(len(images))]
    assert results, "the decoder returns poses above score 0.01 even for a barely trained net"
    assert {r["image_id"] for r in results} <= {i["id"] for i in ids}
    assert all(len(r["keypoints"]) == 42 and r["category_id"] == 1 for r in results)
    drawn = sorted(p.name for p in (out / "images").iterdir())
    assert drawn == [f"img{i}.jpg" for i in range(len(images))]
    first_id = ids[0]["id"]
    if any(r["image_id"] == first_id for r in results):
        before = cv2.imread(str(folder / "img0.jpg")).astype(int)
        after = cv2.imread(str(out / "images" / "img0.jpg")).astype(int)
        assert np.abs(after - before).max() > 50  # skeletons drawn, not just re-encoded

    out_video = tmp_path / "pred_video"
    _run([_bin("pinet-predict"), f"ckpt_path={run_dir / 'checkpoints' / 'model.pt'}",
          f"input={video}", f"output_dir={out_video}", "device=cpu", "threads=1"], tmp_path)
    ids = json.loads((out_video / "image_ids.json").read_text())
    assert [i["file_name"] for i in ids] == [f"frame_{i:06d}.jpg" for i in range(3)]
    assert len(list((out_video / "frames").glob("frame_*.jpg"))) == 3
    assert (out_video / "clip_poses.mp4").stat().st_size > 0


def test_pinet_predict_bad_input_names_the_path(trained, tmp_path):
    run_dir, _ = trained
    model = run_dir / "checkpoints" / "model.pt"
    proc = subprocess.run([_bin("pinet-predict"), f"ckpt_path={model}",
                           f"input={tmp_path / 'nowhere'}", f"output_dir={tmp_path / 'o'}"],
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "nowhere does not exist" in proc.stderr


def test_wandb_offline_needs_no_account_or_network(tmp_path):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "wb"
    _run([_bin("pinet-train"), *TINY, "trainer.max_steps=1", "test=false",
          NO_FIGURE, "logger=wandb", f"run_dir={run_dir}"], tmp_path)
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    assert any(offline.glob("*.wandb")), "the offline run holds its .wandb log for `wandb sync`"
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 1
    # nothing written outside the run directory, the data cache and wandb's own dirs
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "data", "wb"]


@pytest.mark.parametrize("script,args", [("train", []), ("eval", ["ckpt_path=x.ckpt"]),
                                         ("predict", ["ckpt_path=x.ckpt", "input=y"])])
def test_scripts_wrap_the_entry_points(script, args):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / f"{script}.py"), "--cfg",
                           "job", *args], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"task_name: {'synthetic' if script == 'train' else script}" in proc.stdout
