"""PINet and its decoding as one ONNX graph (``pinet-export``, :func:`export_onnx`).

The graph is :func:`pinet_lightning.inference.decoding.decode_images` traced: uint8 images
(B, 3, S, S) (B dynamic) -> the network on the images and their mirror -> peaks, coarse poses,
refinement, flip merge and scores -> fixed-size outputs, N = P * top_k proposals an image:

- ``candidates`` (B, N, K, 3) float32: x, y in network-input pixels, keypoint score;
- ``scores`` (B, N) float32: pose scores (the part heatmap at the peak);
- ``valid`` (B, N) bool: the peak scored above ``score_threshold``.

What stays outside, shared with the PyTorch path: the resize of each image to the network input and
its back transform, and pose fusion (greedy, data-dependent):
:func:`pinet_lightning.inference.decoding.fuse_candidates`.
:class:`pinet_lightning.inference.onnx_model.OnnxPINet` runs a graph with onnxruntime;
``Predictor.from_checkpoint("model.onnx")`` uses it.

The file's metadata (``metadata_props``) records what a runtime needs: the codec (layout,
cell/pixel convention, output stride, the graph's input size S) and the decoding settings (those the
graph computes are fixed in it; pose fusion's are defaults). Export uses the dynamo exporter
(``torch.onnx.export(dynamo=True)``): decoding has static shapes and no host syncs, so
top-k, gathers and the refinement's bilinear sampling trace as they are.

onnx and onnxscript (the exporter's) are optional dependencies: ``pip install ".[export]"``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pinet_lightning.codec.codec import PINetCodec
from pinet_lightning.core.layouts import get_layout
from pinet_lightning.inference.decoding import DecodeConfig, decode_images
from pinet_lightning.model.checkpoints import load_network

__all__ = ["ExportError", "DecodeGraph", "export_network", "export_onnx", "GRAPH_FIELDS",
           "FUSION_FIELDS", "FORMAT", "FORMAT_VERSION", "INPUT_NAME", "OUTPUT_NAMES",
           "INSTALL_EXPORT"]

log = logging.getLogger(__name__)

FORMAT = "pinet_lightning.onnx"
FORMAT_VERSION = 1
INPUT_NAME = "images"
OUTPUT_NAMES = ("candidates", "scores", "valid")
# DecodeConfig fields the graph computes (fixed at export) and those of pose fusion (outside).
GRAPH_FIELDS = ("flip_test", "top_k", "score_threshold", "scales", "refine", "nms_large_size",
                "nms_medium_size", "nms_kernels", "scale_multiple")
FUSION_FIELDS = ("oks_threshold", "max_people")

# how to install the optional extra (onnx, onnxscript, onnxruntime), for the error messages
INSTALL_EXPORT = 'pip install -c constraints.txt ".[export]"'


class ExportError(ValueError):
    """A network or setting that cannot go into the graph; the message names the option."""


class DecodeGraph(nn.Module):
    """The exported computation: :func:`decode_images` of ``net`` with ``cfg``.

    ``forward(images (B, 3, S, S) uint8) -> (candidates, scores, valid)``.
    """

    def __init__(self, net: nn.Module, cfg: DecodeConfig) -> None:
        super().__init__()
        self.net = net
        self.layout = get_layout(net.layout)
        self.cfg = cfg

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return decode_images(self.net, images, self.layout, self.cfg)


def check_exportable(cfg: DecodeConfig, input_size: int) -> None:
    """An :class:`ExportError` naming the option for what one graph cannot hold."""
    if tuple(cfg.scales) != (1.0,):
        raise ExportError(
            f"the multi-scale test (decode scales={list(cfg.scales)}) cannot be exported: the "
            "graph takes one input size. Export with scales=[1.0] (pinet-export: "
            "--scales 1.0) and run the multi-scale test with the PyTorch Predictor")
    multiple = cfg.scale_multiple
    if input_size < multiple or input_size % multiple:
        raise ExportError(
            f"input size {input_size} must be a positive multiple of {multiple} (decode "
            "scale_multiple: the side the predictor's resize gives every input); pass "
            f"--input-size {max(multiple, -(-input_size // multiple) * multiple)}")


def _onnx() -> Any:
    """The onnx module, or an ImportError saying how to install the export extra."""
    try:
        import onnx  # optional dependency
    except ImportError as err:
        raise ImportError(f"exporting to ONNX needs onnx and onnxscript ({err}); install "
                          f"them with: {INSTALL_EXPORT}") from err
    if importlib.util.find_spec("onnxscript") is None:  # torch.onnx's exporter needs it
        raise ImportError(f"exporting to ONNX needs onnxscript; install it with: {INSTALL_EXPORT}")
    return onnx


def export_network(net: nn.Module, output: str | Path, input_size: int,
                   decode_cfg: DecodeConfig | Mapping[str, Any] | None = None,
                   metadata: Mapping[str, Any] | None = None,
                   opset_version: int | None = None, check: bool = True,
                   codec: PINetCodec | Mapping[str, Any] | None = None) -> Path:
    """Export ``net`` (a PINet, or any module with its ``layout``, ``convention``,
    ``output_stride``, ``__call__`` and ``refine``) with ``decode_cfg``'s decoding to
    ``output`` (one .onnx file, weights inside).

    Args:
        input_size: S of the (B, 3, S, S) input, a multiple of ``decode_cfg.scale_multiple``.
        metadata: extra ``metadata_props`` entries (JSON-encoded unless strings).
        opset_version: ONNX opset (None: the exporter's default).
        check: run ``onnx.checker`` (full check, shape inference included) on the file.
        codec: the frame the network was trained in (None: the network's layout and
            convention); recorded with ``input_size`` as its input size.

    Raises:
        ExportError: multi-scale test, an input size off the multiple.
    """
    onnx = _onnx()
    cfg = DecodeConfig.from_any(decode_cfg)
    input_size = int(input_size)
    check_exportable(cfg, input_size)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    graph = DecodeGraph(net, cfg).eval()
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    # An example batch of 2 (the exporter specializes sizes 0 and 1); the batch is dynamic.
    example = torch.zeros(2, 3, input_size, input_size, dtype=torch.uint8, device=device)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.onnx.export(graph, (example,), dynamo=True, verbose=False,
                                    input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                                    dynamic_shapes={"images": {0: batch}},
                                    opset_version=opset_version)
    codec = PINetCodec.from_any(codec if codec is not None else PINetCodec.for_network(net),
                                input_size=input_size)
    props = {
        "pinet_lightning.format": FORMAT,
        "pinet_lightning.format_version": str(FORMAT_VERSION),
        "codec": json.dumps(codec.to_dict()),  # the frame: what a runtime reads back
        "layout": graph.layout.name,  # for people reading the file
        "convention": codec.convention,
        "input_size": str(input_size),
        "decode": json.dumps(cfg.to_dict()),
        "outputs": "candidates (B, N, K, 3): x, y in network-input pixels, keypoint score; "
                   "scores (B, N): pose scores; valid (B, N) bool; N = P * top_k",
    }
    for key, value in (metadata or {}).items():
        props[str(key)] = value if isinstance(value, str) else json.dumps(value, default=str)
    program.model.metadata_props.update(props)
    program.save(str(output), external_data=False)
    if check:
        onnx.checker.check_model(str(output), full_check=True)
    return output


def export_onnx(checkpoint: str | Path, output: str | Path, input_size: int | None = None,
                flip_test: bool | None = None, trust_checkpoint: bool = False,
                opset_version: int | None = None, **decode_overrides: Any) -> Path:
    """Export any network file ``Predictor.from_checkpoint`` loads (``model.pt``, a Lightning
    ``.ckpt``, the published weights, converted or not) with its decoding to one ONNX graph.

    Args:
        checkpoint: the network file.
        output: the .onnx file to write.
        input_size: S of the graph's (B, 3, S, S) input; None: the size the file records
            (the training input size; 512 for the published weights), else 512.
        flip_test: None: the file's decoding setting (default True).
        trust_checkpoint: allow a file that needs Python's full unpickler (it can run code).
        decode_overrides: other ``DecodeConfig`` fields (``top_k``, ``score_threshold``, ...).

    Returns:
        ``output``. Its metadata records the layout, convention, input size and decoding, so
        ``Predictor.from_checkpoint(output)`` needs nothing restated.
    """
    loaded = load_network(checkpoint, trust_checkpoint=trust_checkpoint)
    known = set(DecodeConfig.__dataclass_fields__)
    decode = {k: v for k, v in loaded.decode.items() if k in known}
    if flip_test is not None:
        decode_overrides["flip_test"] = bool(flip_test)
    cfg = DecodeConfig.from_any(decode, **decode_overrides)
    size = int(input_size if input_size is not None else loaded.codec.input_size)
    net = loaded.net.cpu().eval()
    network = getattr(net, "config", {})
    source = {"checkpoint": Path(checkpoint).name, "kind": loaded.kind,
              "network": {k: v for k, v in network.items() if k != "layout"}}
    log.info("exporting %s (%s, convention %s) at %dx%d, flip test %s", checkpoint,
             network.get("backbone", "?"), net.convention.name, size, size, cfg.flip_test)
    return export_network(net, output, size, cfg, metadata={"source": source},
                          opset_version=opset_version, codec=loaded.codec)
