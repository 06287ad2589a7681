"""The objective of a training run for a search sweeper (``hydra/sweeper=optuna_search``):
``val/AP`` of the reported checkpoint, the one tested and saved as ``model.pt``.

- ``reported_checkpoint=best``: the best val/AP checkpoint's score (``best/val/AP``);
- ``reported_checkpoint=last``: the last validation's ``val/AP``, if that validation ran on
  the final weights (its step is the run's last step: :class:`LastValidationStep`); a run
  whose last epochs were not validated has no objective (``check_val_every_n_epoch`` must
  divide ``max_epochs``), rather than the AP of other weights.

``pinet-train`` writes it into ``metrics.json`` (``objective``) and returns it to Hydra.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl

__all__ = ["LastValidationStep", "sweep_objective"]

log = logging.getLogger(__name__)


class LastValidationStep(pl.Callback):
    """Remembers the global step of the last validation (the sanity check excluded)."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.step = int(trainer.global_step)


def sweep_objective(metrics: Mapping[str, Any], reported: str | None, best_by_val: str | None,
                    val_step: int | None) -> float | None:
    """val/AP of the ``reported`` checkpoint, or None (with a warning saying why).

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
