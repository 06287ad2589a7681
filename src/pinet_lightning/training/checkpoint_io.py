"""Lightning checkpoints written whole or not at all.

Lightning's ``TorchCheckpointIO`` writes a local checkpoint through an fsspec transaction
whose temporary file lives in the system's temp folder; committing it moves the file, which
across file systems is a copy into the final name, so a full disk leaves a cut-short
``epoch_NNN.ckpt`` under a valid name. :class:`AtomicCheckpointIO` writes local checkpoints
with :func:`pinet_lightning.core.atomic.save_torch` instead (a temporary file in the checkpoint's
own folder, renamed), and any error names the checkpoint. ``pinet-train`` and
:class:`~pinet_lightning.training.callbacks.LastCheckpoint` install it
(:func:`use_atomic_checkpoints`) on a trainer that uses the default checkpoint IO.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.plugins.io import TorchCheckpointIO

from pinet_lightning.core.atomic import save_torch

__all__ = ["AtomicCheckpointIO", "use_atomic_checkpoints"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic (remote URLs: Lightning's)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        save_torch(checkpoint, path)


def use_atomic_checkpoints(trainer: pl.Trainer) -> None:
    """Give ``trainer`` an :class:`AtomicCheckpointIO` when it uses Lightning's default IO
    (a checkpoint IO the user configured is kept)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
