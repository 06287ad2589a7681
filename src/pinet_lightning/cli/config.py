"""Hydra for the commands: the packaged ``conf/`` folder, start-up (with the third-party
warnings nobody can act on filtered out), ``???`` checks, the trainer settings' types and
``_target_`` groups (callbacks, loggers)."""

from __future__ import annotations

import logging
import sys
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

import pinet_lightning.cli  # noqa: F401  (registers the resolvers)
import pinet_lightning.conf
from pinet_lightning.cli.cluster import missing_plugins
from pinet_lightning.cli.run import external_rank
from pinet_lightning.cli.warning_filters import quiet_third_party_warnings

__all__ = ["config_dir", "run_hydra", "missing_keys", "instantiate_group", "moved_settings",
           "MOVED_SETTINGS", "check_trainer_settings"]

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
    quiet_third_party_warnings()
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


def _scalar_types(hint: Any) -> tuple[set[type], set[Any]] | None:
    """(accepted scalar types, accepted literal values) of a type hint made of scalars only
    (int, float, bool, str, None, Literal); None when it admits anything else."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        found: tuple[set[type], set[Any]] = (set(), set())
        for arg in typing.get_args(hint):
            part = _scalar_types(arg)
            if part is None:
                return None
            found[0].update(part[0])
            found[1].update(part[1])
        return found
    if origin is typing.Literal:
        return set(), set(typing.get_args(hint))
    if hint in (int, float, bool, str, type(None)):
        return {hint}, set()
    return None


def _accepts(kinds: set[type], literals: set[Any], value: Any) -> bool:
    if value in literals and not (isinstance(value, bool) and bool not in kinds):
        return True
    if value is None:
        return type(None) in kinds
    if isinstance(value, bool):
        return bool in kinds or int in kinds
    if isinstance(value, int):
        return int in kinds or float in kinds
    if isinstance(value, float):
        return float in kinds
    return isinstance(value, str) and str in kinds


def check_trainer_settings(trainer: Any, prefix: str = "trainer.") -> None:
    """Refuse, naming the override, a ``trainer.*`` value of the wrong type for Lightning's
    ``Trainer`` (``trainer.max_epochs=abc`` ended in a bare ``AssertionError`` inside
    Lightning). Only the arguments whose type is made of scalars are checked."""
    if not isinstance(trainer, (DictConfig, Mapping)):
        return
    hints = typing.get_type_hints(pl.Trainer.__init__)
    for key, value in trainer.items():
        if key not in hints or isinstance(value, (DictConfig, Mapping, list, tuple)):
            continue
        scalar = _scalar_types(hints[key])
        if scalar is None or _accepts(*scalar, value):
            continue
        kinds, literals = scalar
        wanted = [{int: "an integer", float: "a number", bool: "true / false",
                   str: "a string", type(None): "null"}[k] for k in
                  (int, float, bool, str, type(None)) if k in kinds]
        if literals:
            wanted.append("one of " + ", ".join(map(str, sorted(literals, key=str))))
        example = {int: "10", float: "1.0", bool: "true"}.get(
            next((k for k in (int, float, bool) if k in kinds), None), None)
        fix = f"e.g. {prefix}{key}={example}" if example else "see the Trainer documentation"
        raise ValueError(f"{prefix}{key}={value!r} is not valid: Lightning's Trainer takes "
                         f"{' or '.join(wanted)} there; pass {fix}")
