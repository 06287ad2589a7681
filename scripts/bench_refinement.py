"""Pose Refinement (PR) speed in training: forward + backward of ``PoseRefinement`` on the
B * P * 40 training proposals of a batch, optionally against another ``refinement.py``.

Times, in train mode with a validity mask (as the training step calls it):
1. the adjacency product of one graph block alone, proposal-major ``matmul(A, X)`` with X
   (N, K, C) (a batched product of N small matrices) vs node-major ``mm(A, X.view(K, N*C))``;
2. the whole PR forward + backward (feature sampling, graph blocks, readout).

The node-major layout was chosen on these timings: with the proposal-major product, PR's
forward + backward was about 2x slower on CPU (commit bbceb32; README, Benchmarks, for the
current figures).

With ``--reference FILE`` (e.g. an older ``refinement.py``) the same weights are loaded into
both versions, which are timed alternately; the script prints both timings and the largest
differences of outputs, batch norm statistics and gradients. Gradient differences of ~1e-4
(relative) at C = 480 are float32 rounding amplified by the batch norm backward: each version
differs about as much from a float64 run of itself.

    git show HEAD:src/pinet_lightning/model/refinement.py > /tmp/refinement_old.py
    python scripts/bench_refinement.py --reference /tmp/refinement_old.py --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from pinet_lightning.core.layouts import get_layout
from pinet_lightning.model.refinement import PoseRefinement


def _load_reference(path: Path) -> type:
    spec = importlib.util.spec_from_file_location("reference_refinement", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"bench_refinement: cannot import '{path}'")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PoseRefinement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn`` over ``iters`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def _inputs(args: argparse.Namespace, k: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    b, c, h = args.batch_size, args.channels, args.input_size // 4
    n = b * args.parts * args.per_part
    features = torch.randn(b, c, h, h, generator=g)
    if args.channels_last:
        features = features.contiguous(memory_format=torch.channels_last)
    cells = torch.randint(0, h, (n, 2), generator=g)
    poses = (cells[:, None, :] + 6 * torch.randn(n, k, 2, generator=g)).clamp(-2, h + 1)
    batch_index = torch.arange(b).repeat_interleave(args.parts * args.per_part)
    valid = torch.rand(n, generator=g) < 0.9
    return [t.to(device) for t in (features, poses, cells, batch_index, valid)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layout", default="crowdpose")
    parser.add_argument("--layers", type=int, default=3, help="residual blocks L")
    parser.add_argument("--batch-size", type=int, default=4, help="images (B)")
    parser.add_argument("--parts", type=int, default=3)
    parser.add_argument("--per-part", type=int, default=40, help="proposals per image and part")
    parser.add_argument("--channels", type=int, default=480, help="feature channels C")
    parser.add_argument("--input-size", type=int, default=256, help="maps are input / 4")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--reference", type=Path, default=None,
                        help="another refinement.py to time and compare against")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    k = get_layout(args.layout).num_keypoints
    features, poses, cells, batch_index, valid = _inputs(args, k, device)
    n = poses.shape[0]
    print(f"device={device} threads={torch.get_num_threads()} N={n} proposals K={k} "
          f"C={args.channels} maps={tuple(features.shape)} L={args.layers} "
          f"channels_last={args.channels_last}")

    # 1. The adjacency product alone (forward + backward).
    adj = torch.rand(k, k, device=device, requires_grad=True)
    x_nkc = torch.randn(n, k, args.channels, device=device, requires_grad=True)
    x_knc = x_nkc.detach().transpose(0, 1).contiguous().requires_grad_()

    def batched() -> None:
        torch.matmul(adj, x_nkc).sum().backward()

    def single() -> None:
        torch.mm(adj, x_knc.view(k, -1)).sum().backward()

    same = torch.equal(torch.matmul(adj, x_nkc).transpose(0, 1),
                       torch.mm(adj, x_knc.view(k, -1)).view(k, n, -1))
    t_batched = _time(batched, device, args.warmup, args.iters)
    t_single = _time(single, device, args.warmup, args.iters)
    print(f"adjacency product fwd+bwd: matmul(A, X[N,K,C]) {t_batched:8.2f} ms | "
          f"mm(A, X[K,N*C]) {t_single:8.2f} ms | x{t_batched / t_single:.2f} "
          f"| identical values: {same}")

    # 2. The whole PR, forward + backward, train mode with a validity mask.
    def build(cls: type) -> torch.nn.Module:
        torch.manual_seed(0)
        return cls(args.channels, args.layout, num_layers=args.layers).to(device).train()

    versions = {"current": build(PoseRefinement)}
    if args.reference is not None:
        versions["reference"] = build(_load_reference(args.reference))
        versions["reference"].load_state_dict(versions["current"].state_dict())
    feats = features.detach().requires_grad_()

    def step(pr: torch.nn.Module) -> Tensor:
        out = pr(feats, poses, cells, batch_index, valid)
        out.square().sum().backward()
        return out

    results = {}
    for name, pr in versions.items():
        feats.grad = None
        pr.zero_grad(set_to_none=True)
        out = step(pr)
        results[name] = (out.detach(), feats.grad.clone(),
                         {p: q.grad.clone() for p, q in pr.named_parameters()},
                         {p: q.clone() for p, q in pr.named_buffers()})
    timings = {name: [] for name in versions}
    for _ in range(3):  # alternate, so machine load hits both versions alike
        for name, pr in versions.items():
            timings[name].append(_time(lambda pr=pr: step(pr), device, args.warmup,
                                       args.iters))
    for name in versions:
        print(f"PR fwd+bwd {name:9s}: {min(timings[name]):8.2f} ms "
              f"(best of 3 medians: {', '.join(f'{t:.2f}' for t in timings[name])})")
    if "reference" in versions:
        ref, cur = results["reference"], results["current"]
        print(f"speed-up: x{min(timings['reference']) / min(timings['current']):.2f}")

        def rel(a: Tensor, b: Tensor) -> float:
            """||a - b|| / ||b||: float32 rounding is ~1e-6."""
            return ((a.double() - b.double()).norm() / b.double().norm()).item()

        # Biases in front of a batch norm have an exactly-zero gradient: skip those.
        largest = max(g.norm() for g in cur[2].values())
        params = [p for p in cur[2] if cur[2][p].norm() > 1e-6 * largest]
        print(f"relative difference ||ref - cur|| / ||cur||: output {rel(ref[0], cur[0]):.2g}, "
              f"feature grad {rel(ref[1], cur[1]):.2g}, parameter grads (worst) "
              f"{max(rel(ref[2][p], cur[2][p]) for p in params):.2g}, running statistics "
              f"(worst) {max(rel(ref[3][p], cur[3][p]) for p in cur[3]):.2g}; "
              f"outputs bitwise identical: {torch.equal(ref[0], cur[0])}")

if __name__ == "__main__":
    main()
