"""DDP + Hydra: start the other local ranks from the parent's saved config, not from argv.

Lightning's subprocess launcher re-runs ``sys.argv`` in every child with
``hydra.run.dir=<parent dir>`` appended. Under ``-m`` (multirun) each child then re-runs
the whole sweep, and every child runs Hydra again (its own ``.hydra`` folder, logs, run
dirs). Here the parent (local rank 0) saves its resolved config into its run directory and
each child runs ``python -m pinet_lightning.cli.ddp --task <task> --config <that file>``:
no Hydra in the children, the same job in the same directory, also under ``-m``.

- ``HydraDDPStrategy``: ``DDPStrategy`` whose launcher is :class:`ConfigScriptLauncher`
  (``trainer=ddp`` / ``ddp_cpu`` use it).
- :func:`install_launcher`: swaps the launcher of a plain ``strategy=ddp`` trainer too.
- :func:`register_job`: what the children run (set by the CLI before ``fit``/``test``).
- :func:`ddp_job_scope`: restores the ``MASTER_*``/``LOCAL_RANK``/... variables the launcher
  sets and tears the process group down after a job, so that the next job of a sweep, run
  in the same parent process, starts its own group (a stale ``LOCAL_RANK`` would make
  Lightning believe the processes were started externally and start no children).

Under SLURM or torchrun the processes are created externally and none of this is used.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist
from omegaconf import OmegaConf
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from pinet_lightning.cli.warning_filters import quiet_third_party_warnings

__all__ = [
    "ChildJob",
    "ConfigScriptLauncher",
    "HydraDDPStrategy",
    "CHILD_ENV",
    "ddp_job_scope",
    "install_launcher",
    "is_ddp_child",
    "register_job",
    "child_main",
]

log = logging.getLogger(__name__)

CHILD_ENV = "PINET_DDP_CHILD"
_LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE",
                CHILD_ENV)


@dataclass
class ChildJob:
    """What a child rank runs: ``task`` ("module:function" taking a DictConfig), the resolved
    config file, and ``overrides`` (dotlist) the parent decided at run time."""

    task: str
    config: Path
    overrides: list[str] = field(default_factory=list)


_JOB: ChildJob | None = None


def register_job(task: str, config: str | Path, overrides: Sequence[str] = ()) -> None:
    """Set the job the launcher gives to child ranks (call before ``trainer.fit/test``)."""
    global _JOB
    _JOB = ChildJob(task, Path(config).resolve(), list(overrides))


def is_ddp_child() -> bool:
    """True in a child rank started by :class:`ConfigScriptLauncher`."""
    return os.environ.get(CHILD_ENV) == "1"


class ConfigScriptLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher, with children running the registered job.

    Without a registered job (the strategy used outside our CLI) it behaves exactly as
    Lightning's launcher.
    """

    def _call_children_scripts(self) -> None:
        job = _JOB
        if job is None:
            super()._call_children_scripts()
            return
        self._check_can_spawn_children()
        self.procs = []
        env = self.cluster_environment
        os.environ["MASTER_ADDR"] = env.main_address
        os.environ["MASTER_PORT"] = str(env.main_port)
        os.environ["NODE_RANK"] = str(env.node_rank())
        os.environ["LOCAL_RANK"] = str(env.local_rank())
        os.environ["WORLD_SIZE"] = f"{self.num_processes * self.num_nodes}"
        command = [sys.executable, "-m", "pinet_lightning.cli.ddp", "--task", job.task,
                   "--config", str(job.config)]
        for item in job.overrides:
            command += ["--set", item]
        for local_rank in range(1, self.num_processes):
            child_env = os.environ.copy()
            child_env["LOCAL_RANK"] = str(local_rank)
            child_env[CHILD_ENV] = "1"
            log.info("starting local rank %d: %s", local_rank, " ".join(command))
            self.procs.append(subprocess.Popen(command, env=child_env, cwd=os.getcwd()))


class HydraDDPStrategy(DDPStrategy):
    """``DDPStrategy`` whose child ranks run the parent's saved config (see module doc)."""

    strategy_name = "pinet_ddp"

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        _swap_launcher(self)


def _swap_launcher(strategy: Any) -> bool:
    """Replace the strategy's plain subprocess launcher by a :class:`ConfigScriptLauncher`
    (any other launcher is left alone). Returns True if swapped."""
    launcher = getattr(strategy, "_launcher", None)
    if type(launcher) is not _SubprocessScriptLauncher:
        return False
    strategy._launcher = ConfigScriptLauncher(launcher.cluster_environment,
                                              launcher.num_processes, launcher.num_nodes)
    return True


def install_launcher(trainer: Any) -> bool:
    """Give a trainer using Lightning's plain subprocess launcher (``strategy=ddp``, or
    ``auto`` on several GPUs) a :class:`ConfigScriptLauncher`. Returns True if swapped."""
    return _swap_launcher(trainer.strategy)


@contextlib.contextmanager
def ddp_job_scope() -> Iterator[None]:
    """Run one job: afterwards restore the launcher's environment variables and destroy the
    process group (each job of a sweep then gets fresh ranks and a fresh port)."""
    saved = {name: os.environ.get(name) for name in _LAUNCH_VARS}
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized() and not is_ddp_child():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _load_task(spec: str) -> Any:
    module_name, _, func = spec.partition(":")
    if not func:
        raise ValueError(f"task must be 'module:function', got '{spec}'")
    return getattr(importlib.import_module(module_name), func)


def child_main(argv: Sequence[str] | None = None) -> None:
    """Entry point of a child rank: load the resolved config, apply overrides, run the task."""
    parser = argparse.ArgumentParser(description="pinet-lightning DDP child rank")
    parser.add_argument("--task", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO,
                        format=f"[rank {os.environ.get('LOCAL_RANK', '?')}] %(message)s")
    quiet_third_party_warnings()
    cfg = OmegaConf.load(args.config)
    if args.overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(args.overrides))
    _load_task(args.task)(cfg)


if __name__ == "__main__":
    child_main()
