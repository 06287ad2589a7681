"""Hydra entry points (``pinet-train``, ``pinet-eval``, ``pinet-predict``) and their glue.

Importing this package sets ``OMP_WAIT_POLICY=PASSIVE`` unless set (see below) and registers
the OmegaConf resolvers the configs in ``conf/`` use:

- ``${pinet_or:a,b}``: ``a`` unless it is null or empty, else ``b`` (``run_dir`` fallback);
- ``${pinet_run_name:}``: the run directory name: ``slurm_<job id>`` under SLURM,
  ``torchrun_<run id>`` under torchrun (every rank and node agrees, a requeued job finds its
  checkpoints again), else a timestamp;
- ``${pinet_precision:<accelerator>}``: ``bf16-mixed`` when that accelerator means a CUDA GPU
  that supports bfloat16 (``auto`` with one present, ``gpu``, ``cuda``), else ``32-true``;
- ``${pinet_rank_zero:<value>,<other>}``: ``value`` in the process of global rank 0 (or
  with no external launcher), ``other`` in the ranks > 0 that srun, torchrun or a submitit
  SLURM job start: ``hydra.output_subdir`` is ``.hydra`` for rank 0 alone.
"""

from __future__ import annotations

import os

# Set before torch is imported (the entry points import this package first): idle OpenMP
# threads sleep instead of spinning. On a CPU shared with other processes (data workers, DDP
# ranks on CPU, another job) spinning threads slowed training 5-20x in our measurements; on
# an idle CPU sleeping costs 15-25%. An OMP_WAIT_POLICY already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from datetime import datetime
from typing import Any

import torch
from omegaconf import OmegaConf

from pinet_lightning.cli.run import external_rank

__all__ = ["run_name", "auto_precision", "rank_zero_value", "register_resolvers"]


def _or(value: Any, default: Any) -> Any:
    return default if value is None or value == "" else value


def run_name() -> str:
    """A run-directory name that every process of a distributed job computes alike."""
    slurm = os.environ.get("SLURM_JOB_ID")
    if slurm and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        array = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm_{slurm}" + (f"_{array}" if array else "")
    elastic = os.environ.get("TORCHELASTIC_RUN_ID")
    if elastic and elastic != "none":
        return f"torchrun_{elastic}"
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def auto_precision(accelerator: str = "auto") -> str:
    """Lightning precision for ``accelerator``: bf16 autocast on a bf16-capable CUDA GPU
    (the losses and batch-norm statistics stay float32), full float32 elsewhere."""
    if str(accelerator).lower() not in ("auto", "gpu", "cuda"):
        return "32-true"

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def rank_zero_value(value: Any, other: Any = None) -> Any:
    """``value`` in global rank 0 of an externally launched job (or outside one), else
    ``other``. Not cached: every process of a job resolves it for itself."""
    return value if external_rank() == 0 else other


def register_resolvers() -> None:
    """Register ``pinet_or``, ``pinet_run_name``, ``pinet_precision`` and ``pinet_rank_zero``
    (idempotent)."""
    if not OmegaConf.has_resolver("pinet_or"):
        OmegaConf.register_new_resolver("pinet_or", _or)
    if not OmegaConf.has_resolver("pinet_run_name"):
        # cached: one name per config object, as Hydra's ${now:}
        OmegaConf.register_new_resolver("pinet_run_name", run_name, use_cache=True)
    if not OmegaConf.has_resolver("pinet_precision"):
        OmegaConf.register_new_resolver("pinet_precision", auto_precision)
    if not OmegaConf.has_resolver("pinet_rank_zero"):
        OmegaConf.register_new_resolver("pinet_rank_zero", rank_zero_value)


register_resolvers()
