"""scripts/gpu_check.py, the one command for a lent GPU (issue 23): its commands are valid
(the GPU ones included: a typo would only show on the GPU, in its scarce minutes), it stops
with a message without CUDA, and its pieces run end to end on the CPU at toy sizes."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from pinet_lightning.cli.config import config_dir

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.py"
PIECES = ["syncs", "bench_train_bf16", "bench_infer", "train_200", "bench_train_fp32"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "scripts"
                                                  / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("quick", [False, True], ids=["gpu", "quick"])
def test_every_piece_command_parses(tmp_path, quick):
    """Each bench command parses with its script's own parser, the training command's
    overrides compose with the Hydra config, and the GPU pieces ask for what the issues
    name: HRNet-W32, B = 20, 512, both precisions, 200 steps."""
    gpu_check, bench_train, bench_infer = (_load(n) for n in
                                           ("gpu_check", "bench_train", "bench_infer"))
    args = Namespace(device="cpu" if quick else "cuda", quick=quick)
    commands = {name: (command, most) for name, command, most in
                gpu_check.piece_commands(args, tmp_path)}
    assert list(commands) == PIECES
    assert sum(most for _, most in commands.values()) < 15 * 60
    parsed = {}
    for name in ("bench_train_bf16", "bench_train_fp32"):
        command = commands[name][0]
        assert command[1].endswith("bench_train.py")
        parsed[name] = bench_train.parse_args(command[2:])
    infer_command = commands["bench_infer"][0]
    infer = bench_infer.parse_args(infer_command[2:])
    assert parsed["bench_train_bf16"].precision == "bf16-mixed"
    assert parsed["bench_train_fp32"].precision == "32-true"
    assert parsed["bench_train_fp32"].only == "full"
    assert infer.bf16 and infer.channels_last and infer.device == args.device
    train_command = commands["train_200"][0]
    assert train_command[1].endswith("train.py")
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=train_command[2:])
    if not quick:
        for bench in parsed.values():
            assert (bench.backbone, bench.batch_size, bench.input_size) == ("hrnet_w32", 20,
                                                                            512)
            assert bench.compile == "auto" and bench.device == "cuda"
        assert infer.backbone == "hrnet_w32" and infer.input_size == 512
        assert cfg.trainer.max_steps == 200 and cfg.data.batch_size == 20
        assert cfg.model.network.backbone == "hrnet_w32" and cfg.codec.input_size == 512
        assert cfg.model.compile == "auto" and cfg.model.channels_last == "auto"
        assert cfg.trainer.accelerator == "auto"
        syncs = commands["syncs"][0]
        assert "--quick" not in syncs and syncs[syncs.index("--device") + 1] == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_stops_with_a_message(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--device cpu --quick" in proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_quick_run_on_the_cpu_writes_every_figure(tmp_path):
    """Every piece runs (toy sizes, one process each) and lands in the one JSON."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick",
                           "--out", str(out), "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text())
    pieces = report["pieces"]
    assert proc.returncode == 0, (proc.stdout[-2000:], {n: p.get("log_tail")
                                                        for n, p in pieces.items()})
    assert list(pieces) == PIECES and all(p["status"] == "ok" for p in pieces.values())

    syncs = pieces["syncs"]["figures"]
    assert syncs["no_sync_in_hot_path"] is True
    assert syncs["training_step"]["sync_counter"] == 0
    predictor = syncs["predictor"]
    assert predictor["before_fusion"]["sync_counter"] == 0 and predictor["people"] > 0
    # fusion's one copy to the host: .cpu().numpy(), two reads on the CPU
    assert predictor["fusion"]["sync_counter"] >= 1
    assert all("fuse_batch" in e["where"] for e in predictor["fusion"]["sync_counter_events"])

    for name, precision in (("bench_train_bf16", "bf16-mixed"), ("bench_train_fp32",
                                                                  "32-true")):
        figures = pieces[name]["figures"]
        assert figures["precision"] == precision
        assert figures["full_step"]["images_per_s"] > 0
        assert figures["full_step"]["proposals"][0] > 0
    assert pieces["bench_train_bf16"]["figures"]["ratio_full_backbone"] > 0
    assert "backbone_alone" not in pieces["bench_train_fp32"]["figures"]  # --only full
    infer = pieces["bench_infer"]["figures"]
    assert infer["bf16"] and infer["proposals_per_image"] == 90
    assert infer["ratio_end_to_end_forward"] > 1
    train = pieces["train_200"]["figures"]
    assert train["global_step"] == 2 and "test/AP" in train
    assert math.isfinite(train["logged_loss_last"]["loss"])
