"""Inference speed: end to end vs the network forward alone; PyTorch vs onnxruntime.

End to end = inference_resize of an original image + network on the image and its mirror
(one batch of 2B) + decoding (peaks, coarse poses, one refine call, flip averaging, scores)
+ pose fusion, i.e. ``Predictor.predict``. The reference is the network forward alone on
the same 2B resized images (flip test).

Crowded input: a randomly initialized network has near-zero part heatmaps and would yield
no proposals, so the network is wrapped (``PlantedPeaks``) to raise ``top_k`` (30) isolated
peaks per part in the part heatmaps (mirrored in the mirrored half, so the flip average
keeps them): every image yields exactly P * 30 = 90 valid proposals, which are refined
and fused with the network's own offsets and features.

``--backend onnxruntime`` (or ``both``) also exports the wrapped network with its decoding
(``pinet_lightning.inference.export``) and times ``Predictor`` on the graph (resize, graph, fusion)
on the same images, beside the PyTorch ``Predictor``; the originals are then square by default (the
graph takes S x S inputs). ``--video-frames N`` times ``pinet-predict`` on an N-frame video of those
images for each backend, from a ``model.pt`` and its ``.onnx`` (no drawing): there the part heatmaps
are a constant 0.5 (every cell a peak, the first 30 cells of each part proposed), since a saved
network carries no planted peaks.

    python scripts/bench_infer.py --device cpu --backbone hrnet_w18_small --input-size 256 \
        --iters 3 --warmup 1
    python scripts/bench_infer.py --device cuda --bf16 --channels-last   # GPU bar: <= 1.3x
    python scripts/bench_infer.py --device cpu --threads 2 --backend both \
        --backbone hrnet_w18_small --input-size 128 --iters 20 --video-frames 20
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from torch import Tensor, nn

from pinet_lightning.cli.config import config_dir
from pinet_lightning.cli.predict import predict
from pinet_lightning.codec.codec import PINetCodec
from pinet_lightning.codec.conventions import cells_to_image
from pinet_lightning.inference.decoding import DecodeConfig, decode_outputs, fuse_batch
from pinet_lightning.inference.export import export_network, export_onnx
from pinet_lightning.inference.onnx_model import OnnxPINet
from pinet_lightning.inference.predictor import Predictor
from pinet_lightning.model.checkpoints import save_model
from pinet_lightning.model.network import PINet


class PlantedPeaks(nn.Module):
    """Wraps a PINet and plants ``per_part`` peaks per part into its part heatmaps (outputs
    of ``map_size`` (h, w)); with ``flip``, the second half of a batch is the mirror. The
    planted maps are a buffer and the batch only expands them, so the wrapper exports."""

    def __init__(self, net: PINet, map_size: tuple[int, int], per_part: int = 30,
                 flip: bool = True) -> None:
        super().__init__()
        self.net = net
        self.layout = net.layout
        self.convention, self.output_stride = net.convention, net.output_stride
        self.flip = flip
        h, w = map_size
        p = net.layout.num_parts
        rng = np.random.default_rng(0)
        for spacing in (5, 3):  # 3 cells apart is still isolated for the 3x3 max-pool
            ys, xs = np.mgrid[2:h - 2:spacing, 2:w - 2:spacing]
            cells = np.stack([ys.ravel(), xs.ravel()], 1)
            if len(cells) >= per_part:
                break
        else:
            raise ValueError(f"bench_infer: a {h}x{w} map holds only {len(cells)} planted "
                             f"peaks a part; use a larger --input-size")
        planted = torch.zeros(p, h, w)
        values = torch.linspace(0.3, 0.9, per_part)
        for part in range(p):  # each part its own cells (its own map)
            y, x = cells[rng.permutation(len(cells))[:per_part]].T
            planted[part, y, x] = values
        self.register_buffer("planted", planted)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        out = dict(self.net(images))
        parts = out["part_heatmaps"]
        n = parts.shape[0]
        half = n // 2 if self.flip else n
        planted = self.planted.to(parts.dtype)
        maps = torch.cat([planted.expand(half, -1, -1, -1),
                          planted.flip(-1).expand(n - half, -1, -1, -1)])
        out["part_heatmaps"] = torch.maximum(parts, maps)
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


def _onnx_predictor(wrapped: nn.Module, cfg: DecodeConfig, input_size: int, folder: Path,
                    device: torch.device, batch_size: int) -> tuple[Predictor, float]:
    """The wrapped network and its decoding exported and run by onnxruntime; export time."""
    start = time.perf_counter()
    path = export_network(wrapped, folder / "bench.onnx", input_size, cfg)
    seconds = time.perf_counter() - start
    return Predictor(OnnxPINet(path, device=device), batch_size=batch_size), seconds


def _video_fps(net: PINet, cfg: DecodeConfig, images: list[np.ndarray], frames: int,
               args: argparse.Namespace, backends: list[str], folder: Path) -> dict[str, float]:
    """Steady frames/s of ``pinet-predict`` (no drawing) on a video of ``images``, from a
    model.pt (PyTorch) and its export (onnxruntime): (frames - 1) / (time(frames) -
    time(1 frame)), which leaves out loading the model (after one run that warms up)."""
    h, w = images[0].shape[:2]
    video = folder / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 25, (w, h))
    for i in range(frames):
        writer.write(cv2.cvtColor(images[i % len(images)], cv2.COLOR_RGB2BGR))
    writer.release()
    constant = copy.deepcopy(net)
    with torch.no_grad():  # every cell a peak: top_k proposals per part without planting
        constant.heads.part_heatmap.weight.zero_()
        constant.heads.part_heatmap.bias.fill_(0.5)
    checkpoint = folder / "model.pt"
    codec = PINetCodec.for_network(constant, input_size=args.input_size)
    save_model(checkpoint, constant, extra={"codec": codec.to_dict(), "decode": cfg.to_dict()})
    files = {"pytorch": checkpoint}
    if "onnxruntime" in backends:
        files["onnxruntime"] = export_onnx(checkpoint, folder / "model.onnx")
    fps = {}
    for backend in backends:
        seconds = []
        for count in (1, 1, frames):  # the first run imports and warms up: not counted
            out = folder / f"predict_{backend}_{len(seconds)}"
            with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
                run_cfg = compose("predict", overrides=[
                    f"ckpt_path={files[backend]}", f"input={video}", f"output_dir={out}",
                    f"paths.output_dir={out}", f"device={args.device}", "draw=false",
                    f"threads={args.threads}", f"batch_size={args.batch_size}",
                    f"max_frames={count}", f"decode.flip_test={str(cfg.flip_test).lower()}"])
            start = time.perf_counter()
            predict(run_cfg)
            seconds.append(time.perf_counter() - start)
        fps[backend] = (frames - 1) / (seconds[2] - seconds[1])
    return fps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="hrnet_w32")
    parser.add_argument("--convention", default="cell_center",
                        choices=["cell_center", "published"])
    parser.add_argument("--input-size", type=int, default=512)
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="original image size (default: 3/4 x 1 of the input size x 1.25; "
                             "with onnxruntime 1 x 1: the graph takes square inputs)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per call")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-flip", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (on the shared 2-core machine, 2 threads make the "
                             "many small decode ops wait on each other)")
    parser.add_argument("--backend", default="pytorch", choices=["pytorch", "onnxruntime", "both"],
                        help="onnxruntime / both: also time the exported graph on the same "
                             "images (needs pip install '.[export]')")
    parser.add_argument("--video-frames", type=int, default=0,
                        help="also time pinet-predict on a video of this many frames")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    backends = ["pytorch"] + (["onnxruntime"] if args.backend != "pytorch" else [])

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = PINet("crowdpose", backbone=args.backbone, convention=args.convention)
    net = net.to(device).eval()
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    cfg = DecodeConfig(flip_test=not args.no_flip)

    s = args.input_size
    square = args.backend != "pytorch"
    h, w = args.image_size or ((int(s * 1.25),) * 2 if square else (int(s * 1.5), int(s * 2.0)))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
              for _ in range(args.batch_size)]
    resized = np.stack([net.convention.resize(im, s)[0] for im in images])
    batch = torch.from_numpy(resized).permute(0, 3, 1, 2).contiguous().to(device)
    stride = net.output_stride
    wrapped = PlantedPeaks(net, (batch.shape[-2] // stride, batch.shape[-1] // stride),
                           flip=cfg.flip_test).to(device)
    predictor = Predictor(wrapped, decode_cfg=cfg, input_size=args.input_size, device=device,
                          batch_size=args.batch_size, bf16=args.bf16)
    if args.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    net_batch = torch.cat([batch, net.convention.mirror(batch, stride).to(batch.dtype)]) \
        if cfg.flip_test else batch
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
    print(f"device={device} backbone={args.backbone} convention={args.convention} "
          f"input={tuple(batch.shape[-2:])} original={h}x{w} batch={b} flip={cfg.flip_test} "
          f"bf16={args.bf16} channels_last={args.channels_last} threads={args.threads}")
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
    if args.backend == "pytorch" and not args.video_frames:
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = [("pytorch", t_e2e, len(people[0]))]
        if "onnxruntime" in backends:
            if resized.shape[1:3] != (s, s):
                raise SystemExit(f"bench_infer: the graph takes {s}x{s} inputs, these images "
                                 f"resize to {resized.shape[1:3]}: pass a square --image-size")
            graph, export_s = _onnx_predictor(wrapped, cfg, s, folder, device, b)
            graph_people = graph.predict(images)
            t_graph = _time(lambda: graph.predict(images), device, args.warmup, args.iters)
            rows.append(("onnxruntime", t_graph, len(graph_people[0])))
            print(f"onnxruntime graph exported in {export_s:.0f} s, on "
                  f"{graph.net.providers[0]}")
        print("end to end, the same images:  backend      images/s  ms/image  people/image")
        for name, seconds, found in rows:
            print(f"{'':30}{name:12} {b / seconds:8.2f}  {1000 * seconds / b:8.2f}  {found:8d}")
        if args.video_frames:
            fps = _video_fps(net.cpu() if device.type != "cpu" else net, cfg, images,
                             args.video_frames, args, backends, folder)
            print(f"pinet-predict on a {args.video_frames}-frame {h}x{w} video (no drawing, "
                  "constant part heatmaps: 90 proposals a frame):")
            for name, value in fps.items():
                print(f"{'':30}{name:12} {value:8.2f} frames/s")


if __name__ == "__main__":
    main()
