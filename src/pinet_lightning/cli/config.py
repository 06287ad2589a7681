"""Hydra for the commands: the packaged ``conf/`` folder, start-up, ``???`` checks and
``_target_`` groups (callbacks, loggers)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

import pinet_lightning.cli  # noqa: F401  (registers the resolvers)
import pinet_lightning.conf
from pinet_lightning.cli.cluster import missing_plugins
from pinet_lightning.cli.run import external_rank

__all__ = ["config_dir", "run_hydra", "missing_keys", "instantiate_group", "moved_settings",
           "MOVED_SETTINGS"]

# Settings that moved (an override of the old name would be Hydra's "not in struct"): the
# codec owns the frame and the targets, the scheduler the learning-rate schedule.
MOVED_SETTINGS: dict[str, str] = {
    "data.input_size": "codec.input_size",
    "data.output_stride": "codec.output_stride",
    "data.convention": "codec.convention",
    "data.sparse_targets": "codec.sparse",
    "data.targets": "codec.targets",
    "data.layout": "layout",
    "convention": "codec.convention",
    "model.network.convention": "codec.convention",
    "model.layout": "layout",
    "model.optimizer.milestones": "model.scheduler.milestones",
    "model.optimizer.gamma": "model.scheduler.gamma",
}


def config_dir() -> Path:
    """The packaged ``conf/`` folder (``pinet_lightning.conf``), editable or installed."""
    return Path(pinet_lightning.conf.__file__).resolve().parent


def moved_settings(overrides: list[str]) -> list[str]:
    """One line per command-line override that names a setting of :data:`MOVED_SETTINGS`,
    giving the override to pass instead."""
    lines = []
    for arg in overrides:
        key, sep, value = arg.lstrip("+~").partition("=")
        for old, new in MOVED_SETTINGS.items():
            if key == old or key.startswith(old + "."):
                now = new + key[len(old):]
                why = ("the codec owns the frame and the targets, conf/codec/pinet.yaml"
                       if new.startswith("codec") else
                       "the learning-rate schedule is the scheduler node"
                       if new.startswith("model.scheduler") else
                       "the layout group feeds the codec, the data and the model")
                lines.append(f"{key} is now {now} ({why}): pass {now}{sep}{value}")
    return lines


def run_hydra(config_name: str, task: Callable[[DictConfig], Any]) -> None:
    """Run ``task`` under ``@hydra.main`` with the packaged config ``config_name``.

    Ranks > 0 of an externally launched job (srun, torchrun, a submitit SLURM job with
    several tasks) write no ``.hydra`` folder (``hydra.output_subdir`` is
    ``${pinet_rank_zero:.hydra,null}``) and log to stdout only: rank 0 owns the run
    directory. The task's return value is the job's (a sweeper reads it as the objective).
    """
    problems = moved_settings(sys.argv[1:]) + missing_plugins(sys.argv[1:])
    if problems:
        raise SystemExit("\n".join(problems))

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)
    def _main(cfg: DictConfig) -> Any:
        if external_rank() > 0:
            _drop_file_logging()
        return task(cfg)

    _main()


def _drop_file_logging() -> None:
    """Remove the root logger's file handlers (Hydra's ``<run dir>/<job name>.log``): a rank
    > 0 logs to stdout only. Hydra opened the file but wrote nothing to it yet."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()


def missing_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Dotted keys under ``cfg`` whose value is ``???``, directly or through an interpolation
    (``OmegaConf.missing_keys`` raises on the latter)."""

    found: list[str] = []
    keys = range(len(cfg)) if isinstance(cfg, ListConfig) else list(cfg.keys())
    for key in keys:
        name = f"{prefix}{key}"
        if OmegaConf.is_missing(cfg, key):
            found.append(name)
            continue
        try:
            value = cfg[key]
        except (MissingMandatoryValue, InterpolationToMissingValueError):  # ${x}, x = ???
            found.append(name)
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            found += missing_keys(value, f"{name}.")
    return found


def instantiate_group(group: Any) -> list[Any]:
    """Instantiate every ``_target_`` node of a callbacks/logger group (a mapping of nodes)."""

    if not group:
        return []
    if not isinstance(group, (DictConfig, Mapping)):
        raise TypeError(f"expected a mapping of configs with _target_, got {type(group)}")
    objects = []
    for name, node in group.items():
        if node is None:
            continue
        if not isinstance(node, (DictConfig, Mapping)) or "_target_" not in node:
            raise ValueError(f"config entry '{name}' needs a _target_ (see conf/callbacks, "
                             "conf/logger)")
        objects.append(instantiate(node, _convert_="all"))
    return objects
