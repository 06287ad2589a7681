"""What limits the synthetic main job (issue 13): step-time profile, per-keypoint errors of a
run's predictions, and a table of runs.

Subcommands::

    # where a CPU training step goes (data, backbone + heads, losses, Pose Refinement),
    # for the experiment config plus Hydra overrides; several values: comma lists
    python scripts/mainjob_curve.py profile --batch 8 --size 128 --proposals 10 --steps 10
    python scripts/mainjob_curve.py profile --batch 4,8,16 --proposals 5,10,40

    # per-keypoint errors of a run's test predictions: predictions matched to the ground
    # truth one to one by OKS (greedy, best score first, OKS >= 0.5), then per joint the
    # mean signed dx, dy (pixels, prediction - truth), the mean radial error (along the
    # direction from the person's keypoint centroid to the true keypoint: < 0 = pulled toward
    # the body), the mean distance and the share of keypoints within the OKS-0.75 radius
    python scripts/mainjob_curve.py errors outputs/synthetic/runs/<time>

    # val AP against training minutes (the runs' progress lines), and the final test AP
    python scripts/mainjob_curve.py curve /tmp/mj/run1 /tmp/mj/run2

    # one row per run directory: overrides, steps, wall time, load, val/test AP
    python scripts/mainjob_curve.py table /tmp/mj/run1 /tmp/mj/run2

The experiments of issue 13 and their commands are in docs/usage.md ("The main job: what
limits it").
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import pinet_lightning.cli  # noqa: F401  (before torch: OMP_WAIT_POLICY as the commands set it)

# isort: split
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pinet_lightning.cli.config import config_dir
from pinet_lightning.codec.batch import heatmap_targets, train_collate
from pinet_lightning.core.layouts import get_layout


# ------------------------------------------------------------------ profile
def _compose(overrides: Sequence[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("train", overrides=["paths.output_dir=/tmp/mainjob_profile",
                                           *overrides])


def _time(fn: Callable[[], object], warmup: int, steps: int) -> float:
    """Median seconds of ``fn`` over ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def profile_one(overrides: Sequence[str], warmup: int, steps: int) -> dict[str, float]:
    """Median seconds of each part of one training step for a composed config.

    Parts (each timed alone, in this order of a step): ``data`` = B samples loaded,
    augmented and encoded plus the collate (the loader's work in the main process);
    ``step`` = the module's training_step + backward + Adam; ``no_refine`` = the same step
    without the refine term (forward, heatmap and offset losses, backward, Adam); so
    ``refine`` = step - no_refine is the Pose Refinement's share (proposal sampling, PR
    forward and backward, its loss); ``forward`` = the network forward alone (no grad)."""

    cfg = _compose(overrides)
    dm = instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    dataset = dm.train_dataset
    batch_size = int(cfg.data.batch_size)
    torch.manual_seed(0)
    module = instantiate(cfg.model, _convert_="all")
    module.train()
    module.finite_check_every = 10**9  # no Trainer here: the loss check needs one
    optimizer = module.configure_optimizers()["optimizer"]
    cursor = {"i": 0}

    def load() -> dict:
        start = cursor["i"]
        cursor["i"] += batch_size
        return train_collate([dataset[(start + j) % len(dataset)] for j in range(batch_size)])

    batch = load()

    def step() -> None:
        loss = module.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def no_refine() -> None:
        outputs = module.net(batch["image"])
        crit = module.criterion
        heat = crit.heatmap_loss(outputs["heatmaps"], outputs["part_heatmaps"],
                                 heatmap_targets(batch))
        omega = crit._omega(outputs, batch)  # None: a dense batch (codec.sparse=false)
        off = (crit.offset_loss(outputs["offsets"], omega) if omega is not None else
               crit.offset_loss(outputs["offsets"], batch["offsets"], batch["offset_weights"]))
        loss = crit.heatmap_weight * heat + crit.offset_weight * off
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def forward() -> None:
        with torch.no_grad():
            module.net(batch["image"])

    warnings.filterwarnings("ignore", message=".*reference is not registered.*")
    warnings.filterwarnings("ignore", message=".*self.log.*")
    result = {"data": _time(load, 1, steps), "step": _time(step, warmup, steps),
              "no_refine": _time(no_refine, warmup, steps),
              "forward": _time(forward, warmup, steps)}
    result["refine"] = result["step"] - result["no_refine"]
    result["batch"] = batch_size
    return result


def cmd_profile(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = list(itertools.product(args.batch.split(","), args.size.split(","),
                                  args.proposals.split(","), args.refine_layers.split(",")))
    print(f"torch threads {torch.get_num_threads()}; load {os.getloadavg()[0]:.2f} "
          f"(1-min average) at the start")
    print("| batch | input | proposals/part | L | data ms | step ms | no-refine ms | "
          "refine ms (share) | forward ms | img/s (data + step) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for b, s, p, layers in grid:
        overrides = [f"data.batch_size={b}", f"codec.input_size={s}",
                     f"model.loss.proposals_per_part={p}",
                     f"model.network.refine_layers={layers}",
                     f"paths.data_dir={args.data_dir}", *args.override]
        r = profile_one(overrides, args.warmup, args.steps)
        total = r["data"] + r["step"]
        print(f"| {b} | {s} | {p} | {layers} | {1e3 * r['data']:.0f} | {1e3 * r['step']:.0f} | "
              f"{1e3 * r['no_refine']:.0f} | {1e3 * r['refine']:.0f} "
              f"({r['refine'] / r['step']:.0%}) | {1e3 * r['forward']:.0f} | "
              f"{r['batch'] / total:.1f} |", flush=True)
    print(f"load {os.getloadavg()[0]:.2f} at the end")


# ------------------------------------------------------------------ errors
def _oks(pred: np.ndarray, gt: np.ndarray, area: float, sigmas: np.ndarray) -> float:
    """COCO OKS of one prediction (K, 2) against one ground truth (K, 3)."""
    labelled = gt[:, 2] > 0
    if not labelled.any():
        return 0.0
    d2 = ((pred - gt[:, :2]) ** 2).sum(-1)
    e = d2 / ((2 * sigmas) ** 2 * 2 * (area + np.spacing(1)))
    return float(np.exp(-e[labelled]).mean())


def match_predictions(results: list[dict], annotations: dict, sigmas: np.ndarray,
                      min_oks: float = 0.5) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Greedy one-to-one matching per image, best score first (as COCO evaluation does):
    each prediction takes the unmatched ground truth of highest OKS >= ``min_oks``.
    Returns (pred (K, 3), gt (K, 3), area) pairs."""
    by_image: dict[int, list[dict]] = {}
    for r in results:
        by_image.setdefault(int(r["image_id"]), []).append(r)
    gts: dict[int, list[dict]] = {}
    for a in annotations["annotations"]:
        if not a.get("iscrowd", 0) and a.get("num_keypoints", 1) > 0:
            gts.setdefault(int(a["image_id"]), []).append(a)
    k = len(sigmas)
    pairs = []
    for image_id, anns in gts.items():
        preds = sorted(by_image.get(image_id, []), key=lambda r: -r["score"])
        taken = np.zeros(len(anns), bool)
        gt_kp = [np.asarray(a["keypoints"], float).reshape(k, 3) for a in anns]
        for p in preds:
            kp = np.asarray(p["keypoints"], float).reshape(k, 3)
            oks = np.array([_oks(kp[:, :2], g, a["area"], sigmas) if not t else -1.0
                            for g, a, t in zip(gt_kp, anns, taken, strict=True)])
            if len(oks) == 0 or oks.max() < min_oks:
                continue
            j = int(oks.argmax())
            taken[j] = True
            pairs.append((kp, gt_kp[j], float(anns[j]["area"])))
            if taken.all():
                break
    return pairs


def keypoint_errors(pairs: list[tuple[np.ndarray, np.ndarray, float]], sigmas: np.ndarray
                    ) -> dict[str, np.ndarray]:
    """Per joint over matched pairs (labelled keypoints only): count, mean dx, dy, radial,
    mean distance (pixels) and the share within the OKS-0.75 radius of its person."""
    pred = np.stack([p for p, _, _ in pairs])  # (M, K, 3)
    gt = np.stack([g for _, g, _ in pairs])
    area = np.array([a for _, _, a in pairs])
    labelled = gt[..., 2] > 0
    d = pred[..., :2] - gt[..., :2]  # (M, K, 2)
    centre = ((gt[..., :2] * labelled[..., None]).sum(1)
              / np.maximum(labelled.sum(1), 1)[:, None])  # (M, 2)
    out_dir = gt[..., :2] - centre[:, None]
    norm = np.linalg.norm(out_dir, axis=-1, keepdims=True)
    unit = np.where(norm > 1e-6, out_dir / np.maximum(norm, 1e-6), 0.0)
    radial = (d * unit).sum(-1)
    dist = np.linalg.norm(d, axis=-1)
    # OKS term exp(-d^2 / (2 s^2 (2 sigma)^2)) >= 0.75  <=>  d <= r75
    r75 = np.sqrt(2 * np.log(1 / 0.75) * area[:, None]) * 2 * sigmas[None]
    w = labelled.astype(float)
    n = w.sum(0)

    def mean(x: np.ndarray) -> np.ndarray:
        return (x * w).sum(0) / np.maximum(n, 1)

    return {"count": n, "dx": mean(d[..., 0]), "dy": mean(d[..., 1]), "radial": mean(radial),
            "distance": mean(dist), "within75": mean((dist <= r75).astype(float)),
            "r75": mean(r75)}


def _test_annotations(cfg: dict) -> Path:
    """The ground truth a run was tested on: its data.test file, else its synthetic held-out
    split (runs from before that split, whose config has no num_test, tested on val)."""
    data = cfg["data"]
    if data.get("test"):
        return Path(data["test"]["annotations"])
    synthetic = data["synthetic"]
    split = "test" if "num_test" in synthetic else "val"
    return Path(synthetic["root"]) / split / "annotations.json"


def cmd_errors(args: argparse.Namespace) -> None:
    run = Path(args.run_dir)
    cfg = _read_config(run)
    layout = get_layout(cfg.get("layout", "crowdpose"))
    sigmas = np.asarray(layout.sigmas, float)
    results_file = Path(args.results) if args.results else _last_results(run, "test")
    gt_file = Path(args.annotations) if args.annotations else _test_annotations(cfg)
    results = json.loads(results_file.read_text())
    annotations = json.loads(gt_file.read_text())
    pairs = match_predictions(results, annotations, sigmas, args.min_oks)
    gt_people = sum(1 for a in annotations["annotations"] if a.get("num_keypoints", 1) > 0)
    print(f"{results_file}: {len(pairs)} of {gt_people} people matched at OKS >= "
          f"{args.min_oks}")
    if not pairs:
        return
    e = keypoint_errors(pairs, sigmas)
    print("| joint | n | dx px | dy px | radial px | distance px | OKS-0.75 radius px | "
          "within it |")
    print("|---|---|---|---|---|---|---|---|")
    for j, name in enumerate(layout.names):
        print(f"| {name} | {int(e['count'][j])} | {e['dx'][j]:+.2f} | {e['dy'][j]:+.2f} | "
              f"{e['radial'][j]:+.2f} | {e['distance'][j]:.2f} | {e['r75'][j]:.2f} | "
              f"{e['within75'][j]:.0%} |")
    w = e["count"] / e["count"].sum()
    print(f"| all | {int(e['count'].sum())} | {(e['dx'] * w).sum():+.2f} | "
          f"{(e['dy'] * w).sum():+.2f} | {(e['radial'] * w).sum():+.2f} | "
          f"{(e['distance'] * w).sum():.2f} | {(e['r75'] * w).sum():.2f} | "
          f"{(e['within75'] * w).sum():.0%} |")


def _read_config(run: Path) -> dict:
    path = run / "config.yaml"
    if not path.is_file():
        raise SystemExit(f"mainjob_curve: {path} not found: give a pinet-train run directory")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def _last_results(run: Path, stage: str) -> Path:
    files = sorted(run.glob(f"csv/version_*/results/{stage}_epoch*.json"),
                   key=lambda p: p.stat().st_mtime)
    files = [f for f in files if not f.name.endswith("_metrics.json")]
    if not files:
        raise SystemExit(f"mainjob_curve: no {stage} results json under {run}/csv")
    return files[-1]


# ------------------------------------------------------------------ run
def cmd_run(args: argparse.Namespace) -> None:
    """``pinet-train run_dir=<root>/<name> <overrides>``, its output in ``<root>/<name>.log``,
    the wall time and the load averages before and after in ``<root>/<name>/load.txt``."""

    run = Path(args.root) / args.name
    if (run / "metrics.json").exists():
        raise SystemExit(f"mainjob_curve: {run} already holds a finished run")
    command = [sys.executable, "-m", "pinet_lightning.cli.train", f"run_dir={run}",
               *args.override]
    env = dict(os.environ)
    if args.code:  # a frozen copy of the package (src/pinet_lightning with conf/ inside)
        env["PYTHONPATH"] = str(Path(args.code).resolve())
    before = os.getloadavg()
    start = time.time()
    with open(Path(args.root) / f"{args.name}.log", "w") as log:
        log.write(f"PYTHONPATH={env.get('PYTHONPATH', '')} " + " ".join(command) + "\n")
        log.flush()
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.time() - start
    after = os.getloadavg()
    # CPU seconds of the run (user + system, all its threads): with threads=1 about the wall
    # time it would take on an idle core, whatever the load was
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime
    run.mkdir(parents=True, exist_ok=True)
    (run / "load.txt").write_text(f"{before[0]:.1f}/{after[0]:.1f} (15-min {after[2]:.1f}), "
                                  f"wall {wall:.0f} s, cpu {cpu:.0f} s\n")
    print(f"{args.name}: exit {code}, {wall:.0f} s, cpu {cpu:.0f} s, load 1-min "
          f"{before[0]:.1f} -> {after[0]:.1f}, 15-min {after[2]:.1f}")


# ------------------------------------------------------------------ curve
_LINE = re.compile(r"epoch (\d+)\S* step (\d+) .*?val/AP ([\d.]+)"
                   r".* elapsed (?:(\d+)h)?(\d+)m(\d+)s")


def progress_points(run: Path) -> list[tuple[int, int, float, float]]:
    """(epoch, step, elapsed minutes, val AP) from the progress lines in the run's log."""
    points = []
    for log in sorted(run.glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if "pinet_lightning.progress" not in line or "val/AP" not in line:
                continue
            m = _LINE.search(line)
            if m:
                hours = int(m.group(4) or 0)
                minutes = 60 * hours + int(m.group(5)) + int(m.group(6)) / 60
                points.append((int(m.group(1)), int(m.group(2)), minutes, float(m.group(3))))
    return points


def cmd_curve(args: argparse.Namespace) -> None:
    """val AP against training time for each run (its progress lines), then the test AP."""
    print("| run | epoch | step | training min | val AP |")
    print("|---|---|---|---|---|")
    for run in map(Path, args.runs):
        for epoch, step, minutes, ap in progress_points(run):
            print(f"| {run.name} | {epoch} | {step} | {minutes:.1f} | {ap:.3f} |")
        metrics = run / "metrics.json"
        if metrics.is_file():
            m = json.loads(metrics.read_text())
            print(f"| {run.name} | test | {m.get('global_step')} | "
                  f"{m.get('wall_time_s', float('nan')) / 60:.1f} (whole run) | "
                  f"{m.get('test/AP', float('nan')):.3f} |")


# ------------------------------------------------------------------ table
def cmd_table(args: argparse.Namespace) -> None:
    rows = []
    for run in map(Path, args.runs):
        metrics_file = run / "metrics.json"
        if run.suffix == ".log":
            continue
        if not metrics_file.is_file():
            print(f"skipped {run}: no metrics.json")
            continue
        m = json.loads(metrics_file.read_text())
        overrides = (run / ".hydra" / "overrides.yaml")
        given = " ".join(
            o for o in (overrides.read_text().replace("\n- ", "\n").strip("- \n").split("\n")
                        if overrides.is_file() else [])
            if o.split("=")[0] not in ("run_dir", "paths.data_dir"))
        load = (run / "load.txt").read_text().strip() if (run / "load.txt").is_file() else ""
        rows.append([run.name, given, str(m.get("global_step", "")),
                     f"{m.get('wall_time_s', float('nan')):.0f}", load,
                     f"{m.get('test/AP', float('nan')):.3f}",
                     f"{m.get('test/AP50', float('nan')):.3f}",
                     f"{m.get('test/AP75', float('nan')):.3f}"])
    header = ["run", "overrides", "steps", "wall s", "load", "test AP", "AP50", "AP75"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("profile", help="time the parts of a CPU training step")
    p.add_argument("--batch", default="8")
    p.add_argument("--size", default="128")
    p.add_argument("--proposals", default="10")
    p.add_argument("--refine-layers", default="3")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data-dir", default="data")
    p.add_argument("override", nargs="*", help="more Hydra overrides")
    p.set_defaults(func=cmd_profile)
    e = sub.add_parser("errors", help="per-keypoint errors of a run's test predictions")
    e.add_argument("run_dir")
    e.add_argument("--results", default=None, help="COCO results json (default: the run's "
                                                   "last test results)")
    e.add_argument("--annotations", default=None, help="ground truth (default: the run's "
                                                       "test annotations)")
    e.add_argument("--min-oks", type=float, default=0.5)
    e.set_defaults(func=cmd_errors)
    r = sub.add_parser("run", help="one pinet-train run with its load recorded")
    r.add_argument("name")
    r.add_argument("override", nargs="*", help="Hydra overrides")
    r.add_argument("--root", default="/tmp/mainjob")
    r.add_argument("--code", default=None, help="run this copy of the package instead "
                   "(a folder holding pinet_lightning/ with conf/ inside it)")
    r.set_defaults(func=cmd_run)
    c = sub.add_parser("curve", help="val AP against training time, from the progress lines")
    c.add_argument("runs", nargs="+")
    c.set_defaults(func=cmd_curve)
    t = sub.add_parser("table", help="one row per run directory")
    t.add_argument("runs", nargs="+")
    t.set_defaults(func=cmd_table)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
