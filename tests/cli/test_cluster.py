"""Sweeps that outgrow one machine (``pip install ".[cluster]"``): hydra-submitit-launcher's
local executor (the SLURM launcher's code path on one machine), the Optuna search sweeper,
the launcher checks made before anything is submitted, and DDP under SLURM's environment
(Lightning's ``SLURMEnvironment``: ``HydraDDPStrategy`` starts no process)."""

from __future__ import annotations

import csv
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.utils import setup_globals
from omegaconf import OmegaConf
from tiny_run import tiny_run

from pinet_lightning.cli import cluster, rank_zero_value
from pinet_lightning.cli.cluster import launcher_problems
from pinet_lightning.cli.config import config_dir
from pinet_lightning.training.report import sweep_objective

# 8 images of 64 px, 2 training steps (1 epoch, validated), one thread
TINY = tiny_run("data.batch_size=2", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                "callbacks.prediction_figure.num_images=0")


def _pinet_train(args: list[str], root: Path, timeout: int = 420,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("pinet-train")
    if not exe.exists():
        pytest.skip("pinet-train not installed (pip install -e .)")
    # the test itself may run inside a SLURM job: its variables would reach the jobs
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "SUBMITIT_")) and k != "RANK"}
    clean.update(PINET_ROOT=str(root), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([str(exe), *args], cwd=root, env=clean, capture_output=True,
                          text=True, timeout=timeout)


def _sweep_dir(root: Path) -> Path:
    (sweep,) = (root / "outputs" / "synthetic" / "multiruns").iterdir()
    return sweep


def _summary(sweep: Path) -> list[dict]:
    with open(sweep / "summary.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_local_launcher_runs_each_job_in_its_own_process(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = _pinet_train(["-m", "hydra/launcher=local", "model.loss.offset_weight=0.01,0.03",
                         *TINY], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "Submitit 'local' sweep output dir" in proc.stdout + proc.stderr

    sweep = _sweep_dir(tmp_path)
    job_ids = set()
    for num, weight in (("0", 0.01), ("1", 0.03)):
        job = sweep / num
        assert OmegaConf.load(job / "config.yaml").model.loss.offset_weight == weight
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["global_step"] == 2 and metrics["run_dir"] == str(job)
        assert metrics["objective"] == metrics["val/AP"]  # validated at the last step
        assert (job / "checkpoints" / "last.ckpt").is_file()
        # hydra.job.id is submitit's job id: for the local executor, the job's process id
        job_id = OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra.job.id
        assert (sweep / ".submitit" / job_id / f"{job_id}_0_result.pkl").is_file()
        job_ids.add(job_id)
    assert len(job_ids) == 2 and str(os.getpid()) not in job_ids
    # nothing but the sweep: no runs/ of a job, no directory of a rank
    assert [p.name for p in (tmp_path / "outputs" / "synthetic").iterdir()] == ["multiruns"]

    rows = _summary(sweep)
    assert [r["job"] for r in rows] == ["0", "1"]
    assert "model.loss.offset_weight=0.03" in rows[1]["overrides"]
    assert float(rows[0]["global_step"]) == 2 and "objective" in rows[0]
    assert "sweep summary" in proc.stdout

    # a requeued job (preempted, timed out) runs its pickled submission again: the pickled
    # config names the same job directory (${now:} cached), where resume=auto finds last.ckpt
    setup_globals()  # Hydra's resolvers, as the launcher registers them in a job
    monkeypatch.setenv("PINET_ROOT", str(tmp_path))  # the job's environment
    with open(sweep / ".submitit" / sorted(job_ids)[0] /
              f"{sorted(job_ids)[0]}_submitted.pkl", "rb") as f:
        delayed = pickle.load(f)
    assert Path(str(delayed.function.config.hydra.sweep.dir)) == sweep


@pytest.mark.slow
def test_optuna_search_records_the_objective_of_each_trial(tmp_path):
    optuna = pytest.importorskip("optuna")
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    proc = _pinet_train(["-m", "hydra/sweeper=optuna_search", "hydra.sweeper.n_trials=2",
                         f"hydra.sweeper.storage={storage}", *TINY], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    sweep = _sweep_dir(tmp_path)
    trials = optuna.load_study(study_name="pinet", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for trial in trials:
        job = sweep / str(trial.number)
        metrics = json.loads((job / "metrics.json").read_text())
        assert trial.value == metrics["objective"] == metrics["val/AP"]
        cfg = OmegaConf.load(job / "config.yaml")
        # the trial's parameters are the job's, inside the documented search space
        assert trial.params["model.optimizer.lr"] == pytest.approx(cfg.model.optimizer.lr)
        assert 2e-4 <= cfg.model.optimizer.lr <= 1e-2
        for name in ("offset_weight", "refine_weight"):
            assert trial.params[f"model.loss.{name}"] == pytest.approx(cfg.model.loss[name])
            assert 0.01 <= cfg.model.loss[name] <= 0.3
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == max(t.value for t in trials)
    assert [r["job"] for r in _summary(sweep)] == ["0", "1"]


def test_launcher_error_stops_before_submitting(tmp_path):
    """No partition, a misspelt field, a device count that is no number: all reported at
    once, with their fixes, and nothing submitted or created."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = _pinet_train(["-m", "hydra/launcher=slurm", "+hydra.launcher.gpus_per_nod=4",
                         "trainer.devices=auto", "model.optimizer.lr=1e-3,2e-3"], tmp_path,
                        timeout=120)
    assert proc.returncode != 0
    err = proc.stderr
    assert "hydra/launcher=slurm: nothing was submitted" in err
    assert "hydra.launcher.partition is not set" in err and "sinfo" in err
    assert "hydra.launcher.gpus_per_nod is not a setting" in err
    assert "did you mean hydra.launcher.gpus_per_node" in err
    assert "give trainer.devices=<number>" in err
    assert "srun" not in err and "Traceback" not in err  # stopped before submitit
    assert not (tmp_path / "outputs").exists()

    # a field unknown to the plugin's schema, without +: Hydra's own error at composition
    with pytest.raises(Exception, match="Could not override 'hydra.launcher.partitoin'") as err:
        _compose(["hydra/launcher=slurm", "hydra.launcher.partitoin=gpu"])
    assert "Key 'partitoin' not in 'SlurmQueueConf'" in str(err.value.__cause__)


def test_missing_plugin_names_the_install_command(monkeypatch):
    monkeypatch.setattr(cluster, "_installed", lambda module: False)
    (problem,) = cluster.missing_plugins(["-m", "hydra/launcher=slurm", "trainer.devices=2"])
    assert problem.startswith("hydra/launcher=slurm needs the hydra-submitit-launcher plugin")
    assert 'pip install -c constraints.txt ".[cluster]"' in problem
    (problem,) = cluster.missing_plugins(["hydra/sweeper=optuna_search"])
    assert "hydra-optuna-sweeper" in problem
    monkeypatch.setattr(cluster, "_installed", lambda module: True)
    assert cluster.missing_plugins(["hydra/launcher=local"]) == []


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_launcher_settings_follow_the_trainer():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = _compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "trainer=ddp",
                    "trainer.devices=4", "trainer.num_nodes=2"])
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.additional_parameters.requeue is True
    assert launcher_problems(cfg) == []
    # one task per device: a tasks_per_node of its own contradicts the trainer
    problems = launcher_problems(_compose(["hydra/launcher=slurm",
                                           "hydra.launcher.partition=gpu",
                                           "hydra.launcher.tasks_per_node=2"]))
    assert len(problems) == 1 and "tasks_per_node=2 but trainer.devices=1" in problems[0]
    # the local executor: one process a job (DDP inside it comes from trainer=ddp_cpu)
    assert launcher_problems(_compose(["hydra/launcher=local", "trainer=ddp_cpu"])) == []
    problems = launcher_problems(_compose(["hydra/launcher=local",
                                           "hydra.launcher.tasks_per_node=2"]))
    assert len(problems) == 1 and "one process" in problems[0]
    # other launchers are not checked
    assert launcher_problems(_compose([])) == []


def test_optuna_search_space():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweeper = _compose(["hydra/sweeper=optuna_search"]).hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert dict(sweeper.params) == {
        "model.optimizer.lr": "tag(log, interval(2e-4, 1e-2))",
        "model.loss.offset_weight": "tag(log, interval(0.01, 0.3))",
        "model.loss.refine_weight": "tag(log, interval(0.01, 0.3))"}


def test_sweep_objective_is_val_ap_of_the_reported_checkpoint():
    metrics = {"val/AP": 0.25, "best/val/AP": 0.5, "global_step": 40}
    # reported = best val/AP checkpoint: its score
    assert sweep_objective(metrics, "b.ckpt", "b.ckpt", val_step=40) == 0.5
    # reported = last: the last validation, if it ran on the final weights
    assert sweep_objective(metrics, "last.ckpt", "b.ckpt", val_step=40) == 0.25
    assert sweep_objective(metrics, "last.ckpt", "b.ckpt", val_step=32) is None
    assert sweep_objective(metrics, "last.ckpt", None, val_step=None) is None
    assert sweep_objective({**metrics, "val/AP": float("nan")}, "last.ckpt", None, 40) is None


def test_rank_zero_value(monkeypatch):
    for name in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    cfg = OmegaConf.create({"subdir": "${pinet_rank_zero:.hydra,null}"})
    assert cfg.subdir == ".hydra" and rank_zero_value("a", "b") == "a"
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert cfg.subdir is None  # not cached: each process resolves it
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert cfg.subdir == ".hydra"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_under_slurm_environment_starts_no_process(tmp_path):
    """Two tasks of a SLURM job (the environment srun gives them, as in a job of
    hydra/launcher=slurm): Lightning's SLURMEnvironment ranks them, HydraDDPStrategy starts
    no local rank, both agree on the run directory slurm_<job id>."""
    exe = Path(sys.executable).with_name("pinet-train")
    if not exe.exists():
        pytest.skip("pinet-train not installed (pip install -e .)")
    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODEID": "0",
             "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "pinet", "SLURM_NODELIST": "localhost",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SUBMITIT_")) and k != "RANK"}
        env.update(slurm, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                   PINET_ROOT=str(tmp_path), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([str(exe), "trainer=ddp_cpu", "trainer.devices=2", *TINY],
                                      cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=420)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"rank {rank}:\n{out[-5000:]}"
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in out
        assert "starting local rank" not in out  # no process of HydraDDPStrategy
    runs = tmp_path / "outputs" / "synthetic" / "runs"
    assert [p.name for p in runs.iterdir()] == ["slurm_4242"]
    metrics = json.loads((runs / "slurm_4242" / "metrics.json").read_text())
    assert metrics["global_step"] == 2  # 2 batches on each rank
    assert metrics["test/images"] == 2.0  # both ranks' images gathered, each once
