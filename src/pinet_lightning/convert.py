"""The published PINet's weights (kennethwdk/PINet, HRNet-W32) as a ``model.pt``.

The authors' files are plain state dicts written by their training script (or its trainer's
dict holding one under ``state_dict``, keys prefixed ``module.`` under DDP). Every tensor has a
counterpart here:

- ``backbone.*`` -> ``backbone.body.*`` (timm's ``hrnet_w32`` names the same layers alike);
- ``ppg.{heatmap,detkptmap,offset}_head`` -> ``heads.{heatmap,part_heatmap,offset}``;
- ``pr.adj`` -> ``pose_refinement.adjacency``; the graph convolutions ``pr.gconv_head`` and
  ``pr.gconv_layers.<i>.gconv<j>`` -> ``pose_refinement.input_block`` and
  ``pose_refinement.blocks.<i>.block<j>`` (their weights are stored (in, out): transposed);
- the readout ``pr.gconv_pred.{0,1,3}`` (1-D convolutions, a trailing size-1 dimension) ->
  ``pose_refinement.{readout,readout_norm,output}``.

The converted network records the published cell/pixel convention
(:mod:`pinet_lightning.conventions`) and the input size 512 it was trained at, so its default
decoding is the published inference.

    pinet-convert crowdpose_w32.pth crowdpose_w32.pt            # layout read off the file
    pinet-convert ochuman.pth ochuman.pt --layout ochuman
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from pinet_lightning.checkpoints import UntrustedCheckpointError

__all__ = ["convert_published", "published_network", "is_published_state", "published_state",
           "map_published_key", "main"]

PUBLISHED_INPUT_SIZE = 512
PUBLISHED_BACKBONE = "hrnet_w32"

_Rule = tuple[re.Pattern[str], str, Callable[[Tensor], Tensor]]


def _same(t: Tensor) -> Tensor:
    return t


def _transposed(t: Tensor) -> Tensor:  # graph conv weight (in, out) -> Linear (out, in)
    return t.t().contiguous()


def _squeezed(t: Tensor) -> Tensor:  # Conv1d weight (out, in, 1) -> Linear (out, in)
    return t.squeeze(-1).contiguous()


def _graph_block(src: str, dst: str) -> list[_Rule]:
    return [
        (re.compile(rf"^{src}\.conv\.weight$"), f"{dst}.linear.weight", _transposed),
        (re.compile(rf"^{src}\.conv\.bias$"), f"{dst}.bias", _same),
        (re.compile(rf"^{src}\.bn\.(?P<attr>\w+)$"), rf"{dst}.norm.\g<attr>", _same),
    ]


_RULES: list[_Rule] = [
    (re.compile(r"^backbone\.(.+)$"), r"backbone.body.\1", _same),
    (re.compile(r"^ppg\.heatmap_head\.(\w+)$"), r"heads.heatmap.\1", _same),
    (re.compile(r"^ppg\.detkptmap_head\.(\w+)$"), r"heads.part_heatmap.\1", _same),
    (re.compile(r"^ppg\.offset_head\.(\w+)$"), r"heads.offset.\1", _same),
    (re.compile(r"^pr\.adj$"), "pose_refinement.adjacency", _same),
    *_graph_block(r"pr\.gconv_head", "pose_refinement.input_block"),
    *_graph_block(r"pr\.gconv_layers\.(\d+)\.gconv1", r"pose_refinement.blocks.\1.block1"),
    *_graph_block(r"pr\.gconv_layers\.(\d+)\.gconv2", r"pose_refinement.blocks.\1.block2"),
    (re.compile(r"^pr\.gconv_pred\.0\.weight$"), "pose_refinement.readout.weight", _squeezed),
    (re.compile(r"^pr\.gconv_pred\.0\.bias$"), "pose_refinement.readout.bias", _same),
    (re.compile(r"^pr\.gconv_pred\.1\.(\w+)$"), r"pose_refinement.readout_norm.\1", _same),
    (re.compile(r"^pr\.gconv_pred\.3\.weight$"), "pose_refinement.output.weight", _squeezed),
    (re.compile(r"^pr\.gconv_pred\.3\.bias$"), "pose_refinement.output.bias", _same),
]


def map_published_key(key: str) -> tuple[str, Callable[[Tensor], Tensor]] | None:
    """Our name for a published tensor and how to reshape it, or None when it has none."""
    for pattern, target, reshape in _RULES:
        match = pattern.match(key)
        if match:
            # Two rules may both fit a backbone key only if the table were ambiguous: it is not
            # (the first match wins, and each published prefix has one rule).
            return match.expand(target), reshape
    return None


def published_state(blob: Any) -> dict[str, Tensor] | None:
    """The published state dict inside a loaded file (unwrapping ``state_dict`` and
    ``module.``), or None when the file is not one."""
    if not isinstance(blob, Mapping):
        return None
    state = blob.get("state_dict", blob) if "hyper_parameters" not in blob else None
    if not isinstance(state, Mapping):
        return None
    state = {str(k).removeprefix("module."): v for k, v in state.items()}
    if "ppg.heatmap_head.weight" not in state or "ppg.offset_head.weight" not in state:
        return None
    return state


def is_published_state(blob: Any) -> bool:
    """Whether a loaded file holds the published PINet's weights."""
    return published_state(blob) is not None


def _layout_of(state: Mapping[str, Tensor], layout: str | None, source: str) -> tuple[str, int]:
    """(layout name, refinement layers) of a published state dict."""
    k = int(state["ppg.heatmap_head.weight"].shape[0])
    layers = len({key.split(".")[2] for key in state if key.startswith("pr.gconv_layers.")})
    if layout is None:  # the published recipes: CrowdPose 14 keypoints; COCO 2 layers, OCHuman 3
        if k == 14:
            layout = "crowdpose"
        elif k == 17:
            layout = "coco" if layers == 2 else "ochuman"
        else:
            raise ValueError(f"{source}: {k} keypoints is none of the published layouts "
                             "(CrowdPose 14, COCO/OCHuman 17); pass layout=")
    from pinet_lightning.layouts import get_layout

    if get_layout(layout).num_keypoints != k:
        raise ValueError(f"{source}: the file has {k} keypoints but layout '{layout}' has "
                         f"{get_layout(layout).num_keypoints}; pick the layout it was trained "
                         "on (crowdpose: 14, coco / ochuman: 17)")
    return layout, layers


def published_network(blob: Any, layout: str | None = None, source: str | Path = "<memory>"):
    """A :class:`~pinet_lightning.network.PINet` holding the published weights of ``blob`` (a
    loaded file), with the published convention. Every tensor must map, with its shape.

    Raises:
        ValueError: naming the file and the unmapped, missing or mismatched keys.
    """
    from pinet_lightning.network import PINet

    source = str(source)
    state = published_state(blob)
    if state is None:
        raise ValueError(f"{source}: not the published PINet's weights (no ppg.heatmap_head / "
                         "ppg.offset_head tensors)")
    name, layers = _layout_of(state, layout, source)
    channels = int(state["ppg.offset_head.weight"].shape[1])
    if channels != 480:
        raise ValueError(f"{source}: heads read {channels} feature channels; the published "
                         "PINet is HRNet-W32 (480)")
    net = PINet(name, backbone=PUBLISHED_BACKBONE, refine_layers=max(layers, 1),
                convention="published")
    ours = net.state_dict()
    mapped: dict[str, Tensor] = {}
    unmapped, mismatched = [], []
    for key, value in state.items():
        rule = map_published_key(key)
        if rule is None or rule[0] not in ours:
            unmapped.append(key)
            continue
        target, reshape = rule
        tensor = reshape(value)
        if tensor.shape != ours[target].shape:
            mismatched.append(f"{key} {tuple(value.shape)} -> {target} "
                              f"{tuple(ours[target].shape)}")
            continue
        mapped[target] = tensor
    missing = sorted(set(ours) - set(mapped) - {k for k in ours if k.endswith("_tracked")})
    problems = []
    if unmapped:
        problems.append(f"{len(unmapped)} tensors without a counterpart (e.g. {unmapped[:5]})")
    if mismatched:
        problems.append(f"{len(mismatched)} of another shape (e.g. {mismatched[:3]})")
    if missing:
        problems.append(f"{len(missing)} of ours missing from it (e.g. {missing[:5]})")
    if problems:
        raise ValueError(f"{source}: cannot convert the published weights for layout '{name}' "
                         f"with {layers} refinement layers: " + "; ".join(problems))
    for key in ours:  # BN counters some files lack: keep ours (0)
        mapped.setdefault(key, ours[key])
    net.load_state_dict(mapped, strict=True)
    return net


def convert_published(src: str | Path, dst: str | Path, layout: str | None = "crowdpose",
                      trust_checkpoint: bool = False) -> Path:
    """Convert the published PINet's weights file ``src`` into a ``model.pt`` at ``dst``
    that :meth:`Predictor.from_checkpoint <pinet_lightning.predictor.Predictor.from_checkpoint>`,
    ``pinet-eval`` and ``pinet-predict`` load; returns ``dst``.

    Args:
        layout: ``crowdpose``, ``coco`` or ``ochuman`` (None: read off the file: 14 keypoints
            CrowdPose, 17 with 2 refinement layers COCO, with 3 OCHuman).
        trust_checkpoint: allow a file that needs the full unpickler (it can run code).
    """
    from pinet_lightning.checkpoints import load_file
    from pinet_lightning.decoding import DecodeConfig
    from pinet_lightning.network import save_model

    src, dst = Path(src), Path(dst)
    net = published_network(load_file(src, trust_checkpoint), layout, src)
    save_model(dst, net, extra={"input_size": PUBLISHED_INPUT_SIZE,
                                "decode": DecodeConfig().to_dict(),
                                "converted_from": str(src), "source": "kennethwdk/PINet"})
    return dst


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``pinet-convert SRC DST [--layout ...]``."""
    parser = argparse.ArgumentParser(
        prog="pinet-convert",
        description="Convert the published PINet weights (kennethwdk/PINet) into a model.pt "
                    "that Predictor.from_checkpoint, pinet-eval and pinet-predict load.")
    parser.add_argument("src", help="the published weights file (.pth / .pth.tar)")
    parser.add_argument("dst", help="the model.pt to write")
    parser.add_argument("--layout", choices=["crowdpose", "coco", "ochuman"], default=None,
                        help="keypoint layout (default: read off the file)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow a file that needs Python's full unpickler (can run code)")
    args = parser.parse_args(argv)
    try:
        dst = convert_published(args.src, args.dst, args.layout, args.trust_checkpoint)
    except UntrustedCheckpointError as err:  # this command's way to trust a file is its flag
        parser.exit(2, f"pinet-convert: {err.path} holds Python objects, and loading them can "
                       "run code. It was refused. Only if you trust where it comes from, run "
                       f"again with --trust-checkpoint: pinet-convert {shlex.quote(args.src)} "
                       f"{shlex.quote(args.dst)} --trust-checkpoint\n")
    except (OSError, ValueError) as err:
        parser.exit(2, f"pinet-convert: {err}\n")
    from pinet_lightning.network import load_model

    net = load_model(dst)
    print(f"pinet-convert: {args.src} -> {dst}: layout {net.layout.name}, "
          f"{net.refine_layers} refinement layers, {len(net.state_dict())} tensors, "
          f"convention {net.convention.name}, input size {PUBLISHED_INPUT_SIZE}")


if __name__ == "__main__":
    main()
