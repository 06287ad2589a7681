"""Training callbacks that keep work from being lost.

:class:`LastCheckpoint` writes ``last.ckpt`` at the end of every training epoch, whatever the
monitored metric does (Lightning's ``ModelCheckpoint(save_last=True)`` only rewrites it when
a top-k checkpoint is saved in the same step, so a flat ``val/AP`` froze it at the best
epoch), at the end of training (``max_steps`` may stop mid-epoch), and when the run is
interrupted: Ctrl-C (``KeyboardInterrupt``) or SIGTERM (Lightning's ``SIGTERMException``,
e.g. a preempted SLURM job), and, on a single device, any other error. It never writes on a
:class:`~pinet_lightning.module.NonFiniteLossError` (the weights have diverged: the file
keeps the last finished epoch) nor when no step was taken since the last write. A resumed
run (``ckpt_path=last``) starts at the step the file holds; Lightning resumes a mid-epoch
file at its step, restarting the data order of that epoch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

__all__ = ["LastCheckpoint"]

log = logging.getLogger(__name__)


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
        """Write the file atomically (a kill during the write leaves the previous one)."""
        # Epoch metrics logged with sync_dist are reduced lazily, on first read: rank 0's
        # progress bar has read them already, the other ranks have not. Reading them here on
        # every rank (as ModelCheckpoint does) keeps the collectives in the same order on all
        # ranks before the barrier of save_checkpoint; without it DDP deadlocks.
        _ = trainer.callback_metrics
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        tmp = self.dirpath / f".{self.filename}.ckpt.part"
        trainer.save_checkpoint(tmp)  # rank 0 writes; every rank waits for it
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        self._saved_step = int(trainer.global_step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a resumed run already has its starting step on disk
        if trainer.ckpt_path is not None:
            self._saved_step = int(trainer.global_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_save(trainer):
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_save(trainer):
            self.save(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        from pinet_lightning.module import NonFiniteLossError

        if isinstance(exception, NonFiniteLossError) or not self._should_save(trainer):
            return
        interrupt = isinstance(exception, (KeyboardInterrupt, SIGTERMException))
        if not interrupt and not (self.on_error and trainer.world_size == 1):
            return
        try:
            self.save(trainer)
        except Exception as err:  # never hide the original error
            log.warning("could not write %s after %s: %s", self.path,
                        type(exception).__name__, err)
            return
        log.warning("%s at step %d: wrote %s; resume with ckpt_path=last run_dir=<run dir>",
                    type(exception).__name__, trainer.global_step, self.path)
