"""``pinet-train``: train PINet with the Hydra config ``conf/train.yaml``.

With no arguments it runs the synthetic main job (``experiment=synthetic``). A run directory
(``outputs/<task_name>/runs/<time>`` or ``run_dir=...``) receives:

- ``config.yaml``: the resolved config (Hydra's own composition is in ``.hydra/``);
- ``checkpoints/``: ``last.ckpt`` (every epoch end and on interrupts,
  :class:`~pinet_lightning.training.callbacks.LastCheckpoint`), ``epoch_NNN.ckpt`` (best
  ``val/AP``) and ``model.pt`` (the inference model of the reported checkpoint,
  :class:`~pinet_lightning.training.callbacks.ModelExport`);
- ``metrics.json``: final val/test metrics, steps, paths, the sweep ``objective`` (val/AP of
  the reported checkpoint, returned to Hydra's sweeper); ``predictions.png``: poses on the
  first val images (:class:`~pinet_lightning.training.callbacks.PredictionFigure`);
  ``learning_curve.png``; ``csv/`` (or the chosen loggers) with per-step logs and evaluation
  jsons. The pictures and model.pt come from the callbacks of ``conf/callbacks``.

The flow is straight: build, fit, test the reported checkpoint, report. What is reported is
the run report's (:class:`~pinet_lightning.training.report.RunReport`, a callback): the
checkpoint tested and saved as ``model.pt`` is the last one by default, as published
(``reported_checkpoint=best``: the best ``val/AP`` one), and ``metrics.json`` and ``model.pt``
are only replaced by a run that reached a later step than the one that wrote them.

Resuming: ``ckpt_path=last run_dir=<run>`` continues that run from its ``last.ckpt``; with
``resume=auto`` (the default) a run whose directory already holds ``last.ckpt`` resumes by
itself (a requeued SLURM job, whose run dir is named after its job id, does).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from pinet_lightning.cli.config import (
    check_trainer_settings,
    instantiate_group,
    missing_keys,
    run_hydra,
)
from pinet_lightning.cli.ddp import ddp_job_scope, install_launcher, register_job
from pinet_lightning.cli.run import (
    resolve_ckpt_path,
    resume_command,
    start_run,
    stopped_runs_fail,
)
from pinet_lightning.cli.tables import format_metrics, print_metric_table
from pinet_lightning.core.config import to_plain
from pinet_lightning.training.checkpoint_io import use_atomic_checkpoints
from pinet_lightning.training.report import RunReport

__all__ = ["main", "train", "train_task"]

log = logging.getLogger("pinet_lightning.train")


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
    sweeper (val/AP of the reported checkpoint,
    :func:`~pinet_lightning.training.report.sweep_objective`)."""
    return train(cfg).get("objective")


def _train(cfg: DictConfig) -> dict[str, Any]:
    """Build, fit, test the reported checkpoint, report (rank 0: ``metrics.json``)."""
    _check_required(cfg)
    out_dir = start_run(cfg)  # rank 0 alone writes into the run directory
    # train: the checkpoint to resume; train=false: the checkpoint to test
    ckpt_path = resolve_ckpt_path(cfg, out_dir)
    trains, safe_load = bool(cfg.get("train", True)), not cfg.get("trust_checkpoint", False)
    report = RunReport(out_dir, cfg.get("reported_checkpoint", "last"), not safe_load)
    datamodule, model, trainer = _build(cfg, out_dir, ckpt_path, report)
    testing = bool(cfg.get("test", True) and getattr(datamodule, "test_annotation_file", None))
    resume = resume_command(out_dir)

    metrics: dict[str, Any] = {}
    if trains:
        _check_splits(datamodule, testing)
        with stopped_runs_fail("pinet-train", resume):
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path,
                        weights_only=safe_load)
        metrics.update(format_metrics(trainer.callback_metrics))
    reported = report.choose(trainer, given=None if trains else ckpt_path)
    if testing:  # trained, not yet tested: run again (resume=auto) to test without training
        with stopped_runs_fail("pinet-train", resume):
            for res in trainer.test(model, datamodule=datamodule, ckpt_path=reported,
                                    weights_only=safe_load):
                metrics.update(format_metrics(res))
    if not trainer.is_global_zero:
        return metrics
    metrics = report.finish(trainer, model, metrics, tested=testing and reported is not None,
                            resumed_from=ckpt_path, trained=trains)
    print_metric_table(metrics, title=f"PINet {cfg.get('task_name', 'train')}: {out_dir}")
    log.info("run directory: %s", out_dir)
    return metrics


def _check_splits(datamodule: Any, testing: bool) -> None:
    """Read the val (and test) files now: a bad one stops the run before the training,
    not after it."""
    if hasattr(datamodule, "check_split"):
        for split in ("val", "test") if testing else ("val",):
            datamodule.check_split(split)


def _build(cfg: DictConfig, out_dir: Path, ckpt_path: Path | None, report: RunReport
           ) -> tuple[Any, Any, pl.Trainer]:
    """The data module, the LightningModule and the trainer with the configured callbacks,
    the run's report and the loggers; registers the job for DDP children and logs the
    config."""

    _wandb_offline(cfg)
    check_trainer_settings(cfg.trainer)
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    if not loggers:
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=[*callbacks, report],
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


def main() -> None:
    """Console entry point ``pinet-train`` (Hydra: ``pinet-train --help``)."""
    run_hydra("train", train_task)


if __name__ == "__main__":
    main()
