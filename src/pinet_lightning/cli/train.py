"""``pinet-train``: train PINet with the Hydra config ``conf/train.yaml``.

With no arguments it runs the synthetic main job (``experiment=synthetic``). A run directory
(``outputs/<task_name>/runs/<time>`` or ``run_dir=...``) receives:

- ``config.yaml``: the resolved config (Hydra's own composition is in ``.hydra/``);
- ``checkpoints/``: ``last.ckpt`` (every epoch end and on interrupts,
  :class:`~pinet_lightning.training.callbacks.LastCheckpoint`), ``epoch_NNN.ckpt`` (best ``val/AP``)
  and ``model.pt`` (the inference model of the reported checkpoint,
  :class:`~pinet_lightning.training.callbacks.ModelExport`);
- ``metrics.json``: final val/test metrics, steps, paths, the sweep ``objective`` (val/AP of
  the reported checkpoint, returned to Hydra's sweeper); ``predictions.png``: poses on the
  first val images (:class:`~pinet_lightning.training.callbacks.PredictionFigure`);
  ``learning_curve.png``; ``csv/`` (or the chosen loggers) with per-step logs and evaluation
  jsons. The pictures and model.pt come from the callbacks of ``conf/callbacks``.

The reported checkpoint (tested, saved as ``model.pt``) is the last one by default, as
published; ``reported_checkpoint=best`` picks the best ``val/AP`` one instead (see
:func:`reported_checkpoint`). ``metrics.json`` and ``model.pt`` are only replaced by a run
that reached a later step than the one that wrote them.

Resuming: ``ckpt_path=last run_dir=<run>`` continues that run from its ``last.ckpt``; with
``resume=auto`` (the default) a run whose directory already holds ``last.ckpt`` resumes by
itself (a requeued SLURM job, whose run dir is named after its job id, does).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint

from pinet_lightning.cli.config import (
    check_trainer_settings,
    instantiate_group,
    missing_keys,
    run_hydra,
)
from pinet_lightning.cli.ddp import ddp_job_scope, install_launcher, register_job
from pinet_lightning.cli.objective import LastValidationStep, sweep_objective
from pinet_lightning.cli.run import (
    resolve_ckpt_path,
    resume_command,
    start_run,
    stopped_runs_fail,
    write_metrics,
)
from pinet_lightning.cli.tables import format_metrics, print_metric_table
from pinet_lightning.core.config import to_plain
from pinet_lightning.core.files import load_file
from pinet_lightning.training.callbacks import LastCheckpoint, RunOutput
from pinet_lightning.training.checkpoint_io import use_atomic_checkpoints

__all__ = ["main", "train", "train_task", "reported_checkpoint"]

log = logging.getLogger("pinet_lightning.train")


class _StartStep(pl.Callback):
    """Remembers the global step training (re)started from."""

    def __init__(self) -> None:
        self.start_step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start_step = int(trainer.global_step)


def _wandb_offline(cfg: DictConfig) -> None:
    """An offline WandbLogger must never prompt for a login or touch the network."""

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


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test the best checkpoint, save the outputs; returns the metrics (rank 0: also
    written to ``metrics.json``). Runs in the parent and, under DDP, in every child rank."""
    with ddp_job_scope():
        return _train(cfg)


def train_task(cfg: DictConfig) -> float | None:
    """``pinet-train``'s Hydra task: :func:`train`, returning the run's objective for a
    sweeper (val/AP of the reported checkpoint, :mod:`pinet_lightning.cli.objective`)."""
    return train(cfg).get("objective")


def _train(cfg: DictConfig) -> dict[str, Any]:
    started = time.time()
    _check_required(cfg)
    out_dir = start_run(cfg)  # rank 0 alone writes into the run directory
    # train: the checkpoint to resume; train=false: the checkpoint to test
    ckpt_path = resolve_ckpt_path(cfg, out_dir)
    datamodule, model, trainer = _build(cfg, out_dir, ckpt_path)
    start = next(c for c in trainer.callbacks if isinstance(c, _StartStep))
    validated = next(c for c in trainer.callbacks if isinstance(c, LastValidationStep))
    outputs = [c for c in trainer.callbacks if isinstance(c, RunOutput)]  # model.pt, pictures
    # checkpoints are read without running code unless the user trusts them explicitly
    safe_load = not cfg.get("trust_checkpoint", False)

    metrics: dict[str, Any] = {}
    testing = cfg.get("test", True) and getattr(datamodule, "test_annotation_file", None)
    if cfg.get("train", True):
        if hasattr(datamodule, "check_split"):  # bad val / test files stop the run now,
            for split in ("val", "test") if testing else ("val",):  # not after the training
                datamodule.check_split(split)
        with stopped_runs_fail("pinet-train", resume_command(out_dir)):
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path,
                        weights_only=safe_load)
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

    previous = _recorded_step(out_dir / "metrics.json") if trainer.is_global_zero else None
    # a resume that trained nothing new (or a test-only run) must not replace the outputs of
    # the run that got further
    keep_outputs = previous is not None and progress["global_step"] <= previous
    for output in outputs:
        output.enabled, output.checkpoint = not keep_outputs, best

    tested = False
    if testing:
        if best is None and trainer.is_global_zero:
            log.warning("no checkpoint to report: testing the current weights")
        # trained, not yet tested: run again (resume=auto) to test without training more
        with stopped_runs_fail("pinet-train", resume_command(out_dir)):
            results = trainer.test(model, datamodule=datamodule, ckpt_path=best,
                                   weights_only=safe_load)
        for res in results:
            metrics.update(format_metrics(res))
        tested = best is not None
    if not trainer.is_global_zero:
        return metrics

    if not tested and not keep_outputs:  # the outputs show the reported weights
        if best is not None:
            model.load_state_dict(load_file(best, trust_checkpoint=not safe_load)["state_dict"])
        for output in outputs:
            output.write(trainer, model)
    metrics.update(progress)
    metrics.update({
        # no on_train_start when a resumed run is already at its end
        "start_step": (start.start_step if start.start_step is not None or not
                       cfg.get("train", True) else progress["global_step"]),
        "resumed_from": str(ckpt_path) if ckpt_path else None,
        "reported_checkpoint": best, "best_checkpoint": best_by_val, "last_checkpoint": last,
        "run_dir": str(out_dir),
        **{o.metrics_key: str(o.written) for o in outputs if o.written is not None},
    })
    metrics["objective"] = sweep_objective(metrics, best, best_by_val, validated.step)
    if keep_outputs:
        log.warning("metrics.json and model.pt of %s are kept: they come from step %d and "
                    "this run ended at step %d", out_dir, previous, progress["global_step"])
        metrics["outputs_kept_from_step"] = previous
    else:
        metrics["wall_time_s"] = round(time.time() - started, 1)
        write_metrics(out_dir / "metrics.json", metrics)
    print_metric_table(metrics, title=f"PINet {cfg.get('task_name', 'train')}: {out_dir}")
    log.info("run directory: %s", out_dir)
    return metrics


def _build(cfg: DictConfig, out_dir: Path, ckpt_path: Path | None
           ) -> tuple[Any, Any, pl.Trainer]:
    """The data module, the LightningModule and the trainer with the configured callbacks
    and loggers; registers the job for DDP children and logs the config."""

    _wandb_offline(cfg)
    check_trainer_settings(cfg.trainer)
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    if not loggers:
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=[*callbacks, _StartStep(),
                                                                 LastValidationStep()],
                                      logger=loggers or False, _convert_="all")
    install_launcher(trainer)
    use_atomic_checkpoints(trainer)  # a full disk never leaves a cut-short checkpoint
    register_job("pinet_lightning.cli.train:train", out_dir / "config.yaml",
                 [f"ckpt_path={ckpt_path if ckpt_path else 'null'}", "resume=never"])
    if loggers and trainer.is_global_zero:
        config = to_plain(cfg)
        for lg in trainer.loggers:
            lg.log_hyperparams({"config": config})
    return datamodule, model, trainer


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

    try:
        return int(json.loads(path.read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def main() -> None:
    """Console entry point ``pinet-train`` (Hydra: ``pinet-train --help``)."""
    run_hydra("train", train_task)


if __name__ == "__main__":
    main()
