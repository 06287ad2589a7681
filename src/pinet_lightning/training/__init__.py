"""Stage 4, learning: training proposals, the losses, the ``LightningModule`` and the run's
Lightning callbacks. May import every stage below it."""
