"""Sweep summary: a Hydra callback that, at the end of a ``-m`` multirun, reads each job's
``metrics.json`` and writes one table (``summary.csv`` and ``summary.md`` in the sweep
directory, and printed with rich)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pinet_lightning.cli.tables import markdown_table
from pinet_lightning.cli.tables import print_table as show_table

__all__ = ["SweepSummary", "collect_jobs", "summarize_sweep"]

log = logging.getLogger(__name__)

# shown first, in this order, when present
_KEY_METRICS = ("objective", "test/AP", "test/AP50", "test/AP75", "test/AR", "val/AP",
                "val/AP50", "best/val/AP", "global_step", "epoch")


def _overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if path.is_file():
        return [str(o) for o in (OmegaConf.load(path) or [])]
    return []


def collect_jobs(sweep_dir: str | Path, metrics_file: str = "metrics.json") -> list[dict]:
    """``[{"job": name, "dir": path, "overrides": [...], "metrics": {...}}]`` for every job
    directory (a direct subfolder) of the sweep, in job-number order; a job without a
    metrics file is listed with empty metrics (it failed or is still running)."""
    sweep_dir = Path(sweep_dir)
    jobs = []
    subdirs = [p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()
               or (p / metrics_file).is_file()] if sweep_dir.is_dir() else []
    for job_dir in sorted(subdirs, key=lambda p: (not p.name.isdigit(), int(p.name)
                                                  if p.name.isdigit() else 0, p.name)):
        metrics_path = job_dir / metrics_file
        metrics: dict[str, Any] = {}
        if metrics_path.is_file():
            try:
                metrics = json.loads(metrics_path.read_text())
            except json.JSONDecodeError:
                log.warning("sweep summary: unreadable %s", metrics_path)
        jobs.append({"job": job_dir.name, "dir": str(job_dir), "overrides": _overrides(job_dir),
                     "metrics": metrics})
    return jobs


def _columns(jobs: list[dict]) -> list[str]:
    keys: list[str] = []
    for job in jobs:
        for key, value in job["metrics"].items():
            if key not in keys and isinstance(value, (int, float)) and not isinstance(value,
                                                                                     bool):
                keys.append(key)
    first = [k for k in _KEY_METRICS if k in keys]
    return first + sorted(k for k in keys if k not in first)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def summarize_sweep(sweep_dir: str | Path, metrics_file: str = "metrics.json",
                    print_table: bool = True) -> list[dict]:
    """Write ``summary.csv`` (every numeric metric, all overrides) and ``summary.md`` (the key
    metrics, the overrides that differ between jobs) into ``sweep_dir`` and print the latter;
    returns the jobs of :func:`collect_jobs`."""
    sweep_dir = Path(sweep_dir)
    jobs = collect_jobs(sweep_dir, metrics_file)
    if not jobs:
        log.warning("sweep summary: no job directories in %s", sweep_dir)
        return jobs
    columns = _columns(jobs)
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["job", "overrides", *columns])
        for job in jobs:
            writer.writerow([job["job"], " ".join(job["overrides"]),
                             *[job["metrics"].get(c, "") for c in columns]])
    shown = [c for c in columns if c in _KEY_METRICS] or columns[:8]
    # the table shows the overrides that differ between jobs (summary.csv keeps them all)
    common = set.intersection(*(set(job["overrides"]) for job in jobs)) if len(jobs) > 1 \
        else set()
    header = ["job", "overrides", *shown]
    rows = [[job["job"], " ".join(o for o in job["overrides"] if o not in common) or "-",
             *[_cell(job["metrics"].get(c)) for c in shown]] for job in jobs]
    md = markdown_table(header, rows)
    (sweep_dir / "summary.md").write_text(f"# Sweep {sweep_dir}\n\n" + md + "\n")
    if print_table:
        show_table(f"sweep summary ({sweep_dir})", header, rows, label_columns=2)
    return jobs


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks.sweep_summary`` in conf/hydra/default.yaml)."""

    def __init__(self, metrics_file: str = "metrics.json") -> None:
        self.metrics_file = metrics_file
        self._job_dirs: list[Path] = []

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        # The job's own output dir: robust to the sweep dir's ${now:} being re-resolved.
        try:
            self._job_dirs.append(Path(config.hydra.runtime.output_dir))
        except Exception:  # pragma: no cover - a config without the hydra node
            pass

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._job_dirs:
            sweep_dir = self._job_dirs[0].parent
        else:
            sweep_dir = Path(str(config.hydra.sweep.dir))
        summarize_sweep(sweep_dir, self.metrics_file)
