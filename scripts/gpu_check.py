"""One command for a lent GPU: everything GPU-only the issues ask for, one JSON of figures.

    python scripts/gpu_check.py                    # CUDA: writes gpu_check.json (< 8 minutes)
    python scripts/gpu_check.py --out run.json --budget 420
    python scripts/gpu_check.py --pieces bench_train_fp32 --out fp32.json   # one piece again
    python scripts/gpu_check.py --device cpu --quick   # the same pieces at toy sizes (a test)

The pieces run in this order, each in its own process under its own time limit, all within
``--budget`` seconds (450 by default: under 8 minutes with the start-up); a piece that fails
or runs out of time is recorded as such and the next one runs. The JSON is rewritten after
every piece, so a cut-off run keeps what it measured.

1. ``syncs``: the machine (GPU, torch, CUDA, cuDNN, TF32 flags), then the host-device syncs
   of one eager training step + backward (HRNet-W32, B = 4, 512, bf16-mixed, channels_last)
   and of one ``Predictor`` call (512, bf16, flip test, 90 planted proposals), each counted
   twice: torch's CUDA sync debug mode (its warnings, with the Python line) and
   :class:`pinet_lightning.core.sync_debug.SyncCounter` (the aten ops). Expected: none in the
   step, none in the decoding before pose fusion, one in fusion (its copy to the host).
2. ``bench_train_bf16``: ``scripts/bench_train.py`` (HRNet-W32, B = 20, 512, bf16-mixed,
   channels_last, torch.compile): full step and backbone alone. Bar (H100): full >= 150
   img/s and full / backbone >= 0.90.
3. ``bench_infer``: ``scripts/bench_infer.py --device cuda --bf16 --channels-last``. Bar:
   end to end <= 1.3 x the network forward.
4. ``train_200``: ``pinet-train``, 200 steps on a synthetic crowd at 512 (HRNet-W32, B = 20,
   the GPU defaults: bf16-mixed, channels_last, compile; 8 loader workers, pinned memory),
   validated and tested: wall time, losses, AP.
5. ``bench_train_fp32``: ``bench_train.py --precision 32-true --only full``.

Without CUDA it stops at once with a message (exit status 2).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pinet_lightning.codec.codec import PINetCodec
from pinet_lightning.core.sync_debug import SyncCounter
from pinet_lightning.inference import decoding
from pinet_lightning.inference.predictor import Predictor
from pinet_lightning.training.module import PINetModule

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
from bench_infer import PlantedPeaks  # noqa: E402
from bench_train import build_batch, precision_context  # noqa: E402

DEFAULT_BUDGET_S = 450
MIN_PIECE_S = 20  # a piece with less time left than this is skipped


# ---------------------------------------------------------------- the pieces
def piece_commands(args: argparse.Namespace, work: Path) -> list[tuple[str, list[str], int]]:
    """(name, command, most seconds) of each piece, in running order."""
    py = sys.executable
    me = str(Path(__file__).resolve())
    if args.quick:  # toy sizes on any device: the plumbing, not the figures
        bench_train = [py, str(SCRIPTS / "bench_train.py"), "--device", args.device,
                       "--backbone", "hrnet_w18_small", "--batch-size", "2",
                       "--input-size", "128", "--steps", "1", "--warmup", "1",
                       "--no-compile", "--threads", "1"]
        bench_infer = [py, str(SCRIPTS / "bench_infer.py"), "--device", args.device,
                       "--backbone", "hrnet_w18_small", "--input-size", "256",
                       "--iters", "1", "--warmup", "1", "--bf16", "--channels-last"]
        train = ["codec.input_size=64", "data.synthetic.image_size=64",
                 "data.synthetic.num_train=8", "data.synthetic.num_val=2",
                 "data.synthetic.max_people=3", "data.batch_size=4", "data.num_workers=0",
                 "data.pin_memory=false", "model.network.refine_layers=1",
                 "trainer.max_steps=2", "trainer.check_val_every_n_epoch=1",
                 "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1",
                 f"trainer.accelerator={args.device}", "threads=1"]
        limits = {"syncs": 120, "bench_train_bf16": 120, "bench_infer": 90,
                  "train_200": 180, "bench_train_fp32": 120}
    else:
        bench_train = [py, str(SCRIPTS / "bench_train.py"), "--device", args.device,
                       "--backbone", "hrnet_w32", "--batch-size", "20", "--input-size",
                       "512", "--steps", "20", "--warmup", "5"]
        bench_infer = [py, str(SCRIPTS / "bench_infer.py"), "--device", args.device,
                       "--backbone", "hrnet_w32", "--input-size", "512", "--iters", "20",
                       "--warmup", "3", "--bf16", "--channels-last"]
        # the same network, batch and size as bench_train: its compiled graphs are in
        # inductor's cache by now
        train = ["model.network.backbone=hrnet_w32", "codec.input_size=512",
                 "data.synthetic.image_size=512", "data.synthetic.num_train=400",
                 "data.synthetic.num_val=20", "data.batch_size=20", "data.num_workers=8",
                 "data.pin_memory=true", "data.persistent_workers=true",
                 "trainer.max_steps=200", "trainer.max_epochs=-1",
                 "trainer.log_every_n_steps=10", "threads=null"]
        limits = {"syncs": 90, "bench_train_bf16": 200, "bench_infer": 80,
                  "train_200": 200, "bench_train_fp32": 150}
    run_dir = work / "train_200"
    train = [py, str(SCRIPTS / "train.py"), *train, f"paths.root_dir={work}",
             f"run_dir={run_dir}", "callbacks.prediction_figure.num_images=0"]
    syncs = [py, me, "--piece", "syncs", "--device", args.device,
             "--json", str(work / "syncs.json"), *(["--quick"] if args.quick else [])]
    return [
        ("syncs", syncs, limits["syncs"]),
        ("bench_train_bf16", [*bench_train, "--precision", "bf16-mixed", "--json",
                              str(work / "bench_train_bf16.json")], limits["bench_train_bf16"]),
        ("bench_infer", [*bench_infer, "--json", str(work / "bench_infer.json")],
         limits["bench_infer"]),
        ("train_200", train, limits["train_200"]),
        ("bench_train_fp32", [*bench_train, "--precision", "32-true", "--only", "full",
                              "--json", str(work / "bench_train_fp32.json")],
         limits["bench_train_fp32"]),
    ]


def run_piece(command: list[str], seconds: float, log: Path) -> tuple[str, float]:
    """Run ``command`` (its own process group, output to ``log``) for at most ``seconds``:
    ("ok" | "failed (exit N)" | "timeout", wall seconds)."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        out.write(" ".join(command) + "\n")
        out.flush()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the piece and its workers
            proc.wait()
            return "timeout", time.perf_counter() - start
    wall = time.perf_counter() - start
    return ("ok" if code == 0 else f"failed (exit {code})"), wall


def train_figures(run_dir: Path) -> dict[str, Any]:
    """The 200-step run's figures: its metrics.json and the first / last logged losses."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    keep = {k: v for k, v in metrics.items()
            if k.startswith(("train/", "val/", "test/")) or k in ("global_step", "epoch",
                                                                  "wall_time_s")}
    losses = []
    for path in sorted(run_dir.glob("csv/*/metrics.csv")):
        with path.open() as f:
            losses += [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(f)
                       if r.get("train/loss")]
    if losses:
        keep["logged_loss_first"] = {"step": losses[0][0], "loss": losses[0][1]}
        keep["logged_loss_last"] = {"step": losses[-1][0], "loss": losses[-1][1]}
    return keep


def check(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    work = Path(args.workdir).resolve() if args.workdir else out.with_name(out.stem + "_work")
    work.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(args.pieces or ()) - {n for n, _, _ in piece_commands(args, work)})
    if unknown:
        raise SystemExit(f"gpu_check: unknown --pieces {unknown}; the pieces: "
                         f"{[n for n, _, _ in piece_commands(args, work)]}")
    report: dict[str, Any] = {"command": " ".join(sys.argv), "device": args.device,
                              "quick": args.quick, "budget_s": args.budget, "pieces": {}}
    started = time.perf_counter()
    for name, command, most in piece_commands(args, work):
        if args.pieces and name not in args.pieces:
            continue
        left = args.budget - (time.perf_counter() - started)
        entry: dict[str, Any] = {"command": " ".join(command)}
        if left < MIN_PIECE_S:
            entry["status"] = f"skipped (budget: {left:.0f} s left)"
        else:
            log = work / f"{name}.log"
            status, wall = run_piece(command, min(most, left), log)
            entry.update(status=status, seconds=round(wall, 1), log=str(log))
            try:
                if name == "train_200":
                    entry["figures"] = train_figures(work / "train_200")
                else:
                    entry["figures"] = json.loads((work / f"{name}.json").read_text())
            except (OSError, ValueError, KeyError) as err:
                if status == "ok":
                    entry["status"] = f"failed (no figures: {err})"
            if entry["status"] != "ok":
                entry["log_tail"] = log.read_text(errors="replace")[-3000:]
        report["pieces"][name] = entry
        report["total_s"] = round(time.perf_counter() - started, 1)
        out.write_text(json.dumps(report, indent=2))
        print(f"gpu_check: {name}: {entry['status']}"
              + (f" in {entry['seconds']} s" if "seconds" in entry else ""), flush=True)
    failed = [n for n, e in report["pieces"].items() if e["status"] != "ok"]
    print(f"gpu_check: {len(report['pieces']) - len(failed)} of {len(report['pieces'])} "
          f"pieces ok in {report['total_s']} s; figures in {out}"
          + (f"; not ok: {', '.join(failed)} (see their log_tail)" if failed else ""))
    return 1 if failed else 0


# ------------------------------------------------------- the sync piece itself
def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(),
                    bf16_supported=torch.cuda.is_bf16_supported(),
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    float32_matmul_precision=torch.get_float32_matmul_precision())
    return info


class Syncs:
    """SyncCounter and (on CUDA) torch's sync debug mode around a block; records where a
    call to ``decoding.fuse_batch`` began and ended, to split the events around fusion."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.counter = SyncCounter(cpu_is_device=device.type == "cpu")
        self.cuda: list[warnings.WarningMessage] = []
        self.marks: dict[str, tuple[int, int]] = {}
        self._catch = warnings.catch_warnings(record=True)

    def mark(self, name: str) -> None:
        self.marks[name] = (len(self.counter.events), len(self.cuda))

    def __enter__(self) -> Syncs:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        self.counter.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.counter.__exit__(*exc)
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
            self._catch.__exit__(*exc)
            torch.cuda.synchronize(self.device)
        self.cuda = [w for w in self.cuda if "synchroniz" in str(w.message).lower()]

    def split(self, start: str | None = None, end: str | None = None) -> dict[str, Any]:
        """Events between two marks (None: the start / the end of the block)."""
        e0, c0 = self.marks[start] if start else (0, 0)
        e1, c1 = self.marks[end] if end else (len(self.counter.events), len(self.cuda))
        events = self.counter.summary()[e0:e1]
        cuda = [f"{Path(w.filename).name}:{w.lineno}: {str(w.message).splitlines()[0]}"
                for w in self.cuda[c0:c1]]
        return {"sync_counter": len(events), "sync_counter_events": events,
                "cuda_sync_debug": len(cuda) if self.device.type == "cuda" else None,
                "cuda_sync_debug_events": cuda}


def sync_piece(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", message=".*reference is not registered on the model.*")
    size, batch_size = (128, 2) if args.quick else (512, 4)
    backbone = "hrnet_w18_small" if args.quick else "hrnet_w32"
    result: dict[str, Any] = {"machine": machine(), "backbone": backbone,
                              "train_input": size, "train_batch": batch_size}

    # one eager training step + backward, as Lightning runs it under bf16-mixed
    torch.manual_seed(0)
    module = PINetModule(codec=PINetCodec("crowdpose", input_size=size),
                         network={"backbone": backbone},
                         channels_last=True, compile=False, finite_check_every=100)
    module.to(device).train()
    module.configure_model()
    batch = build_batch("crowdpose", batch_size, size, device)
    context = precision_context("bf16-mixed", device)

    def step() -> None:
        with context():
            loss = module.training_step(batch, 0)
        loss.backward()

    step()  # warm-up: lazy initialisation (cuDNN, cuBLAS handles) syncs once
    with Syncs(device) as syncs:
        step()
    result["training_step"] = syncs.split()

    # one Predictor call, split around pose fusion
    infer_size = 256 if args.quick else 512
    images = [np.random.default_rng(0).integers(0, 256, (int(infer_size * 1.5),
                                                         infer_size * 2, 3), dtype=np.uint8)]
    resized, _ = PINetCodec.from_any(module.codec, input_size=infer_size).resize(images[0])
    stride = module.net.output_stride
    net = PlantedPeaks(module.net.eval(), (resized.shape[0] // stride,
                                           resized.shape[1] // stride)).to(device)
    predictor = Predictor(net, codec=module.codec, input_size=infer_size, device=device,
                          bf16=True)
    predictor.predict(images)  # warm-up
    original = decoding.fuse_batch
    with Syncs(device) as syncs:
        def fusion(*a: Any, **k: Any) -> Any:
            syncs.mark("fusion_start")
            out = original(*a, **k)
            syncs.mark("fusion_end")
            return out

        decoding.fuse_batch = fusion
        try:
            people = predictor.predict(images)
        finally:
            decoding.fuse_batch = original
    result["predictor"] = {"input": infer_size, "people": len(people[0]),
                           "before_fusion": syncs.split(None, "fusion_start"),
                           "fusion": syncs.split("fusion_start", "fusion_end"),
                           "after_fusion": syncs.split("fusion_end", None)}
    counts = {"training_step": result["training_step"],
              "before_fusion": result["predictor"]["before_fusion"]}
    result["no_sync_in_hot_path"] = all(
        c["sync_counter"] == 0 and not c["cuda_sync_debug"] for c in counts.values())
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda",
                        help="cuda (the check) or cpu (with --quick: try the pieces)")
    parser.add_argument("--quick", action="store_true",
                        help="toy sizes (HRNet-W18-small, 64-256 px, 1-2 steps): the "
                             "plumbing, not the figures")
    parser.add_argument("--out", default="gpu_check.json", help="the JSON of figures")
    parser.add_argument("--workdir", default=None,
                        help="logs, per-piece JSON and the training run (default: "
                             "<out>_work beside --out)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds for all pieces together")
    parser.add_argument("--pieces", default=None, type=lambda s: s.split(","),
                        help="run only these pieces, comma-separated (e.g. a piece the "
                             "budget skipped: --pieces bench_train_fp32)")
    parser.add_argument("--piece", choices=["syncs"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False, torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda}). This check measures the "
              "GPU configuration: run it on a machine with an NVIDIA GPU, or try its pieces "
              "on the CPU with: python scripts/gpu_check.py --device cpu --quick",
              file=sys.stderr)
        return 2
    if args.piece == "syncs":
        sync_piece(args)
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
