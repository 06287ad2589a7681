"""What the command tests share: the overrides of a tiny, fast training run (64 px synthetic
images: 8 train, 2 val, at most 3 people; one refinement block, no data workers, one thread, a
validation every epoch), composing a command's config, and reading a checkpoint back. Each test
adds what it needs (batch size, device, outputs)."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from pinet_lightning.cli.config import config_dir

SYNTHETIC = ["data.synthetic.image_size=64", "data.synthetic.num_train=8",
             "data.synthetic.num_val=2", "data.synthetic.max_people=3"]
# the tiny run without its data (for tests that bring their own files)
TINY_TRAINING = [
    "codec.input_size=64", "data.num_workers=0", "data.pin_memory=false",
    "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1",
    "trainer.check_val_every_n_epoch=1", "model.network.refine_layers=1", "threads=1",
]
TINY_RUN = [*TINY_TRAINING, *SYNTHETIC]


def tiny_run(*extra: str) -> list[str]:
    """:data:`TINY_RUN` and ``extra`` overrides."""
    return [*TINY_RUN, *extra]


def compose_config(root: Path, overrides: list[str], name: str = "train") -> DictConfig:
    """The packaged config ``name`` (train, eval, predict) with ``paths.root_dir=root`` and
    ``overrides``, as the command would compose it."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(name, overrides=[f"paths.root_dir={root}", *overrides])


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's contents, read safely on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)
