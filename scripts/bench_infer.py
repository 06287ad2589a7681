"""Inference speed: end to end vs the network forward alone.

End to end = inference_resize of an original image + network on the image and its mirror
(one batch of 2B) + decoding (peaks, coarse poses, one refine call, flip averaging, scores)
+ pose fusion, i.e. ``Predictor.predict``. The reference is the network forward alone on
the same 2B resized images (flip test).

Crowded input: a randomly initialized network has near-zero part heatmaps and would yield
no proposals, so the network is wrapped (``PlantedPeaks``) to raise ``top_k`` (30) isolated
peaks per part in the part heatmaps (mirrored in the mirrored half, so the flip average
keeps them): every image yields exactly P * 30 = 90 valid proposals, which are refined
and fused with the network's own offsets and features.

    python scripts/bench_infer.py --device cpu --backbone hrnet_w18_small --input-size 256 \
        --iters 3 --warmup 1
    python scripts/bench_infer.py --device cuda --bf16 --channels-last   # GPU bar: <= 1.3x
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from pinet_lightning.codec.conventions import cells_to_image
from pinet_lightning.data.augmentation import inference_resize
from pinet_lightning.inference.decoding import DecodeConfig, decode_outputs, fuse_batch
from pinet_lightning.inference.predictor import Predictor
from pinet_lightning.model.network import PINet


class PlantedPeaks(nn.Module):
    """Wraps a PINet and plants ``per_part`` peaks per part into its part heatmaps."""

    def __init__(self, net: PINet, per_part: int = 30, spacing: int = 5) -> None:
        super().__init__()
        self.net = net
        self.layout = net.layout
        self.convention, self.output_stride = net.convention, net.output_stride
        self.per_part = per_part
        self.spacing = spacing
        self._planted: dict[tuple, Tensor] = {}

    def _plant(self, b2: int, p: int, h: int, w: int, device, dtype) -> Tensor:
        key = (b2, p, h, w, device, dtype)
        if key not in self._planted:
            rng = np.random.default_rng(0)
            ys, xs = np.mgrid[2:h - 2:self.spacing, 2:w - 2:self.spacing]
            cells = np.stack([ys.ravel(), xs.ravel()], 1)
            if len(cells) < p * self.per_part:
                raise ValueError(f"bench_infer: a {h}x{w} map holds only {len(cells)} planted "
                                 f"peaks; use a larger --input-size")
            pick = rng.permutation(len(cells))[: p * self.per_part].reshape(p, self.per_part)
            planted = torch.zeros(p, h, w)
            values = torch.linspace(0.3, 0.9, self.per_part)
            for part in range(p):
                y, x = cells[pick[part]].T
                planted[part, y, x] = values
            half = b2 // 2
            maps = torch.cat([planted.expand(half, p, h, w),
                              planted.flip(-1).expand(b2 - half, p, h, w)])
            self._planted[key] = maps.to(device=device, dtype=dtype).contiguous()
        return self._planted[key]

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        out = dict(self.net(images))
        parts = out["part_heatmaps"]
        planted = self._plant(*parts.shape, parts.device, parts.dtype)
        out["part_heatmaps"] = torch.maximum(parts, planted)
        return out

    def refine(self, features, poses, cells, batch_index):
        return self.net.refine(features, poses, cells, batch_index)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="hrnet_w32")
    parser.add_argument("--input-size", type=int, default=512)
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="original image size (default: 3/4 x 1 of the input size x 1.25)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per call")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-flip", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (on the shared 2-core machine, 2 threads make the "
                             "many small decode ops wait on each other)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = PINet("crowdpose", backbone=args.backbone).to(device).eval()
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    wrapped = PlantedPeaks(net).to(device)
    cfg = DecodeConfig(flip_test=not args.no_flip)
    predictor = Predictor(wrapped, decode_cfg=cfg, input_size=args.input_size, device=device,
                          batch_size=args.batch_size, bf16=args.bf16)

    s = args.input_size
    h, w = args.image_size or (int(s * 1.5), int(s * 2.0))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
              for _ in range(args.batch_size)]
    resized = np.stack([inference_resize(im, s)[0] for im in images])
    batch = torch.from_numpy(resized).permute(0, 3, 1, 2).contiguous().to(device)
    if args.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    net_batch = torch.cat([batch, batch.flip(-1)]) if cfg.flip_test else batch
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else (
        contextlib.nullcontext)

    def forward_only() -> None:
        with torch.inference_mode(), amp():
            net(net_batch)

    with torch.inference_mode(), amp():
        outputs = wrapped(net_batch)

    def decode_only() -> None:
        with torch.inference_mode(), amp():
            out = decode_outputs(outputs, net.layout, cfg, refine_fn=wrapped.refine,
                                 convention=net.convention, stride=net.output_stride)
            out["valid"].sum().item()  # the one sync before fusion

    with torch.inference_mode(), amp():  # bf16 features need the refinement under autocast
        decoded = decode_outputs(outputs, net.layout, cfg, refine_fn=wrapped.refine,
                                 convention=net.convention, stride=net.output_stride)
    eye = torch.eye(2, 3, device=device).expand(args.batch_size, 2, 3)
    in_pixels = cells_to_image(decoded["poses"], eye, net.convention, net.output_stride)

    def fusion_only() -> None:
        fuse_batch(in_pixels, decoded["valid"], net.layout.sigmas, cfg)

    def end_to_end() -> None:
        predictor.predict(images)

    proposals = int(decoded["valid"].sum()) // args.batch_size
    people = predictor.predict(images)

    t_fwd = _time(forward_only, device, args.warmup, args.iters)
    t_dec = _time(decode_only, device, args.warmup, args.iters)
    t_fuse = _time(fusion_only, device, args.warmup, args.iters)
    t_e2e = _time(end_to_end, device, args.warmup, args.iters)
    b = args.batch_size
    print(f"device={device} backbone={args.backbone} input={tuple(batch.shape[-2:])} "
          f"original={h}x{w} batch={b} flip={cfg.flip_test} bf16={args.bf16} "
          f"channels_last={args.channels_last} threads={args.threads}")
    print(f"proposals per image: {proposals}; fused people per image: {len(people[0])}")
    print(f"forward alone ({'2' if cfg.flip_test else '1'} x {b} images): "
          f"{1000 * t_fwd / b:8.2f} ms/image")
    print(f"decode + refine (no fusion):        {1000 * t_dec / b:8.2f} ms/image")
    print(f"fusion (incl. the one host copy):   {1000 * t_fuse / b:8.2f} ms/image")
    print(f"end to end (resize..fusion):        {1000 * t_e2e / b:8.2f} ms/image")
    print(f"ratio end to end / forward:         {t_e2e / t_fwd:8.3f}  (GPU bar <= 1.3)")
    if args.json:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        figures = {"device": name, "torch": torch.__version__, "backbone": args.backbone,
                   "input": list(batch.shape[-2:]), "original": [h, w], "batch_size": b,
                   "flip": cfg.flip_test, "bf16": args.bf16, "channels_last": args.channels_last,
                   "proposals_per_image": proposals, "people_per_image": len(people[0]),
                   "forward_ms_per_image": 1000 * t_fwd / b,
                   "decode_refine_ms_per_image": 1000 * t_dec / b,
                   "fusion_ms_per_image": 1000 * t_fuse / b,
                   "end_to_end_ms_per_image": 1000 * t_e2e / b,
                   "ratio_end_to_end_forward": t_e2e / t_fwd}
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
