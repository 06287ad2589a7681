"""The public inference entry point: images in, people (keypoints + score) out.

>>> predictor = Predictor.from_checkpoint("last.ckpt")          # or a save_model file
>>> people = predictor("street.jpg")                             # list[Person]
>>> people[0].keypoints  # (K, 3): x, y in the image's pixels, keypoint score

Each image is resized as the network's cell/pixel convention says (algorithm.md 5.1; ours:
``inference_resize``), images of the same resized size are batched, and ``predict_poses``
decodes them (flip test, refinement, fusion).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pinet_lightning.codec.codec import PINetCodec
from pinet_lightning.core.images import read_image
from pinet_lightning.inference.decoding import DecodeConfig, predict_poses
from pinet_lightning.inference.onnx_model import OnnxPINet
from pinet_lightning.model.checkpoints import load_network

__all__ = ["Person", "Predictor", "load_image"]

ImageInput = np.ndarray | str | Path


@dataclass
class Person:
    """One detected person: ``keypoints`` (K, 3) = (x, y, keypoint score) in the original
    image's pixels, and the pose ``score``."""

    keypoints: np.ndarray
    score: float


def load_image(path: str | Path) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3) the way a viewer shows it: turned as its EXIF
    orientation says (a phone photo stored sideways), so that the keypoints are in the frame
    the user sees. Training reads the stored pixels instead (see
    :mod:`pinet_lightning.core.images`)."""
    return read_image(path, orientation=True)


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _as_rgb(image: ImageInput) -> np.ndarray:
    if isinstance(image, (str, Path)):
        return load_image(image)
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        got = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"expected an (H, W, 3) RGB uint8 array or an image "
                         f"path, got {got}; convert grayscale/RGBA images to RGB first")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image (0..255), got {image.dtype}; "
                         "use image.astype(np.uint8) on 0..255 data")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"the image is empty ({image.shape[0]} x "
                         f"{image.shape[1]} pixels); pass an image with pixels")
    return image


class Predictor:
    """Multi-person pose estimation with a trained PINet.

    Args:
        net: a ``PINet``, or an exported graph
            (:class:`~pinet_lightning.inference.onnx_model.OnnxPINet`, run by onnxruntime on
            its own device; ``device`` and ``bf16`` do not apply).
        codec: the frame the network was trained in
            (:class:`~pinet_lightning.codec.codec.PINetCodec` or a mapping of its fields):
            its layout, input size (the short side of the network input, algorithm.md 5.1)
            and convention. None: the network's layout and convention at input 512 (an
            exported graph: the codec it records).
        decode_cfg: ``DecodeConfig`` or a mapping of its fields (the defaults of algorithm.md 5).
        input_size: replaces the codec's input size (None: keep it; an exported graph takes
            only its own).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:0"``, ...
        batch_size: images of one resized size decoded together.
        bf16: run the network under bfloat16 autocast (CUDA).
        min_score: drop people whose pose score is below this (None: keep every fused pose,
            as the evaluation does; weak poses only cost a little AP there, but a caller
            who wants "the people in the image" usually wants a threshold such as 0.1).
    """

    def __init__(self, net: nn.Module, codec: PINetCodec | Mapping[str, Any] | None = None,
                 decode_cfg: DecodeConfig | Mapping[str, Any] | None = None,
                 input_size: int | None = None, device: str | torch.device = "auto",
                 batch_size: int = 8, bf16: bool = False, min_score: float | None = None
                 ) -> None:
        self.graph = net if isinstance(net, OnnxPINet) else None
        if self.graph is not None:  # its frame, decoding and size are fixed in the graph
            self.device = self.graph.device
            self.net: nn.Module | OnnxPINet = self.graph
            self.codec = PINetCodec.from_any(
                self.graph.codec if codec is None else codec,
                input_size=self.graph.check_input_size(input_size))
            self.decode_cfg = self.graph.decode_config(decode_cfg)
        else:
            self.device = _resolve_device(device)
            self.net = net.to(self.device).eval()
            if codec is None:
                codec = PINetCodec.for_network(net)
            overrides = {} if input_size is None else {"input_size": int(input_size)}
            self.codec = PINetCodec.from_any(codec, **overrides)
            self.decode_cfg = DecodeConfig.from_any(decode_cfg)
        self.codec.check_network(self.net)
        self.layout = self.codec.layout
        self.batch_size = max(1, int(batch_size))
        self.bf16 = bf16
        self.min_score = None if min_score is None else float(min_score)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto",
                        input_size: int | None = None, min_score: float | None = None,
                        batch_size: int = 8, trust_checkpoint: bool = False,
                        **decode_overrides: Any) -> Predictor:
        """Load any network file :func:`pinet_lightning.model.checkpoints.load_network` reads: a
        ``model.pt`` (training's, or ``pinet-convert``'s from the published weights), a
        Lightning checkpoint of ``PINetModule``, or the published weights themselves; or an
        ``.onnx`` graph written by ``pinet-export`` (run by onnxruntime, CPU by default, CUDA
        when onnxruntime-gpu and a GPU are there; its decoding and input size are those it was
        exported with: only pose fusion's settings, ``oks_threshold`` and ``max_people``,
        may be overridden).

        Decoding settings come from the file (its ``decode`` settings), then
        ``decode_overrides`` (any ``DecodeConfig`` field, e.g. ``flip_test=False``). The frame
        (layout, input size, convention) is the codec the file records
        (:attr:`LoadedNetwork.codec <pinet_lightning.model.checkpoints.LoadedNetwork>`: input
        512 and the published convention for the published weights); ``input_size`` replaces
        its input size. The file is read safely: ``trust_checkpoint=True`` allows one that
        needs the full unpickler (it can run code).
        """
        if Path(path).suffix.lower() == ".onnx":
            graph = OnnxPINet(path, device=device)
            return cls(graph, decode_cfg=graph.decode_config(**decode_overrides),
                       input_size=input_size, min_score=min_score, batch_size=batch_size)
        loaded = load_network(path, trust_checkpoint=trust_checkpoint)
        known = set(DecodeConfig.__dataclass_fields__)
        decode = {k: v for k, v in loaded.decode.items() if k in known}
        return cls(loaded.net, codec=loaded.codec,
                   decode_cfg=DecodeConfig.from_any(decode, **decode_overrides),
                   input_size=input_size, device=device, min_score=min_score,
                   batch_size=batch_size)

    @property
    def input_size(self) -> int:
        """The short side of the network input (the codec's)."""
        return self.codec.input_size

    def __call__(self, image_or_batch: ImageInput | Sequence[ImageInput]
                 ) -> list[Person] | list[list[Person]]:
        """People in one image (an RGB uint8 (H, W, 3) array or a path) or in each image of
        a list (or of an (N, H, W, 3) array)."""
        if isinstance(image_or_batch, np.ndarray) and image_or_batch.ndim == 4:
            image_or_batch = list(image_or_batch)
        single = isinstance(image_or_batch, (np.ndarray, str, Path))
        images = [image_or_batch] if single else list(image_or_batch)
        results = self.predict([_as_rgb(im) for im in images])
        return results[0] if single else results

    def predict(self, images: Sequence[np.ndarray]) -> list[list[Person]]:
        """People in each RGB uint8 image."""
        if self.graph is not None:  # fitted into the graph's S x S when not already that
            prepared = [self.graph.resize(im, None, self.decode_cfg.scale_multiple)
                        for im in images]
        else:
            prepared = [self.codec.resize(im, self.decode_cfg.scale_multiple) for im in images]
        results: list[list[Person] | None] = [None] * len(images)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, (resized, _) in enumerate(prepared):
            by_size.setdefault(resized.shape, []).append(i)
        for indices in by_size.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                batch = torch.from_numpy(np.stack([prepared[i][0] for i in chunk]))
                batch = batch.permute(0, 3, 1, 2).contiguous()
                back = torch.from_numpy(np.stack([prepared[i][1] for i in chunk])).float()
                amp = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16
                       else contextlib.nullcontext())
                if self.graph is not None:  # the same fusion, on the graph's candidates
                    decoded = self.graph.predict_poses(batch, back, self.decode_cfg)
                else:
                    with amp:
                        decoded = predict_poses(self.net, batch, self.layout, back,
                                                self.decode_cfg)
                for i, (poses, scores) in zip(chunk, decoded, strict=True):
                    results[i] = [Person(keypoints=p.numpy(), score=float(s))
                                  for p, s in zip(poses, scores, strict=True)
                                  if self.min_score is None or float(s) >= self.min_score]
        return [r if r is not None else [] for r in results]
