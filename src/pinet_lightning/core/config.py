"""Plain-python configuration values: what checkpoints, ``model.pt`` files and logs store.

Hydra's ``DictConfig`` / ``ListConfig`` (resolved), :class:`~pinet_lightning.core.layouts.Layout`,
tuples, paths and numpy scalars become dicts, lists, strings and numbers, so a file written
with them loads with ``torch.load(weights_only=True)`` and is readable without this package.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from pinet_lightning.core.layouts import Layout

__all__ = ["to_plain"]


def to_plain(value: Any) -> Any:
    """``value`` as plain dicts / lists / str / numbers (see the module docstring)."""

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Layout):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    return value
