"""A PINet graph exported by :mod:`pinet_lightning.inference.export`, run with onnxruntime.

:class:`OnnxPINet` reads the file's metadata (layout, convention, input size, decoding), runs the
graph and hands its fixed-size candidates to the same pose fusion as the PyTorch path
(:func:`pinet_lightning.inference.decoding.fuse_candidates`).
``Predictor.from_checkpoint("model.onnx")`` builds one, so the Predictor's API and outputs are the
same for both backends.

The graph takes ``S x S`` images. An image whose resize (the convention's, as for PyTorch)
gives ``S x S`` is fed exactly as the PyTorch path feeds it; any other image is fitted into
``S x S`` (long side ``S``, :meth:`Convention.fit`), so it is seen smaller than the PyTorch
path would see it: export with a larger ``--input-size`` for wide video frames.

onnxruntime is an optional dependency (``pip install ".[export]"``; ``onnxruntime-gpu`` for
CUDA), imported when a graph is opened.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pinet_lightning.codec.codec import PINetCodec
from pinet_lightning.inference.decoding import DecodeConfig, fuse_candidates
from pinet_lightning.inference.export import (
    FORMAT,
    FORMAT_VERSION,
    GRAPH_FIELDS,
    INPUT_NAME,
    INSTALL_EXPORT,
)

__all__ = ["OnnxPINet", "onnx_providers"]

log = logging.getLogger(__name__)

def _onnxruntime() -> Any:
    try:
        import onnxruntime  # optional dependency
    except ImportError as err:
        raise ImportError(f"running an .onnx model needs onnxruntime ({err}); install it with: "
                          f"{INSTALL_EXPORT} (onnxruntime-gpu for CUDA)") from err
    return onnxruntime


def onnx_providers(device: str | torch.device = "auto") -> tuple[list[Any], torch.device]:
    """onnxruntime execution providers for ``device`` and the device they run on.

    ``auto``: CUDA when onnxruntime-gpu is installed and a GPU is there, else the CPU;
    ``cuda`` / ``cuda:N``: CUDA (an error when onnxruntime has no CUDA provider); ``cpu``.
    """
    ort = _onnxruntime()
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available and torch.cuda.is_available()
    if str(device) == "auto":
        device = "cuda" if has_cuda else "cpu"
    device = torch.device(device)
    if device.type == "cpu":
        return ["CPUExecutionProvider"], device
    if device.type != "cuda":
        raise ValueError(f"device={device}: an .onnx model runs on 'cpu' or 'cuda[:N]'")
    if "CUDAExecutionProvider" not in available:
        raise ValueError(f"device={device}: this onnxruntime has no CUDA provider (available: "
                         f"{available}); pip install onnxruntime-gpu, or use device=cpu")
    options = {"device_id": device.index or 0}
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"], device


class OnnxPINet:
    """An exported PINet graph in an onnxruntime session.

    Args:
        path: a .onnx file written by ``pinet-export`` / :func:`export_onnx`.
        device: ``auto`` (CUDA when onnxruntime-gpu and a GPU are there), ``cpu``, ``cuda:N``.
        threads: onnxruntime's intra-op threads (None: ``torch.get_num_threads()``, so that
            ``threads=`` of the commands and ``torch.set_num_threads`` apply to both backends).

    Attributes:
        codec: the frame the graph runs in (its input size S), as the file records it;
            layout, convention, output_stride, input_size: the codec's.
        decode: the ``DecodeConfig`` the graph was exported with.
        device: where the graph runs.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "auto",
                 threads: int | None = None) -> None:
        ort = _onnxruntime()
        path = Path(path)
        if not path.is_file():
            what = "a folder, not a file" if path.is_dir() else "no such file"
            raise FileNotFoundError(f"ONNX model '{path}': {what}; write one with pinet-export")
        self.path = path
        providers, self.device = onnx_providers(device)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.log_severity_level = 3  # errors only: the graph's shape notes are not news
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own (pybind) exception types
            raise ValueError(f"ONNX model '{path}' cannot be opened by onnxruntime: {err}; "
                             "re-export it with pinet-export") from None
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        if meta.get("pinet_lightning.format") != FORMAT:
            raise ValueError(f"'{path}' is an ONNX model without pinet-lightning's metadata: "
                             "write it with pinet-export (or export_onnx)")
        version = int(meta.get("pinet_lightning.format_version", 0))
        if version > FORMAT_VERSION:
            raise ValueError(f"'{path}' is of format version {version}; this pinet-lightning "
                             f"reads up to {FORMAT_VERSION}: upgrade it or re-export the model")
        self.metadata = meta
        self.codec = PINetCodec.from_dict(json.loads(meta["codec"]))
        self.layout = self.codec.layout
        self.convention = self.codec.frame
        self.output_stride = self.codec.output_stride
        self.input_size = self.codec.input_size
        self.decode = DecodeConfig.from_any(json.loads(meta["decode"]))
        self.providers = self.session.get_providers()

    def __repr__(self) -> str:
        return (f"OnnxPINet('{self.path}', layout={self.layout.name}, "
                f"convention={self.convention.name}, input {self.input_size}, "
                f"providers={self.providers})")

    def decode_config(self, cfg: DecodeConfig | Mapping[str, Any] | None = None,
                      **overrides: Any) -> DecodeConfig:
        """The graph's ``DecodeConfig`` with ``cfg`` / ``overrides`` applied; only pose fusion's
        fields (``oks_threshold``, ``max_people``) may differ from the graph's."""
        merged = self.decode.to_dict()
        if cfg is not None:
            merged.update(DecodeConfig.from_any(cfg).to_dict())
        merged.update(overrides)
        wanted = DecodeConfig.from_any(merged)
        fixed = self.decode.to_dict()
        changed = [f"{k}={v!r} (the graph: {fixed[k]!r})" for k, v in wanted.to_dict().items()
                   if k in GRAPH_FIELDS and v != fixed[k]]
        if changed:
            raise ValueError(
                f"'{self.path}' computes its decoding in the graph: {', '.join(changed)} "
                "cannot change at run time. Re-export with the setting (pinet-export ... "
                "--flip/--no-flip, export_onnx(..., top_k=...)), or use the checkpoint")
        return wanted

    def check_input_size(self, input_size: int | None) -> int:
        """The graph's input size; an error naming the fix for another one."""
        if input_size is not None and int(input_size) != self.input_size:
            raise ValueError(f"'{self.path}' takes {self.input_size}x{self.input_size} images; "
                             f"input_size={input_size} needs a graph exported with "
                             f"--input-size {input_size}")
        return self.input_size

    def resize(self, image: np.ndarray, input_size: int | None = None,
               multiple: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The graph's input of an RGB image: the convention's resize when it gives S x S
        (as the PyTorch path), else the image fitted into S x S; (input, 2x3 back)."""
        size = self.check_input_size(input_size)
        multiple = self.decode.scale_multiple if multiple is None else multiple
        resized, back = self.convention.resize(image, size, multiple)
        if resized.shape[:2] != (size, size):
            resized, back = self.convention.fit(image, size)
        return resized, back

    def candidates(self, images: Tensor | np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        """Run the graph on uint8 images (B, 3, S, S): candidates (B, N, K, 3) in
        network-input pixels, pose scores (B, N), valid (B, N), CPU tensors."""
        array = images.cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
        s = self.input_size
        if array.ndim != 4 or array.shape[1:] != (3, s, s) or array.dtype != np.uint8:
            raise ValueError(f"'{self.path}' takes uint8 images (B, 3, {s}, {s}), got "
                             f"{array.dtype} {tuple(array.shape)}")
        poses, scores, valid = self.session.run(None, {INPUT_NAME: np.ascontiguousarray(array)})
        return torch.from_numpy(poses), torch.from_numpy(scores), torch.from_numpy(valid)

    def predict_poses(self, images: Tensor | np.ndarray, back_transforms: Tensor | np.ndarray,
                      cfg: DecodeConfig | None = None) -> list[tuple[Tensor, Tensor]]:
        """As :func:`pinet_lightning.inference.decoding.predict_poses`: per image, fused poses
        (F, K, 3) in original pixels and scores (F,), CPU float32."""
        cfg = self.decode if cfg is None else cfg
        poses, _, valid = self.candidates(images)
        back = torch.as_tensor(back_transforms, dtype=torch.float32)
        if back.shape != (poses.shape[0], 2, 3):
            raise ValueError(f"back_transforms must be (B, 2, 3) = ({poses.shape[0]}, 2, 3), "
                             f"got {tuple(back.shape)}")
        return fuse_candidates(poses, valid, back, self.layout.sigmas, cfg)
