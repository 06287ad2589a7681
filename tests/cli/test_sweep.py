"""``pinet-train -m``: one directory per job (config + metrics), a summary table at the end,
and, with ``trainer=ddp_cpu``, no stray directories from the child ranks."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from tiny_run import tiny_run

from pinet_lightning.cli.sweep import collect_jobs, summarize_sweep

TINY = tiny_run("data.batch_size=2", "callbacks.prediction_figure.num_images=1")


def _tree(root: Path) -> set[str]:
    """Every directory under ``root`` (relative), skipping the synthetic images."""
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_dir() and "images" not in p.parts}


def test_ddp_sweep_gives_one_directory_per_job(tmp_path):
    exe = Path(sys.executable).with_name("pinet-train")
    if not exe.exists():
        pytest.skip("pinet-train not installed (pip install -e .)")
    env = {**os.environ, "PINET_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(exe), "-m", "model.loss.offset_weight=0.01,0.03", "trainer=ddp_cpu",
         "trainer.max_steps=2", *TINY],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    # outputs/<task_name>/multiruns/<time>/{0,1}: nothing else, no runs/ of the children
    task_dir = tmp_path / "outputs" / "synthetic"
    assert [p.name for p in task_dir.iterdir()] == ["multiruns"]
    (sweep_dir,) = (task_dir / "multiruns").iterdir()
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "outputs"]

    for num, weight in (("0", 0.01), ("1", 0.03)):
        job = sweep_dir / num
        cfg = OmegaConf.load(job / "config.yaml")
        assert cfg.model.loss.offset_weight == weight
        assert cfg.trainer.devices == 2
        metrics = json.loads((job / "metrics.json").read_text())
        # 8 images over 2 ranks with batch 2: 2 steps an epoch; max_steps=2 -> one epoch
        assert metrics["global_step"] == 2
        assert metrics["test/images"] == 2.0  # both ranks' images gathered, each once
        assert "val/AP" in metrics and (job / "checkpoints" / "last.ckpt").is_file()
        # one .hydra (the parent's), one csv version: the child wrote no run artefacts
        assert sorted(_tree(job)) == sorted(
            {".hydra", "checkpoints", "csv", "csv/version_0", "csv/version_0/results"})
        overrides = OmegaConf.load(job / ".hydra" / "overrides.yaml")
        assert f"model.loss.offset_weight={weight}" in list(overrides)

    with open(sweep_dir / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1"]
    assert "model.loss.offset_weight=0.03" in rows[1]["overrides"]
    assert float(rows[0]["global_step"]) == 2
    assert "test/AP" in rows[0]
    assert (sweep_dir / "summary.md").read_text().count("\n| ") >= 3
    assert "sweep summary" in proc.stdout


def _fake_job(sweep: Path, name: str, overrides: list[str], metrics: dict | None) -> None:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))


def test_summary_table_of_jobs(tmp_path, capsys):
    _fake_job(tmp_path, "10", ["a=3", "b=1"], {"test/AP": 0.5, "val/AP": 0.4, "extra": 1.0,
                                               "run_dir": "x"})
    _fake_job(tmp_path, "2", ["a=2", "b=1"], {"test/AP": 0.25})
    _fake_job(tmp_path, "0", ["a=1", "b=1"], None)  # a failed job: listed, no metrics
    (tmp_path / "not_a_job").mkdir()
    jobs = collect_jobs(tmp_path)
    assert [j["job"] for j in jobs] == ["0", "2", "10"]  # numeric order
    assert jobs[0]["metrics"] == {} and jobs[2]["overrides"] == ["a=3", "b=1"]
    summarize_sweep(tmp_path)
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["job", "overrides", "test/AP", "val/AP", "extra"]
    assert rows[1:] == [["0", "a=1 b=1", "", "", ""], ["2", "a=2 b=1", "0.25", "", ""],
                        ["10", "a=3 b=1", "0.5", "0.4", "1.0"]]
    md = (tmp_path / "summary.md").read_text()
    assert "| 10 | a=3 | 0.5000 | 0.4000 |" in md  # b=1, common to all jobs, is left out
    assert "sweep summary" in capsys.readouterr().out
