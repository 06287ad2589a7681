"""Training speed: images/s of full PINet training steps vs the backbone alone (issue 3).

Full step = exactly what ``PINetModule`` runs under the Trainer: ``module.training_step``
(uint8 images -> network forward -> heatmap + offset losses, training proposal sampling,
Pose Refinement of the B * P * 40 proposals and the refine loss) inside Lightning's own
precision context, then ``zero_grad``, backward and the module's Adam step (Lightning's
order). The module's ``configure_model`` applies channels-last and ``torch.compile``, as in
training. Backbone alone = the same images through the same normalization and backbone
with the same precision, memory format and compile setting, a trivial loss (mean square of
the features), backward and Adam over the backbone's parameters. The ratio full / backbone
is the share of the backbone's throughput that the full step keeps.

The batch is built once and stays on the device: ``generate_synthetic_crowd`` draws B
crowded scenes (2-8 overlapping people), ``CocoKeypointDataset`` augments them and encodes
the targets exactly as a training loader worker does (sparse, as ``codec.sparse``'s
default, so the step includes rendering the heatmap targets on the device and reading Omega;
``--dense`` for the dense maps), and ``train_collate`` concatenates them.
The device is synchronized before and after each timed window (no sync inside it).

    # GPU (defaults: hrnet_w32, B = 20, 512, bf16-mixed, channels-last, compile);
    # bar on an H100: full >= 150 img/s and full / backbone >= 0.90
    python scripts/bench_train.py
    python scripts/bench_train.py --check-syncs      # also list host-device syncs of a step
    python scripts/bench_train.py --precision 32-true --json train_fp32.json  # figures as JSON
    # CPU (the --quick preset is hrnet_w18_small, B = 4, 256, 5 steps after 2 warm-up steps)
    python scripts/bench_train.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.precision import MixedPrecision, Precision
from torch import Tensor, nn

from pinet_lightning.codec.batch import train_collate
from pinet_lightning.codec.codec import PINetCodec
from pinet_lightning.data.datasets import CocoKeypointDataset
from pinet_lightning.data.synthetic import generate_synthetic_crowd
from pinet_lightning.training.module import PINetModule, resolve_switch

QUICK = {"backbone": "hrnet_w18_small", "batch_size": 4, "input_size": 256, "steps": 5,
         "warmup": 2}
DEFAULTS = {"backbone": "hrnet_w32", "batch_size": 20, "input_size": 512, "steps": 20,
            "warmup": 5}
BAR_IMAGES_PER_S = 150.0
BAR_RATIO = 0.90


def build_batch(layout: str, batch_size: int, input_size: int, device: torch.device,
                seed: int = 0, max_people: int = 8, sparse: bool = True) -> dict[str, Any]:
    """One training batch from the real data path (synthetic scenes, train augmentation,
    target encoding, collate), moved to ``device`` once."""
    with tempfile.TemporaryDirectory() as tmp:
        annotations = generate_synthetic_crowd(tmp, num_images=batch_size,
                                               image_size=input_size, min_people=2,
                                               max_people=max_people, layout=layout, seed=seed)
        codec = PINetCodec(layout, input_size=input_size, sparse=sparse)
        dataset = CocoKeypointDataset(Path(tmp) / "images", annotations, codec=codec, train=True)
        torch.manual_seed(seed)  # the augmentation reseeds from torch's seed
        # An image whose people all fall outside would be skipped: cycle to B samples.
        samples = [dataset[i % len(dataset)] for i in range(batch_size)]
    batch = train_collate(samples)
    return {key: value.to(device) if isinstance(value, Tensor) else value
            for key, value in batch.items()}


def precision_context(precision: str, device: torch.device
                      ) -> Callable[[], contextlib.AbstractContextManager]:
    """Lightning's own training-step context for ``precision`` (autocast for bf16-mixed)."""

    plugin = (MixedPrecision("bf16-mixed", device.type) if precision == "bf16-mixed"
              else Precision())
    return plugin.train_step_context


class BackboneOnly(nn.Module):
    """The PINet input normalization and backbone, nothing else."""

    def __init__(self, module: PINetModule) -> None:
        super().__init__()
        self.net = module.net

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) 0..255 -> backbone features (B, C, H/4, W/4)."""
        return self.net.backbone(self.net.normalize(images))


def build_module(args: argparse.Namespace, device: torch.device, compile_: bool | str
                 ) -> PINetModule:
    """A PINetModule on ``device`` with its speed switches applied by ``configure_model``."""
    torch.manual_seed(args.seed)
    module = PINetModule(codec=PINetCodec(args.layout, input_size=args.input_size),
                         network={"backbone": args.backbone, "refine_layers": args.refine_layers},
                         channels_last=args.channels_last, compile=compile_)
    module.to(device).train()
    module.configure_model()
    return module


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int
               ) -> float:
    """Seconds per step over ``steps`` steps after ``warmup`` steps (compilation happens
    there); the device is synchronized only around the timed window."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


@contextlib.contextmanager
def peak_memory(device: torch.device, out: dict[str, float]) -> Iterator[None]:
    """Store the peak CUDA memory of the block in ``out["peak_gib"]``."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30


def backbone_step_fn(args: argparse.Namespace, device: torch.device,
                     batch: Mapping[str, Tensor], context) -> tuple[Callable[[], None], dict]:
    """Step closure of the backbone-alone baseline (same switches as the full step)."""
    module = build_module(args, device, compile_=False)  # compiled below, backbone only
    model: nn.Module = BackboneOnly(module)
    compiled = resolve_switch(args.compile, device, "compile")
    if compiled:
        model = torch.compile(model)
    optimizer = torch.optim.Adam(module.net.backbone.parameters(), lr=1e-3)
    images = batch["image"]

    def step() -> None:
        with context():
            features = model(module._prepare(images))
            loss = features.float().square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step, {"channels_last": module._channels_last, "compile": compiled}


def full_step_fn(args: argparse.Namespace, device: torch.device,
                 batch: Mapping[str, Tensor], context) -> tuple[Callable[[], None], dict]:
    """Step closure of the full PINet training step, as the Trainer runs it."""
    module = build_module(args, device, compile_=args.compile)
    if args.compile_refine:
        # Experimental, not a PINetModule switch: compile PR in place (state dict unchanged).
        module.net.pose_refinement.compile()
    optimizer = module.configure_optimizers()["optimizer"]

    def step() -> None:
        with context():
            loss = module.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    compiled = f"{module._compiled}{' + PR' if args.compile_refine else ''}"
    return step, {"channels_last": module._channels_last, "compile": compiled, "module": module}


def check_syncs(step: Callable[[], None], device: torch.device) -> list[str]:
    """Messages of torch's CUDA sync debug mode for one step (CUDA only)."""
    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    _sync(device)
    return [str(w.message).splitlines()[0] for w in caught
            if "synchroniz" in str(w.message).lower()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--quick", action="store_true",
                        help=f"small CPU preset {QUICK} (explicit flags still win)")
    parser.add_argument("--backbone", default=None,
                        help=f"timm name (default {DEFAULTS['backbone']}; "
                             f"{QUICK['backbone']} with --quick)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"images per step B (default {DEFAULTS['batch_size']})")
    parser.add_argument("--input-size", type=int, default=None,
                        help=f"square input S (default {DEFAULTS['input_size']})")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"timed steps (default {DEFAULTS['steps']})")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed steps first, incl. compilation (default "
                             f"{DEFAULTS['warmup']})")
    parser.add_argument("--precision", choices=["auto", "bf16-mixed", "32-true", "32"],
                        default="auto",
                        help="auto: bf16-mixed on CUDA, 32-true on CPU (Lightning's contexts)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                        default=None, help="default: PINetModule's auto (on for CUDA)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="default: PINetModule's auto (on for CUDA)")
    parser.add_argument("--compile-refine", action="store_true",
                        help="experimental: also torch.compile Pose Refinement (not a "
                             "PINetModule switch)")
    parser.add_argument("--layout", default="crowdpose")
    parser.add_argument("--refine-layers", type=int, default=None,
                        help="L (default 3 for crowdpose, 2 otherwise)")
    parser.add_argument("--only", choices=["both", "full", "backbone"], default="both")
    parser.add_argument("--check-syncs", action="store_true",
                        help="CUDA: list the host-device syncs of one full step")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark (the Trainer default is off)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dense", action="store_true",
                        help="dense target maps in the batch (codec.sparse=false)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.refine_layers is None:
        args.refine_layers = 3 if args.layout == "crowdpose" else 2
    if args.channels_last is None:
        args.channels_last = "auto"
    if args.compile is None:
        args.compile = "auto"
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    precision = args.precision
    if precision == "auto":
        precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    context = precision_context(precision, device)
    # training_step logs through self.log, which has no Trainer here: a no-op, not an error.
    warnings.filterwarnings("ignore", message=".*reference is not registered on the model.*")

    b, s = args.batch_size, args.input_size
    batch = build_batch(args.layout, b, s, device, seed=args.seed, sparse=not args.dense)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={device} ({name}) torch={torch.__version__} threads="
          f"{torch.get_num_threads()} backbone={args.backbone} layout={args.layout} "
          f"L={args.refine_layers} batch={b} input={s} precision={precision}")

    results: dict[str, dict] = {}
    makers = {"backbone": backbone_step_fn, "full": full_step_fn}
    for what in ("backbone", "full"):
        if args.only not in ("both", what):
            continue
        stats: dict = {}
        with peak_memory(device, stats):
            step, info = makers[what](args, device, batch, context)
            seconds = time_steps(step, device, args.warmup, args.steps)
        module = info.pop("module", None)
        stats.update(info, seconds=seconds, images_per_s=b / seconds)
        if module is not None:
            with torch.no_grad():
                outputs = module(batch["image"])
                props = module.criterion.training_proposals(outputs, batch)["proposals"]
            stats["proposals"] = (int(props.valid.sum()), len(props))
            if args.check_syncs and device.type == "cuda":
                stats["syncs"] = check_syncs(step, device)
        del module, step  # free the device memory before the next measurement
        results[what] = stats

    for what, label in (("backbone", "backbone alone "), ("full", "full PINet step")):
        if what not in results:
            continue
        r = results[what]
        memory = f", peak {r['peak_gib']:.1f} GiB" if "peak_gib" in r else ""
        print(f"{label}: {1000 * r['seconds']:9.1f} ms/step {r['images_per_s']:8.2f} img/s "
              f"(channels_last={r['channels_last']}, compile={r['compile']}{memory})")
    if "full" in results:
        valid, total = results["full"]["proposals"]
        print(f"training proposals: {valid} valid of {total} refined "
              f"({valid / b:.1f} per image)")
        if "syncs" in results["full"]:
            syncs = results["full"]["syncs"]
            print(f"host-device syncs in one full step: {len(syncs)}")
            for message in syncs:
                print(f"  {message}")
    figures: dict[str, Any] = {
        "device": name, "torch": torch.__version__, "backbone": args.backbone,
        "layout": args.layout, "refine_layers": args.refine_layers, "batch_size": b,
        "input_size": s, "precision": precision, "steps": args.steps, "warmup": args.warmup,
        **{f"{what}_step" if what == "full" else "backbone_alone":
           {k: (str(v) if k == "compile" else v) for k, v in r.items()}
           for what, r in results.items()}}
    if len(results) == 2:
        ratio = results["full"]["images_per_s"] / results["backbone"]["images_per_s"]
        figures["ratio_full_backbone"] = ratio
        print(f"ratio full / backbone: {ratio:.3f}")
        if device.type == "cuda":
            ok = results["full"]["images_per_s"] >= BAR_IMAGES_PER_S and ratio >= BAR_RATIO
            figures["bar_met"] = ok
            print(f"bar (H100, B=20 at 512): full >= {BAR_IMAGES_PER_S:.0f} img/s and ratio >= "
                  f"{BAR_RATIO:.2f}: {'met' if ok else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
