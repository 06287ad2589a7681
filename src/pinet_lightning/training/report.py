"""The report of a training run: which checkpoint it reports, whether its outputs replace the
ones already in the run directory, and ``metrics.json``.

:class:`RunReport` is a callback that ``pinet-train`` adds to every trainer. It records the
step training (re)started from and the step of the last validation, and after ``fit``:

1. :meth:`RunReport.choose` picks the reported checkpoint (the one tested and saved as
   ``model.pt``; :func:`reported_checkpoint`) and tells the run-output callbacks
   (:class:`~pinet_lightning.training.callbacks.RunOutput`: ``model.pt``, ``predictions.png``)
   which weights they show; a run that trained no step past the ``metrics.json`` already in
   the run directory (a resume at its end, a test-only run) keeps the earlier outputs;
2. after ``test``, :meth:`RunReport.finish` writes the outputs nobody tested (a run without
   a test split), gathers the run's figures and writes ``metrics.json`` atomically, with the
   sweep objective (:func:`sweep_objective`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from pinet_lightning.core.atomic import write_json
from pinet_lightning.core.files import load_file
from pinet_lightning.training.callbacks import LastCheckpoint, RunOutput

__all__ = ["RunReport", "REPORTED", "reported_checkpoint", "checkpoint_paths",
           "sweep_objective", "recorded_step"]

log = logging.getLogger("pinet_lightning.train")

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


def checkpoint_paths(trainer: pl.Trainer) -> tuple[str | None, str | None, float | None]:
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


def recorded_step(path: Path) -> int | None:
    """``global_step`` of an existing metrics.json (None: none, or unreadable)."""
    try:
        return int(json.loads(path.read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def sweep_objective(metrics: Mapping[str, Any], reported: str | None, best_by_val: str | None,
                    val_step: int | None) -> float | None:
    """The objective a search sweeper maximises: val/AP of the ``reported`` checkpoint, or
    None (with a warning saying why).

    - the best val/AP checkpoint reported: its score (``best/val/AP``);
    - the last one reported: the last validation's ``val/AP``, if that validation ran on
      the final weights (``val_step`` is the run's last step); a run whose last epochs were
      not validated has no objective (``check_val_every_n_epoch`` must divide
      ``max_epochs``), rather than the AP of other weights.

    Args:
        metrics: the run's metrics (``val/AP``, ``best/val/AP``, ``global_step``).
        reported: path of the reported checkpoint; ``best_by_val``: the best val/AP one.
        val_step: global step of the last validation of this run (None: none ran).
    """
    if reported is not None and reported == best_by_val:
        value, source = metrics.get("best/val/AP"), "best/val/AP"
    elif val_step is not None and val_step == metrics.get("global_step"):
        value, source = metrics.get("val/AP"), "val/AP"
    else:
        log.warning("no objective: the reported checkpoint (step %s) was not validated (last "
                    "validation: step %s); let trainer.check_val_every_n_epoch divide "
                    "trainer.max_epochs, or report the best: reported_checkpoint=best",
                    metrics.get("global_step"), val_step)
        return None
    if value is None or not math.isfinite(float(value)):
        log.warning("no objective: %s is %s", source, value)
        return None
    return float(value)


class RunReport(pl.Callback):
    """The run's report (see the module docstring).

    Args:
        run_dir: the run directory (``metrics.json`` goes there).
        rule: ``reported_checkpoint``: ``last`` or ``best``.
        trust_checkpoint: read the reported checkpoint with the full unpickler.
    """

    def __init__(self, run_dir: str | Path, rule: str = "last",
                 trust_checkpoint: bool = False) -> None:
        if str(rule).lower() not in REPORTED:
            raise ValueError(f"reported_checkpoint must be one of {REPORTED}, got '{rule}'")
        self.run_dir = Path(run_dir)
        self.rule = str(rule).lower()
        self.trust_checkpoint = bool(trust_checkpoint)
        self.started = time.time()
        self.start_step: int | None = None  # where training (re)started
        self.val_step: int | None = None  # the last validation's step (sanity check aside)
        self.reported: str | None = None
        self.best_by_val: str | None = None
        self.last: str | None = None
        self.best_score: float | None = None
        self.previous_step: int | None = None  # of the metrics.json already there
        self.keep_outputs = False
        self.progress: dict[str, int] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start_step = int(trainer.global_step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.val_step = int(trainer.global_step)

    @staticmethod
    def _outputs(trainer: pl.Trainer) -> list[RunOutput]:
        return [c for c in trainer.callbacks if isinstance(c, RunOutput)]

    def choose(self, trainer: pl.Trainer, given: str | Path | None = None) -> str | None:
        """After ``fit``: the reported checkpoint (``given``: the one a test-only run was
        asked to test), and the run outputs set to show it unless this run got no further
        than the outputs already there. Call before ``test``, which restores the
        callbacks' older state."""
        self.progress = {"global_step": int(trainer.global_step),
                         "epoch": int(trainer.current_epoch)}
        self.best_by_val, self.last, self.best_score = checkpoint_paths(trainer)
        self.reported = (str(given) if given is not None else
                         reported_checkpoint(self.rule, self.best_by_val, self.last))
        if trainer.is_global_zero:
            self.previous_step = recorded_step(self.run_dir / "metrics.json")
        # a resume that trained nothing new (or a test-only run) must not replace the
        # outputs of the run that got further
        self.keep_outputs = (self.previous_step is not None
                             and self.progress["global_step"] <= self.previous_step)
        for output in self._outputs(trainer):
            output.enabled, output.checkpoint = not self.keep_outputs, self.reported
        if self.reported is None and trainer.is_global_zero:
            log.warning("no checkpoint to report: testing the current weights")
        return self.reported

    def finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
               metrics: Mapping[str, Any], tested: bool, resumed_from: str | Path | None,
               trained: bool = True) -> dict[str, Any]:
        """On rank 0, after ``test`` (if any): write the outputs nobody tested (from the
        reported weights), gather the run's figures and write ``metrics.json`` (unless the
        earlier outputs are kept); returns the run's metrics."""
        outputs = self._outputs(trainer)
        if not tested and not self.keep_outputs:  # the outputs show the reported weights
            if self.reported is not None:
                state = load_file(self.reported, trust_checkpoint=self.trust_checkpoint)
                pl_module.load_state_dict(state["state_dict"])
            for output in outputs:
                output.write(trainer, pl_module)
        report = dict(metrics)
        if self.best_score is not None:
            report["best/val/AP"] = self.best_score
        report.update(self.progress)
        report.update({
            # no on_train_start when a resumed run is already at its end
            "start_step": (self.start_step if self.start_step is not None or not trained
                           else self.progress["global_step"]),
            "resumed_from": str(resumed_from) if resumed_from else None,
            "reported_checkpoint": self.reported, "best_checkpoint": self.best_by_val,
            "last_checkpoint": self.last, "run_dir": str(self.run_dir),
            **{o.metrics_key: str(o.written) for o in outputs if o.written is not None},
        })
        report["objective"] = sweep_objective(report, self.reported, self.best_by_val,
                                              self.val_step)
        if self.keep_outputs:
            log.warning("metrics.json and model.pt of %s are kept: they come from step %d and "
                        "this run ended at step %d", self.run_dir, self.previous_step,
                        self.progress["global_step"])
            report["outputs_kept_from_step"] = self.previous_step
        else:
            report["wall_time_s"] = round(time.time() - self.started, 1)
            write_json(self.run_dir / "metrics.json", report, indent=2, sort_keys=True,
                       default=str)
        return report
