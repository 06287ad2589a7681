"""Sweeps on a cluster: the settings of hydra-submitit-launcher (``hydra/launcher=slurm`` or
``local``, conf/hydra/launcher) checked before anything is submitted.

Hydra reports an exception raised in a callback as a warning and goes on, and the submitit
launcher only meets its settings when it builds the executor: a missing partition would
reach ``sbatch``, a field added with ``+hydra.launcher.<typo>=...`` submitit's own parameter
check, a ``trainer.devices=auto`` job Lightning's SLURM check on the cluster, hours later.
:class:`LauncherCheck` (``hydra.callbacks.launcher_check``, conf/hydra/default.yaml) reads
them at the start of the multirun and stops it with every problem and its fix;
:func:`missing_plugins` (called by ``run_hydra`` before Hydra starts) names the install
command when a choice of conf/hydra needs a plugin of the ``cluster`` extra that is missing.

Under SLURM a job has one task per device (``tasks_per_node = trainer.devices``, ``nodes =
trainer.num_nodes``): Lightning's ``SLURMEnvironment`` gives each task its rank and
:class:`~pinet_lightning.cli.ddp.HydraDDPStrategy` starts no process. Submitit's local
executor gives its tasks no ranks Lightning reads, so a local job is one process
(``tasks_per_node = nodes = 1``) and ``trainer=ddp`` / ``ddp_cpu`` starts the other local
ranks inside it, as without a launcher.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

__all__ = ["LauncherCheck", "launcher_problems", "missing_plugins", "SUBMITIT_LAUNCHERS",
           "PLUGIN_CHOICES"]

_PLUGIN = "hydra_plugins.hydra_submitit_launcher"
# _target_ of the plugin's launchers -> (executor, name of its config dataclass)
SUBMITIT_LAUNCHERS = {
    f"{_PLUGIN}.submitit_launcher.SlurmLauncher": ("slurm", "SlurmQueueConf"),
    f"{_PLUGIN}.submitit_launcher.LocalLauncher": ("local", "LocalQueueConf"),
}


# config choices of conf/hydra that extend a plugin of the `cluster` extra -> its module
PLUGIN_CHOICES = {
    ("hydra/launcher", "slurm"): _PLUGIN,
    ("hydra/launcher", "local"): _PLUGIN,
    ("hydra/launcher", "submitit_slurm"): _PLUGIN,
    ("hydra/launcher", "submitit_local"): _PLUGIN,
    ("hydra/sweeper", "optuna_search"): "hydra_plugins.hydra_optuna_sweeper",
    ("hydra/sweeper", "optuna"): "hydra_plugins.hydra_optuna_sweeper",
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # no hydra_plugins package at all
        return False


def missing_plugins(overrides: list[str]) -> list[str]:
    """The command-line choices (``hydra/launcher=slurm``, ...) whose Hydra plugin is not
    installed, each with the install command (Hydra itself would only say that the plugin's
    config cannot be found)."""
    problems = []
    for item in overrides:
        group, _, choice = item.lstrip("+~").partition("=")
        module = PLUGIN_CHOICES.get((group, choice))
        if module is not None and not _installed(module):
            problems.append(f"{item} needs the {module.split('.')[-1].replace('_', '-')} "
                            "plugin: pip install -c constraints.txt \".[cluster]\" (in the "
                            "pinet-lightning checkout)")
    return problems


def _fields(schema: str) -> set[str]:
    """Field names of the plugin's launcher config dataclass."""
    from hydra_plugins.hydra_submitit_launcher import config  # optional dependency

    return {f.name for f in dataclasses.fields(getattr(config, schema))}


def _value(cfg: DictConfig, key: str) -> tuple[Any, str | None]:
    """(value of ``cfg.<key>``, None) or (None, why it cannot be read)."""
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True), None
    except Exception as err:  # a missing value, a failing interpolation
        return None, f"{type(err).__name__}: {err}".splitlines()[0]


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def launcher_problems(cfg: DictConfig) -> list[str]:
    """Every problem of ``cfg.hydra.launcher`` when it is a submitit launcher (none for any
    other launcher), each naming the setting and its fix."""
    launcher = OmegaConf.select(cfg, "hydra.launcher")
    target = launcher.get("_target_") if launcher is not None else None
    if target not in SUBMITIT_LAUNCHERS:
        return []
    executor, schema = SUBMITIT_LAUNCHERS[target]
    problems = []
    known = _fields(schema) - {"_target_"}
    for key in sorted(set(launcher.keys()) - known - {"_target_"}):
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f" (did you mean hydra.launcher.{close[0]}?)" if close else ""
        problems.append(f"hydra.launcher.{key} is not a setting of the submitit {executor} "
                        f"launcher{hint}; its settings: {', '.join(sorted(known))}")
    missing = [key for key in launcher.keys() if OmegaConf.is_missing(launcher, key)]
    problems += [f"hydra.launcher.{key} is not set: add hydra.launcher.{key}=..."
                 for key in missing]
    if executor == "slurm" and "partition" not in missing and not launcher.get("partition"):
        problems.append("hydra.launcher.partition is not set: add hydra.launcher.partition="
                        "<partition> (`sinfo -s` lists them; the default one is marked *)")

    counts = {}
    for key, trainer_key, least in (("nodes", "trainer.num_nodes", 1),
                                    ("tasks_per_node", "trainer.devices", 1),
                                    ("gpus_per_node", "trainer.devices", 0)):
        value, error = _value(cfg, f"hydra.launcher.{key}")
        if error is None and (value is None and key == "gpus_per_node"
                              or _whole(value) and value >= least):
            counts[key] = value
            continue
        got = error if error is not None else f"got {value!r}"
        problems.append(f"hydra.launcher.{key} must be a whole number >= {least} ({got}); "
                        f"by default it is {trainer_key}: give {trainer_key}=<number>")

    if executor == "local":
        if counts.get("nodes", 1) != 1 or counts.get("tasks_per_node", 1) != 1:
            problems.append("hydra/launcher=local runs each job as one process "
                            "(hydra.launcher.nodes=1, hydra.launcher.tasks_per_node=1); "
                            "trainer=ddp or ddp_cpu starts the other local ranks of a job")
    else:
        # Lightning's SLURMEnvironment: one task per device, on every node
        for key, trainer_key in (("nodes", "trainer.num_nodes"),
                                 ("tasks_per_node", "trainer.devices")):
            wanted, _ = _value(cfg, trainer_key)
            if key in counts and counts[key] != wanted:
                problems.append(f"hydra.launcher.{key}={counts[key]} but {trainer_key}="
                                f"{wanted!r}: under SLURM Lightning runs one task per device "
                                f"on each node; set {trainer_key} (hydra/launcher=slurm "
                                f"takes hydra.launcher.{key} from it)")
    return problems


class LauncherCheck(Callback):
    """Hydra callback: stop a multirun whose submitit launcher settings are wrong before any
    job is submitted (``hydra.callbacks.launcher_check``)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        problems = launcher_problems(config)
        if problems:
            choice = OmegaConf.select(config, "hydra.runtime.choices", default={})
            name = choice.get("hydra/launcher", "?") if choice else "?"
            # SystemExit: Hydra turns an Exception raised by a callback into a warning
            raise SystemExit(f"pinet-train -m hydra/launcher={name}: nothing was submitted:\n"
                             + "\n".join(f"  - {p}" for p in problems))
