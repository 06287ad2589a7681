"""``pinet-train``: train PINet with the Hydra config ``conf/train.yaml``.

With no arguments it runs the synthetic main job (``experiment=synthetic``). A run directory
(``outputs/<task_name>/runs/<time>`` or ``run_dir=...``) receives:

- ``config.yaml``: the resolved config (Hydra's own composition is in ``.hydra/``);
- ``checkpoints/``: ``last.ckpt`` (every epoch end and on interrupts,
  :class:`~pinet_lightning.callbacks.LastCheckpoint`), ``epoch_NNN.ckpt`` (best ``val/AP``)
  and ``model.pt`` (the inference model of the reported checkpoint,
  :func:`pinet_lightning.network.save_model`);
- ``metrics.json``: final val/test metrics, steps, paths; ``predictions.png``: poses on the
  first val images; ``csv/`` (or the chosen loggers) with per-step logs and evaluation jsons.

The reported checkpoint (tested, saved as ``model.pt``) is the last one by default, as
published; ``reported_checkpoint=best`` picks the best ``val/AP`` one instead (see
:func:`reported_checkpoint`). ``metrics.json`` and ``model.pt`` are only replaced by a run
that reached a later step than the one that wrote them.

Resuming: ``ckpt_path=last run_dir=<run>`` continues that run from its ``last.ckpt``; with
``resume=auto`` (the default) a run whose directory already holds ``last.ckpt`` resumes by
itself (a requeued SLURM job, whose run dir is named after its job id, does).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from pinet_lightning.checkpoints import load_file
from pinet_lightning.cli.config import instantiate_group, missing_keys, run_hydra
from pinet_lightning.cli.ddp import ddp_job_scope, install_launcher, register_job
from pinet_lightning.cli.run import resolve_ckpt_path, start_run, write_metrics
from pinet_lightning.cli.tables import format_metrics, print_metric_table
from pinet_lightning.config import to_plain

__all__ = ["main", "train", "prediction_figure", "reported_checkpoint"]

log = logging.getLogger("pinet_lightning.train")


class _StartStep(pl.Callback):
    """Remembers the global step training (re)started from."""

    def __init__(self) -> None:
        self.start_step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start_step = int(trainer.global_step)


def _wandb_offline(cfg: DictConfig) -> None:
    """An offline WandbLogger must never prompt for a login or touch the network."""
    import os

    for node in (cfg.get("logger") or {}).values():
        if node is not None and str(node.get("_target_", "")).endswith("WandbLogger"):
            if node.get("offline", False):
                os.environ.setdefault("WANDB_MODE", "offline")
            os.environ.setdefault("WANDB_SILENT", "true")


def _check_required(cfg: DictConfig) -> None:
    """Fail early, naming the settings, when a required (``???``) data value is not given."""
    missing = missing_keys(cfg.data, "data.") if cfg.get("data") is not None else []
    if missing:
        raise ValueError(f"pinet-train: required data settings missing: {', '.join(missing)}; "
                         "pass them on the command line, e.g. data.train.images=<folder> "
                         "data.train.annotations=<COCO json> (see conf/data/custom.yaml)")


def _enlarge(image: Any, poses: Any, min_side: int) -> tuple[Any, Any]:
    """Small images (synthetic ones) scaled up by an integer factor so that the drawn
    skeletons stay legible; pose pixels follow (pixel-center convention)."""
    import cv2

    factor = max(1, int(min_side) // max(image.shape[:2]))
    if factor == 1:
        return image, poses
    image = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
    poses = poses.copy()
    poses[..., :2] = (poses[..., :2] + 0.5) * factor - 0.5
    return image, poses


def prediction_figure(net: torch.nn.Module, dataset: Any, layout: Any, decode: Any,
                      num_images: int = 4, threshold: float = 0.2,
                      min_score: float = 0.1, min_side: int = 256) -> Any:
    """A grid of the first ``num_images`` of an evaluation dataset with predicted poses drawn
    (original image pixels; images smaller than ``min_side`` are enlarged by an integer
    factor first). ``dataset``: a CocoKeypointDataset in eval mode."""
    from pinet_lightning.decoding import predict_poses
    from pinet_lightning.visualize import draw_poses, make_grid

    was_training = net.training
    net.eval()
    tiles = []
    try:
        for index in range(min(int(num_images), len(dataset))):
            sample = dataset[index]
            image, _, _ = dataset.load(index)
            (poses, scores), = predict_poses(net, sample["image"][None], layout,
                                             sample["back_transform"][None], decode)
            image, poses = _enlarge(image, poses.detach().cpu().numpy(), min_side)
            tiles.append(draw_poses(image, poses, layout, scores, threshold=threshold,
                                    min_score=min_score))
    finally:
        net.train(was_training)
    return make_grid(tiles) if tiles else None


def _save_outputs(cfg: DictConfig, model: Any, datamodule: Any, out_dir: Path,
                  best: str | None, metrics: dict[str, Any]) -> None:
    """Rank 0: the inference model file and the picture of predictions."""
    from pinet_lightning.network import save_model
    from pinet_lightning.visualize import save_image

    if cfg.get("save_model", True):
        path = out_dir / "checkpoints" / "model.pt"
        extra = {"decode": model.decode_cfg.to_dict(),
                 "protocol": getattr(datamodule, "protocol", None),
                 "input_size": getattr(datamodule, "input_size", None),
                 "data": to_plain(dict(getattr(datamodule, "hparams", {}))),
                 "checkpoint": best, "metrics": format_metrics(metrics)}
        save_model(path, model.net, extra=extra)
        metrics["model_path"] = str(path)
    vis = cfg.get("visualize") or {}
    if int(vis.get("num_images", 0)) > 0:
        dataset = datamodule.val_dataset or datamodule.test_dataset
        if dataset is None:
            try:
                datamodule.setup("validate")
                dataset = datamodule.val_dataset
            except Exception as err:  # no val split: nothing to draw
                log.info("no picture of predictions: %s", err)
        if dataset is not None:
            device = torch.device("cuda") if (torch.cuda.is_available() and str(
                cfg.trainer.get("accelerator", "auto")) in ("auto", "gpu", "cuda")) else None
            net = model.net.to(device) if device is not None else model.net
            grid = prediction_figure(net, dataset, model.layout, model.decode_cfg,
                                     vis.get("num_images", 4), vis.get("threshold", 0.2),
                                     vis.get("min_score", 0.1))
            if grid is not None:
                metrics["predictions_png"] = str(save_image(out_dir / "predictions.png", grid))


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test the best checkpoint, save the outputs; returns the metrics (rank 0: also
    written to ``metrics.json``). Runs in the parent and, under DDP, in every child rank."""
    with ddp_job_scope():
        return _train(cfg)


def _train(cfg: DictConfig) -> dict[str, Any]:
    from hydra.utils import instantiate

    started = time.time()
    _check_required(cfg)
    out_dir = start_run(cfg)  # rank 0 alone writes into the run directory
    # train: the checkpoint to resume; train=false: the checkpoint to test
    ckpt_path = resolve_ckpt_path(cfg, out_dir)

    _wandb_offline(cfg)
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    if not loggers:
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    start = _StartStep()
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=[*callbacks, start],
                                      logger=loggers or False, _convert_="all")
    install_launcher(trainer)
    register_job("pinet_lightning.cli.train:train", out_dir / "config.yaml",
                 [f"ckpt_path={ckpt_path if ckpt_path else 'null'}", "resume=never"])
    if loggers and trainer.is_global_zero:
        config = to_plain(cfg)
        for lg in trainer.loggers:
            lg.log_hyperparams({"config": config})

    # checkpoints are read without running code unless the user trusts them explicitly
    safe_load = not cfg.get("trust_checkpoint", False)
    metrics: dict[str, Any] = {}
    if cfg.get("train", True):
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=safe_load)
        metrics.update(format_metrics(trainer.callback_metrics))
    # read before testing: trainer.test(ckpt_path=...) restores the callbacks' older state
    progress = {"global_step": int(trainer.global_step), "epoch": int(trainer.current_epoch)}
    best_by_val, last, best_score = _checkpoint_paths(trainer)
    # `best`: the checkpoint reported, i.e. tested and saved as model.pt (reported_checkpoint)
    best = reported_checkpoint(cfg.get("reported_checkpoint", "last"), best_by_val, last)
    if not cfg.get("train", True) and ckpt_path is not None:
        best = str(ckpt_path)  # test (and save) the given checkpoint
    if best_score is not None:
        metrics["best/val/AP"] = best_score

    tested = False
    if cfg.get("test", True) and getattr(datamodule, "test_annotation_file", None):
        if best is None and trainer.is_global_zero:
            log.warning("no checkpoint to report: testing the current weights")
        results = trainer.test(model, datamodule=datamodule, ckpt_path=best,
                               weights_only=safe_load)
        for res in results:
            metrics.update(format_metrics(res))
        tested = best is not None

    if not trainer.is_global_zero:
        return metrics
    if best is not None and not tested:  # the model file holds the best weights
        state = load_file(best, trust_checkpoint=not safe_load)["state_dict"]
        model.load_state_dict(state)
    metrics.update({
        **progress,
        # no on_train_start when a resumed run is already at its end
        "start_step": (start.start_step if start.start_step is not None or not
                       cfg.get("train", True) else progress["global_step"]),
        "resumed_from": str(ckpt_path) if ckpt_path else None,
        "reported_checkpoint": best,
        "best_checkpoint": best_by_val,
        "last_checkpoint": last,
        "run_dir": str(out_dir),
    })
    previous = _recorded_step(out_dir / "metrics.json")
    if previous is not None and progress["global_step"] <= previous:
        # a resume that trained nothing new (or a test-only run) must not replace the
        # outputs of the run that got further
        log.warning("metrics.json and model.pt of %s are kept: they come from step %d and "
                    "this run ended at step %d", out_dir, previous, progress["global_step"])
        metrics["outputs_kept_from_step"] = previous
    else:
        _save_outputs(cfg, model, datamodule, out_dir, best, metrics)
        metrics["wall_time_s"] = round(time.time() - started, 1)
        write_metrics(out_dir / "metrics.json", metrics)
    print_metric_table(metrics, title=f"PINet {cfg.get('task_name', 'train')}: {out_dir}")
    log.info("run directory: %s", out_dir)
    return metrics


REPORTED = ("last", "best")


def reported_checkpoint(rule: str, best_by_val: str | None, last: str | None) -> str | None:
    """The checkpoint a run reports (tests and saves as ``model.pt``), ``reported_checkpoint``:

    - ``last`` (default, as published): the final weights, ``last.ckpt``. On COCO and
      OCHuman the validation split is the test split, so picking by val/AP would select
      on the test set.
    - ``best``: the best val/AP checkpoint (falls back to ``last`` when no validation ran).
    """
    rule = str(rule).lower()
    if rule not in REPORTED:
        raise ValueError(f"reported_checkpoint must be one of {REPORTED}, got '{rule}'")
    if rule == "best" and best_by_val:
        return best_by_val
    if rule == "best" and last:
        log.warning("reported_checkpoint=best but no val/AP checkpoint exists: reporting %s",
                    last)
    return last or None


def _checkpoint_paths(trainer: pl.Trainer) -> tuple[str | None, str | None, float | None]:
    """(best val/AP checkpoint, last checkpoint, best val/AP) from the trainer's callbacks."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from pinet_lightning.callbacks import LastCheckpoint

    best = last = score = None
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, LastCheckpoint):
            last = last or cb.last_model_path or None
        elif isinstance(cb, ModelCheckpoint):
            if cb.monitor and best is None:
                best = cb.best_model_path or None
                if cb.best_model_score is not None:
                    score = float(cb.best_model_score)
            last = last or cb.last_model_path or None  # a user's save_last=true
    return best, last, score


def _recorded_step(path: Path) -> int | None:
    """``global_step`` of an existing metrics.json (None: none, or unreadable)."""
    import json

    try:
        return int(json.loads(path.read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def main() -> None:
    """Console entry point ``pinet-train`` (Hydra: ``pinet-train --help``)."""
    run_hydra("train", train)


if __name__ == "__main__":
    main()
