"""Run directories of the commands: threads, the directory and its config, the seed, the
checkpoint to resume, metrics files, and the predictor of a checkpoint."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from pinet_lightning.cli.ddp import is_ddp_child
from pinet_lightning.inference.predictor import Predictor

__all__ = ["external_rank", "setup_threads", "start_run", "save_config", "resolve_ckpt_path",
           "write_metrics", "load_inference_net"]

log = logging.getLogger("pinet_lightning")


def external_rank() -> int:
    """Global rank given by an external launcher (SLURM, torchrun), 0 when there is none."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name)
        if value is not None and value.isdigit():
            return int(value)
    return 0


def setup_threads(cfg: DictConfig) -> None:
    """``torch.set_num_threads(cfg.threads)`` when set."""
    threads = cfg.get("threads")
    if threads:
        torch.set_num_threads(int(threads))


def start_run(cfg: DictConfig) -> Path:
    """Threads, the run directory (created and given ``config.yaml`` by the writing rank
    alone: not our DDP children, not srun / torchrun ranks > 0) and the seed; returns the
    run directory."""

    setup_threads(cfg)
    out_dir = Path(str(cfg.paths.output_dir)).resolve()
    if not is_ddp_child() and external_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    if cfg.get("seed") is not None:
        pl.seed_everything(int(cfg.seed), workers=True)
    return out_dir


def resolve_ckpt_path(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint ``fit`` resumes from: ``ckpt_path`` (a file, or ``last`` meaning
    ``<run_dir>/checkpoints/last.ckpt``), else with ``resume=auto`` that file if it exists."""
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = cfg.get("ckpt_path")
    resume = str(cfg.get("resume", "auto")).lower()
    if resume not in ("auto", "never"):
        raise ValueError(f"resume must be 'auto' or 'never', got '{resume}'")
    if ckpt is not None and str(ckpt) != "":
        if str(ckpt) == "last":
            if not last.is_file():
                raise FileNotFoundError(
                    f"ckpt_path=last: {last} does not exist. Pass run_dir=<the run directory "
                    "to resume> (it holds checkpoints/last.ckpt), or ckpt_path=<a .ckpt file>"
                )
            return last
        path = Path(str(ckpt)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt}: no such checkpoint file")
        return path.resolve()
    if resume == "auto" and last.is_file():
        log.info("resume=auto: resuming from %s", last)
        return last
    return None


def write_metrics(path: Path, metrics: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(metrics), indent=2, sort_keys=True, default=str))
    return path


def load_inference_net(ckpt_path: str | Path, **options: Any) -> Any:
    """A :class:`~pinet_lightning.inference.predictor.Predictor` from a Lightning checkpoint or a
    ``save_model`` file; ``options`` go to ``Predictor.from_checkpoint`` (default: CPU)."""

    path = Path(str(ckpt_path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such file; pass a .ckpt written by "
                                "pinet-train or a checkpoints/model.pt")
    return Predictor.from_checkpoint(path, **{"device": "cpu", **options})


def save_config(cfg: DictConfig, path: Path) -> Path:
    """Write the fully resolved config (no interpolations left; DDP children read it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    OmegaConf.save(resolved, path)
    return path
