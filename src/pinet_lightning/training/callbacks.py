"""Training callbacks: keep work from being lost, and show how a run learns.

:class:`LearningCurve` collects the run's training losses and validation metrics and draws
them into ``learning_curve.png``; :class:`EpochProgress` logs one line per epoch when the
output is not a terminal (see their docstrings). :class:`ModelExport` (``model.pt``) and
:class:`PredictionFigure` (``predictions.png``) write the run's outputs from the reported
weights once they are tested.

:class:`LastCheckpoint` writes ``last.ckpt`` at the end of every training epoch, whatever the
monitored metric does (Lightning's ``ModelCheckpoint(save_last=True)`` only rewrites it when
a top-k checkpoint is saved in the same step, so a flat ``val/AP`` froze it at the best
epoch), at the end of training (``max_steps`` may stop mid-epoch), and when the run is
interrupted: Ctrl-C (``KeyboardInterrupt``) or SIGTERM (Lightning's ``SIGTERMException``,
e.g. a preempted SLURM job), and, on a single device, any other error. It never writes
diverged weights (a :class:`~pinet_lightning.training.module.DivergenceError`, or one found by the
module's ``check_divergence`` before an interrupt or end-of-training write: the file keeps
the last epoch that ended finite) nor when no step was taken since the last write. Writes
are atomic (:mod:`pinet_lightning.training.checkpoint_io`). A resumed
run (``ckpt_path=last``) starts at the step the file holds; Lightning resumes a mid-epoch
file at its step, restarting the data order of that epoch.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from pinet_lightning.core.config import to_plain
from pinet_lightning.inference.decoding import predict_poses
from pinet_lightning.inference.visualize import (
    draw_poses,
    learning_curve_figure,
    make_grid,
    save_image,
)
from pinet_lightning.model.checkpoints import save_model
from pinet_lightning.training.checkpoint_io import use_atomic_checkpoints
from pinet_lightning.training.module import DivergenceError

__all__ = ["LastCheckpoint", "LearningCurve", "EpochProgress", "progress_line", "RunOutput",
           "ModelExport", "PredictionFigure", "prediction_figure"]

log = logging.getLogger(__name__)
progress_log = logging.getLogger("pinet_lightning.progress")


class LastCheckpoint(Checkpoint):
    """``<dirpath>/<filename>.ckpt`` after every training epoch, at the end and on interrupts.

    Args:
        dirpath: the checkpoint folder (``<run dir>/checkpoints``).
        filename: the file name without ``.ckpt``.
        on_error: also write when another error stops a single-device run (under DDP only
            interrupts, which every rank receives: a write waits for all ranks).
    """

    def __init__(self, dirpath: str | Path, filename: str = "last", on_error: bool = True
                 ) -> None:
        super().__init__()
        self.dirpath = Path(dirpath)
        self.filename = filename
        self.on_error = on_error
        self._saved_step: int | None = None

    @property
    def path(self) -> Path:
        return self.dirpath / f"{self.filename}.ckpt"

    @property
    def last_model_path(self) -> str:
        """The file, once it exists (the name ``ModelCheckpoint`` uses)."""
        return str(self.path) if self.path.is_file() else ""

    def _should_save(self, trainer: pl.Trainer) -> bool:
        return (not trainer.fast_dev_run and not trainer.sanity_checking
                and trainer.state.fn == TrainerFn.FITTING
                and self._saved_step != trainer.global_step
                and trainer.global_step > 0)

    def save(self, trainer: pl.Trainer) -> None:
        """Write the file atomically (a kill or a full disk during the write leaves the
        previous one: :class:`~pinet_lightning.training.checkpoint_io.AtomicCheckpointIO`)."""
        # Epoch metrics logged with sync_dist are reduced lazily, on first read: rank 0's
        # progress bar has read them already, the other ranks have not. Reading them here on
        # every rank (as ModelCheckpoint does) keeps the collectives in the same order on all
        # ranks before the barrier of save_checkpoint; without it DDP deadlocks.
        _ = trainer.callback_metrics
        use_atomic_checkpoints(trainer)
        trainer.save_checkpoint(self.path, weights_only=False)  # rank 0 writes; all wait
        self._saved_step = int(trainer.global_step)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        use_atomic_checkpoints(trainer)  # the best-val/AP checkpoints too

    @staticmethod
    def _check(pl_module: pl.LightningModule) -> None:
        """The module's divergence check, when it has one (PINetModule): the weights of the
        steps since its last check are about to be written."""
        check = getattr(pl_module, "check_divergence", None)
        if check is not None:
            check()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a resumed run already has its starting step on disk
        if trainer.ckpt_path is not None:
            self._saved_step = int(trainer.global_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_save(trainer):
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_save(trainer):
            self._check(pl_module)  # a DivergenceError stops the run: nothing written
            self.save(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if isinstance(exception, DivergenceError) or not self._should_save(trainer):
            return
        interrupt = isinstance(exception, (KeyboardInterrupt, SIGTERMException))
        if not interrupt and not (self.on_error and trainer.world_size == 1):
            return
        try:
            self._check(pl_module)
            self.save(trainer)
        except Exception as err:  # never hide the original error
            log.warning("could not write %s after %s: %s", self.path,
                        type(exception).__name__, err)
            return
        log.warning("%s at step %d: wrote %s; resume with ckpt_path=last run_dir=<run dir>",
                    type(exception).__name__, trainer.global_step, self.path)


def _scalar(value: Any) -> float | None:
    """A logged metric as a float (None when missing or not a number)."""
    if value is None:
        return None
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError, RuntimeError):
        return None


class LearningCurve(pl.Callback):
    """The run's learning curve: training losses and validation metrics against the step,
    drawn into ``path`` (``<run dir>/learning_curve.png``) at the end of training.

    Values are read from what the module logs (``trainer.callback_metrics``), so the picture
    needs no logger: every ``every_n_steps`` steps the step losses ``train/<name>``, at each
    epoch end their means ``train/<name>_epoch``, after each validation (not the sanity
    check) ``val/<metric>``. The lists travel in the checkpoints (callback state), so a
    resumed run draws its whole history. Rank 0 draws; a drawing error is logged, never
    raised (the picture must not cost the run).

    Args:
        path: the PNG to write.
        losses: loss names (``train/<name>``), drawn on a log scale.
        metrics: validation metric names (``val/<name>``, 0 to 1).
        every_n_steps: read the step losses this often (None: the trainer's
            ``log_every_n_steps``; reading a value is a host sync on a GPU).
    """

    def __init__(self, path: str | Path, losses: Sequence[str] = ("loss", "heatmap", "offset",
                                                                   "refine"),
                 metrics: Sequence[str] = ("AP", "AP50", "AP75"),
                 every_n_steps: int | None = None) -> None:
        super().__init__()
        if every_n_steps is not None and int(every_n_steps) < 1:
            raise ValueError(f"LearningCurve: every_n_steps must be >= 1 or null, got "
                             f"{every_n_steps}")
        self.path = Path(path)
        self.losses = list(losses)
        self.metrics = list(metrics)
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self.history: dict[str, dict[str, list[list[float]]]] = {
            "step": {}, "epoch": {}, "val": {}}

    def _add(self, kind: str, name: str, step: int, value: float | None) -> None:
        if value is None or not math.isfinite(value):
            return
        series = self.history[kind].setdefault(name, [[], []])
        if series[0] and series[0][-1] == step:  # one value per step (a re-run epoch end)
            series[1][-1] = value
            return
        series[0].append(float(step))
        series[1].append(value)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self.every_n_steps or max(int(trainer.log_every_n_steps or 1), 1)
        step = int(trainer.global_step)
        if not trainer.is_global_zero or step % every:
            return
        metrics = trainer.callback_metrics
        for name in self.losses:
            self._add("step", name, step, _scalar(metrics.get(f"train/{name}")))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics  # read on every rank (lazily synced values)
        if not trainer.is_global_zero:
            return
        for name in self.losses:
            self._add("epoch", name, int(trainer.global_step),
                      _scalar(metrics.get(f"train/{name}_epoch")))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        for name in self.metrics:
            self._add("val", name, int(trainer.global_step), _scalar(metrics.get(f"val/{name}")))

    def figure(self, title: str = "") -> Any:
        """The picture as an RGB array
        (:func:`pinet_lightning.inference.visualize.learning_curve_figure`)."""

        def series(kind: str, names: Sequence[str]) -> dict[str, tuple[list, list]]:
            found = self.history[kind]
            return {n: (found[n][0], found[n][1]) for n in names if n in found}

        return learning_curve_figure(series("epoch", self.losses),
                                     series("val", [f"{n}" for n in self.metrics]),
                                     step_losses=series("step", self.losses), title=title)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.fast_dev_run:
            return

        try:
            save_image(self.path, self.figure(f"{self.path.parent.name}: step "
                                              f"{trainer.global_step}, epoch "
                                              f"{trainer.current_epoch}"))
        except Exception as err:  # a picture must not fail a finished training
            log.warning("could not draw %s: %s", self.path, err)
            return
        log.info("learning curve: %s", self.path)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        history = state_dict.get("history") or {}
        self.history = {kind: {name: [list(s[0]), list(s[1])] for name, s in
                               (history.get(kind) or {}).items()}
                        for kind in ("step", "epoch", "val")}


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def progress_line(epoch: int, max_epochs: int | None, step: int, losses: dict[str, float],
                  val: dict[str, float], lr: float | None, elapsed: float,
                  remaining: float | None) -> str:
    """``epoch 3/18 step 160 loss 0.0214 heatmap 0.0192 ... val/AP 0.047 lr 0.002
    elapsed 1m42s eta 3m05s`` (epochs counted from 1)."""
    total = f"/{max_epochs}" if max_epochs and max_epochs > 0 else ""
    parts = [f"epoch {epoch}{total}", f"step {step}"]
    parts += [f"{name} {value:.4g}" for name, value in losses.items()]
    parts += [f"val/{name} {value:.3f}" for name, value in val.items()]
    if lr is not None:
        parts.append(f"lr {lr:.3g}")
    parts.append(f"elapsed {_duration(elapsed)}")
    if remaining is not None:
        parts.append(f"eta {_duration(remaining)}")
    return " ".join(parts)


class EpochProgress(pl.Callback):
    """One log line per training epoch (``pinet_lightning.progress``, INFO): epoch, step,
    the epoch's mean losses, the validation metrics when a validation ran in that epoch,
    the learning rate, the time since training started and an estimate of the time left.

    Args:
        when: ``auto`` (only when stdout is not a terminal: a run piped to a file or a
            batch job, where the progress bar shows nothing until the end), ``always`` or
            ``never``.
        losses, metrics: the names shown (``train/<name>_epoch``, ``val/<name>``).
    """

    WHEN = ("auto", "always", "never")

    def __init__(self, when: str = "auto", losses: Sequence[str] = ("loss", "heatmap",
                                                                     "offset", "refine"),
                 metrics: Sequence[str] = ("AP",)) -> None:
        super().__init__()
        when = str(when).lower()
        if when not in self.WHEN:
            raise ValueError(f"EpochProgress: when must be one of {self.WHEN}, got '{when}'")
        self.when = when
        self.losses = list(losses)
        self.metrics = list(metrics)
        self._start: float | None = None
        self._start_epoch = 0
        self._validated = False

    @property
    def enabled(self) -> bool:
        if self.when == "auto":
            isatty = getattr(sys.stdout, "isatty", None)
            return not (isatty is not None and isatty())
        return self.when == "always"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.monotonic()
        self._start_epoch = int(trainer.current_epoch)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validated = False

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics  # read on every rank (lazily synced values)
        if not (trainer.is_global_zero and self.enabled):
            return
        losses = {n: v for n in self.losses
                  if (v := _scalar(metrics.get(f"train/{n}_epoch"))) is not None}
        val = {n: v for n in self.metrics
               if self._validated and (v := _scalar(metrics.get(f"val/{n}"))) is not None}
        lr = None
        if trainer.optimizers:
            lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        elapsed = time.monotonic() - (self._start or time.monotonic())
        done = int(trainer.current_epoch) + 1 - self._start_epoch
        max_epochs = trainer.max_epochs
        remaining = None
        if max_epochs is not None and max_epochs > 0 and done > 0:
            remaining = elapsed / done * max(max_epochs - int(trainer.current_epoch) - 1, 0)
        progress_log.info(progress_line(int(trainer.current_epoch) + 1, max_epochs,
                                        int(trainer.global_step), losses, val, lr, elapsed,
                                        remaining))


class RunOutput(pl.Callback):
    """A file of the run directory made from the reported weights: written on rank 0 when
    those weights have been tested (``on_test_end``), or by :meth:`write` when a run tests
    nothing. ``pinet-train`` sets :attr:`enabled` to ``False`` when a run trained no step
    past the outputs already there (a resume at its end must not replace them)."""

    metrics_key = "output_path"  # where pinet-train's metrics.json records the file

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.enabled = True
        self.checkpoint: str | None = None  # the reported checkpoint, for the record
        self.written: Path | None = None

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled and trainer.is_global_zero and not trainer.sanity_checking:
            self.write(trainer, pl_module)

    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        """Write the file from ``pl_module``'s current weights; returns its path."""
        raise NotImplementedError


class ModelExport(RunOutput):
    """``<run dir>/checkpoints/model.pt``: the network of the reported checkpoint with what
    inference needs (the codec, decode settings, protocol, the data module's settings) and
    the metrics it reached (:func:`pinet_lightning.model.checkpoints.save_model`; loaded by
    :func:`pinet_lightning.load_model` and ``Predictor.from_checkpoint``)."""

    metrics_key = "model_path"

    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        datamodule = getattr(trainer, "datamodule", None)
        metrics = {str(k): v for k, v in ((k, _scalar(v)) for k, v in
                                          trainer.callback_metrics.items()) if v is not None}
        extra = {"codec": pl_module.codec.to_dict(), "decode": pl_module.decode_cfg.to_dict(),
                 "protocol": getattr(datamodule, "protocol", None),
                 "data": to_plain(dict(getattr(datamodule, "hparams", {}) or {})),
                 "checkpoint": self.checkpoint or trainer.ckpt_path, "metrics": metrics}
        save_model(self.path, pl_module.net, extra=extra)
        self.written = self.path
        log.info("inference model: %s", self.path)
        return self.path


class PredictionFigure(RunOutput):
    """``<run dir>/predictions.png``: the reported network's poses on the first
    ``num_images`` validation images (test images when there is no validation split),
    keypoints scoring under ``threshold`` and poses under ``min_score`` not drawn."""

    metrics_key = "predictions_png"

    def __init__(self, path: str | Path, num_images: int = 4, threshold: float = 0.2,
                 min_score: float = 0.1, min_side: int = 256) -> None:
        super().__init__(path)
        self.num_images = int(num_images)
        self.threshold = float(threshold)
        self.min_score = float(min_score)
        self.min_side = int(min_side)

    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        datamodule = getattr(trainer, "datamodule", None)
        if self.num_images <= 0 or datamodule is None:
            return None
        dataset = datamodule.val_dataset or datamodule.test_dataset
        if dataset is None:
            try:
                datamodule.setup("validate")
                dataset = datamodule.val_dataset
            except Exception as err:  # no val split: nothing to draw
                log.info("no picture of predictions: %s", err)
                return None
        grid = prediction_figure(pl_module.net, dataset, pl_module.layout, pl_module.decode_cfg,
                                 self.num_images, self.threshold, self.min_score,
                                 self.min_side)
        if grid is None:
            return None
        self.written = save_image(self.path, grid)
        return self.written


def _enlarge(image: Any, poses: Any, min_side: int) -> tuple[Any, Any]:
    """Small images (synthetic ones) scaled up by an integer factor so that the drawn
    skeletons stay legible; pose pixels follow (pixel-center convention)."""

    factor = max(1, int(min_side) // max(image.shape[:2]))
    if factor == 1:
        return image, poses
    image = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
    poses = poses.copy()
    poses[..., :2] = (poses[..., :2] + 0.5) * factor - 0.5
    return image, poses


def prediction_figure(net: Any, dataset: Any, layout: Any, decode: Any, num_images: int = 4,
                      threshold: float = 0.2, min_score: float = 0.1,
                      min_side: int = 256) -> Any:
    """A grid of the first ``num_images`` of an evaluation dataset (a CocoKeypointDataset in
    eval mode) with ``net``'s poses drawn in original image pixels; images smaller than
    ``min_side`` are enlarged by an integer factor first. None when there is no image."""

    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    tiles = []
    try:
        for index in range(min(int(num_images), len(dataset))):
            sample = dataset[index]
            image, _, _ = dataset.load(index)
            with torch.no_grad():
                (poses, scores), = predict_poses(net, sample["image"][None].to(device), layout,
                                                 sample["back_transform"][None], decode)
            image, poses = _enlarge(image, poses.detach().cpu().numpy(), min_side)
            tiles.append(draw_poses(image, poses, layout, scores, threshold=threshold,
                                    min_score=min_score))
    finally:
        net.train(was_training)
    return make_grid(tiles) if tiles else None
