"""The overrides of a tiny, fast training run that the command tests share: 64 px synthetic
images (8 train, 2 val, at most 3 people), one refinement block, no data workers, one thread,
a validation every epoch. Each test adds what it needs (batch size, device, outputs)."""

from __future__ import annotations

SYNTHETIC = ["data.synthetic.image_size=64", "data.synthetic.num_train=8",
             "data.synthetic.num_val=2", "data.synthetic.max_people=3"]
TINY_RUN = [
    "codec.input_size=64", *SYNTHETIC, "data.num_workers=0", "data.pin_memory=false",
    "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1",
    "trainer.check_val_every_n_epoch=1", "model.network.refine_layers=1", "threads=1",
]


def tiny_run(*extra: str) -> list[str]:
    """:data:`TINY_RUN` and ``extra`` overrides."""
    return [*TINY_RUN, *extra]
