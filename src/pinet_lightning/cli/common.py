"""Shared CLI helpers: Hydra start-up, run directories, instantiation, metric tables."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import pinet_lightning.cli  # noqa: F401  (registers the resolvers)

__all__ = [
    "config_dir",
    "run_hydra",
    "external_rank",
    "setup_threads",
    "start_run",
    "missing_keys",
    "save_config",
    "instantiate_group",
    "resolve_ckpt_path",
    "format_metrics",
    "print_table",
    "markdown_table",
    "print_metric_table",
    "rich_console",
    "write_metrics",
    "to_plain",
    "load_inference_net",
]

log = logging.getLogger("pinet_lightning")

METRIC_ORDER = ("AP", "AP50", "AP75", "AR", "AR50", "AR75", "AP_easy", "AP_medium",
                "AP_hard", "AP_M", "AP_L", "AR_M", "AR_L")


def config_dir() -> Path:
    """The packaged ``conf/`` folder (``pinet_lightning.conf``), editable or installed."""
    import pinet_lightning.conf

    return Path(pinet_lightning.conf.__file__).resolve().parent


def external_rank() -> int:
    """Global rank given by an external launcher (SLURM, torchrun), 0 when there is none."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name)
        if value is not None and value.isdigit():
            return int(value)
    return 0


def run_hydra(config_name: str, task: Callable[[DictConfig], Any]) -> None:
    """Run ``task`` under ``@hydra.main`` with the packaged config ``config_name``.

    Ranks > 0 of an externally launched job (srun, torchrun) write no ``.hydra`` folder and
    log to stdout only: rank 0 owns the run directory.
    """
    import hydra

    if external_rank() > 0:
        extra = ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
        sys.argv += [a for a in extra if not any(x.startswith(a.split("=")[0])
                                                 for x in sys.argv[1:])]

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)
    def _main(cfg: DictConfig) -> Any:
        return task(cfg)

    _main()


def missing_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Dotted keys under ``cfg`` whose value is ``???``, directly or through an interpolation
    (``OmegaConf.missing_keys`` raises on the latter)."""
    from omegaconf import ListConfig
    from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

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


def setup_threads(cfg: DictConfig) -> None:
    """``torch.set_num_threads(cfg.threads)`` when set."""
    threads = cfg.get("threads")
    if threads:
        torch.set_num_threads(int(threads))


def start_run(cfg: DictConfig) -> Path:
    """Threads, the run directory (created and given ``config.yaml`` by the writing rank
    alone: not our DDP children, not srun / torchrun ranks > 0) and the seed; returns the
    run directory."""
    import pytorch_lightning as pl

    from pinet_lightning.cli.ddp import is_ddp_child

    setup_threads(cfg)
    out_dir = Path(str(cfg.paths.output_dir)).resolve()
    if not is_ddp_child() and external_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    if cfg.get("seed") is not None:
        pl.seed_everything(int(cfg.seed), workers=True)
    return out_dir


def to_plain(cfg: Any) -> Any:
    """A DictConfig, resolved, as plain python (:func:`pinet_lightning.config.to_plain`)."""
    from pinet_lightning.config import to_plain as plain

    return plain(cfg)


def save_config(cfg: DictConfig, path: Path) -> Path:
    """Write the fully resolved config (no interpolations left; DDP children read it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    OmegaConf.save(resolved, path)
    return path


def instantiate_group(group: Any) -> list[Any]:
    """Instantiate every ``_target_`` node of a callbacks/logger group (a mapping of nodes)."""
    from hydra.utils import instantiate

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


def _as_float(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def format_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Scalar metrics as floats (tensors included), others dropped."""
    out = {}
    for key, value in metrics.items():
        number = _as_float(value)
        if number is not None:
            out[str(key)] = number
    return out


def metric_table_rows(metrics: Mapping[str, float]) -> tuple[list[str], list[list[str]]]:
    """(columns, rows): one row per stage (``val``, ``test``), one column per AP/AR metric."""
    stages: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        stage, _, name = key.partition("/")
        if name in METRIC_ORDER:
            stages.setdefault(stage, {})[name] = value
    names = [n for n in METRIC_ORDER if any(n in s for s in stages.values())]
    rows = [[stage] + [_fmt(values.get(n)) for n in names] for stage, values in stages.items()]
    return ["split"] + names, rows


def _fmt(value: float | None) -> str:
    # the evaluators report -1 for a metric without data (e.g. no hard images)
    if value is None or math.isnan(value) or value < 0:
        return "-"
    return f"{value:.4f}"


def rich_console() -> Any:
    """A rich Console; when the output is not a terminal (logs, pipes) it is 140 columns
    wide so that metric tables are not squeezed into 80."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 140))
    return console


def print_table(title: str, columns: list[str], rows: list[list[str]],
                label_columns: int = 1) -> str:
    """Print a rich table (the first ``label_columns`` left-aligned, numbers right-aligned);
    returns it as markdown text."""
    from rich.table import Table

    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i < label_columns else "right")
    for row in rows:
        table.add_row(*row)
    rich_console().print(table)
    return markdown_table(columns, rows)


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """The same table as markdown text."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def print_metric_table(metrics: Mapping[str, float], title: str = "metrics") -> str:
    """Print the AP/AR metrics as a rich table; returns the table as markdown text."""
    columns, rows = metric_table_rows(metrics)
    return print_table(title, columns, rows) if rows else ""


def write_metrics(path: Path, metrics: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(metrics), indent=2, sort_keys=True, default=str))
    return path


def load_inference_net(ckpt_path: str | Path, **options: Any) -> Any:
    """A :class:`~pinet_lightning.predictor.Predictor` from a Lightning checkpoint or a
    ``save_model`` file; ``options`` go to ``Predictor.from_checkpoint`` (default: CPU)."""
    from pinet_lightning.predictor import Predictor

    path = Path(str(ckpt_path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such file; pass a .ckpt written by "
                                "pinet-train or a checkpoints/model.pt")
    return Predictor.from_checkpoint(path, **{"device": "cpu", **options})
