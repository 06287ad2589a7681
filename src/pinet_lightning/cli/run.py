"""Run directories of the commands: threads, the directory and its config, the seed, the
checkpoint to resume, metrics files (written atomically), the predictor of a checkpoint, and
the exit status of a run that was stopped (:func:`stopped_runs_fail`)."""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.exceptions import SIGTERMException

from pinet_lightning.cli.ddp import is_ddp_child
from pinet_lightning.core.atomic import write_json, write_text
from pinet_lightning.inference.predictor import Predictor

__all__ = ["external_rank", "setup_threads", "start_run", "save_config", "resolve_ckpt_path",
           "write_metrics", "load_inference_net", "resume_command", "stopped_runs_fail",
           "SIGTERM_EXIT"]

log = logging.getLogger("pinet_lightning")

SIGTERM_EXIT = 143  # 128 + 15: the status a shell reports for a job that SIGTERM ended


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
    """``metrics.json``, whole or not at all (a failed write keeps the previous file)."""
    return write_json(path, dict(metrics), indent=2, sort_keys=True, default=str)


def resume_command(run_dir: Path, command: str = "pinet-train") -> str:
    """The command that resumes the run in ``run_dir`` from its ``last.ckpt``: the same
    overrides (when Hydra knows them), ``run_dir`` and ``ckpt_path=last``."""
    try:
        given = list(HydraConfig.get().overrides.task)
    except ValueError:  # not run by Hydra (tests, the API)
        return f"{command} run_dir={run_dir} ckpt_path=last <the overrides of the first run>"
    kept = [o for o in given if o.split("=", 1)[0].lstrip("+~") not in
            ("run_dir", "ckpt_path", "resume")]
    return shlex.join([command, *kept, f"run_dir={run_dir}", "ckpt_path=last"])


@contextmanager
def stopped_runs_fail(command: str, resume: str | None = None) -> Iterator[None]:
    """A run that did not finish exits non-zero.

    Lightning ends a run stopped by SIGTERM (a preempted or cancelled job) with its
    ``SIGTERMException``, a ``SystemExit`` without a code, i.e. exit status 0: a scheduler
    or ``pinet-train && next`` would take it for a finished run. It becomes exit status 143
    (``SIGTERM_EXIT``), and a Ctrl-C's ``SystemExit(1)`` stays 1; both log the command that
    resumes the run (``resume``).
    """
    then = f"; resume it with:\n  {resume}" if resume else "; run it again"
    try:
        yield
    except SIGTERMException as err:
        log.error("%s was stopped by SIGTERM before it finished%s", command, then)
        raise SystemExit(SIGTERM_EXIT) from err
    except SystemExit as err:  # Lightning's graceful Ctrl-C ends with sys.exit(1)
        log.error("%s was interrupted before it finished%s", command, then)
        raise SystemExit(err.code or 1) from err


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
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    return write_text(path, OmegaConf.to_yaml(resolved))
