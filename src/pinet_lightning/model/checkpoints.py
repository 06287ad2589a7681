"""Saving and loading PINet networks: the one place a network goes to or comes from a file.

- ``model.pt``, written by :func:`save_model` (training saves one, and :func:`convert_published`
  writes one from the published weights): the state dict, the network's constructor config
  and ``extra`` (the codec, decoding settings, metrics);
- a Lightning ``.ckpt`` of :class:`~pinet_lightning.training.module.PINetModule`;
- the published PINet's own weights (kennethwdk/PINet: a plain state dict, or its trainer's
  dict holding ``state_dict``), converted on the fly by the adaptor
  :mod:`pinet_lightning.model.published`.

Files are read by :func:`pinet_lightning.core.files.load_file`: ``torch.load(weights_only=True)``,
nothing in a file ever runs unless the caller passes ``trust_checkpoint=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pinet_lightning.codec.codec import PINetCodec
from pinet_lightning.core.atomic import save_torch
from pinet_lightning.core.files import CheckpointError, clean_state_dict, load_file
from pinet_lightning.model.network import PINet
from pinet_lightning.model.published import (
    PUBLISHED_INPUT_SIZE,
    is_published_state,
    published_network,
)

__all__ = ["FORMAT", "LoadedNetwork", "save_model", "load_model", "network_from_blob",
           "load_network", "convert_published", "published_codec", "CheckpointError",
           "load_file"]

log = logging.getLogger(__name__)

FORMAT = "pinet_lightning.PINet"
DEFAULT_INPUT_SIZE = 512  # a file that predates the codec and says nothing of its input


def _unwrap(model: nn.Module) -> PINet:
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if not isinstance(model, PINet):
        raise TypeError(f"save_model expects a PINet, got {type(model).__name__}")
    return model


def save_model(path: str | Path, model: nn.Module, extra: dict | None = None) -> None:
    """Save the state dict, the constructor config and ``extra`` in one torch file, written
    atomically (:mod:`pinet_lightning.core.atomic`: a failed write leaves the previous file).

    Raises:
        ValueError: a weight or batch-norm statistic is NaN or infinite (a diverged network
            is never written as a model); OSError: the write failed (naming ``path``).
    """
    net = _unwrap(model)
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"save_model: refusing to write {path}: {len(bad)} tensors hold NaN "
                         f"or infinite values (e.g. {bad[:3]}): the network diverged")
    save_torch({"format": FORMAT, "version": 1, "config": net.config, "state_dict": state,
                "extra": extra or {}}, path)


def network_from_blob(blob: Mapping[str, Any], source: str | Path = "<memory>") -> PINet:
    """Rebuild a PINet from a loaded :func:`save_model` dict (strict: every weight must
    match its config)."""
    config = dict(blob["config"])
    config["pretrained"] = None
    net = PINet(**config)
    state = clean_state_dict(blob["state_dict"])
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RuntimeError(f"the weights in '{source}' do not fit the saved config "
                           f"{ {k: v for k, v in config.items() if k != 'layout'} }: {err}"
                           ) from err
    net.extra = dict(blob.get("extra") or {})
    return net


def load_model(path: str | Path, map_location: str | torch.device = "cpu",
               trust_checkpoint: bool = False) -> PINet:
    """Rebuild a PINet saved by :func:`save_model` (strict: every weight must match).
    ``extra`` is available as ``model.extra``. The file is read safely (no code runs; see
    :func:`pinet_lightning.core.files.load_file`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at '{path}'")
    blob = load_file(path, trust_checkpoint)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"'{path}' is not a file written by save_model; for a "
                         "Lightning checkpoint use Predictor.from_checkpoint")
    return network_from_blob(blob, path).to(map_location)


@dataclass
class LoadedNetwork:
    """A network and what its file says about it.

    Attributes:
        net: the :class:`~pinet_lightning.model.network.PINet`, in eval mode, on the CPU.
        kind: ``"model"`` (save_model), ``"lightning"`` or ``"published"`` (raw authors'
            weights).
        codec: the frame the network was trained in (layout, input size, stride, convention,
            target settings): what the file records; files that predate the codec give the
            settings they hold (their input size, else 512).
        decode: the decoding settings the file records (may be empty).
        data: the data module's other settings of the training run (``PINetDataModule``
            keyword arguments but the codec), when the file has them.
        extra: the remaining metadata (``save_model``'s ``extra``, or the Lightning
            hyper-parameters).
    """

    net: Any
    kind: str
    codec: PINetCodec
    decode: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


# What data settings held before the codec owned the frame (files written before it).
_LEGACY_DATA_KEYS = ("layout", "input_size", "output_stride", "targets", "convention",
                     "sparse_targets")


def _codec_and_data(net: PINet, record: Mapping[str, Any], data: Mapping[str, Any]
                    ) -> tuple[PINetCodec, dict[str, Any]]:
    """The codec a file records (``record["codec"]``, or the data settings of a file written
    before the codec existed) and the data settings without it."""
    data = dict(data)
    codec = record.get("codec") or data.pop("codec", None)
    legacy = {key: data.pop(key) for key in _LEGACY_DATA_KEYS if key in data}
    if codec is not None:
        return PINetCodec.from_dict(codec), data
    size = record.get("input_size") or legacy.get("input_size") or DEFAULT_INPUT_SIZE
    return PINetCodec.for_network(
        net, input_size=int(size),
        output_stride=int(legacy.get("output_stride") or net.output_stride),
        sparse=bool(legacy.get("sparse_targets", True)),
        targets=dict(legacy.get("targets") or {})), data


def _from_lightning(blob: Mapping[str, Any], path: Path) -> LoadedNetwork:
    hp = dict(blob["hyper_parameters"])
    network = dict(hp.get("network") or {})
    network["pretrained"] = None  # the weights are in the checkpoint
    state = clean_state_dict(blob["state_dict"], "net.")
    if not state:
        raise CheckpointError(f"checkpoint '{path}' has no 'net.*' weights; is it a "
                              "PINetModule checkpoint?")
    codec = hp.get("codec")
    layout = codec["layout"] if codec else hp.get("layout", "crowdpose")  # older: "layout"
    net = PINet(layout, **network)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint '{path}': its weights do not fit the network of its "
                              f"hyper-parameters: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}")
    codec, data = _codec_and_data(net, hp, blob.get("datamodule_hyper_parameters") or {})
    return LoadedNetwork(net=net, kind="lightning", codec=codec,
                         decode=dict(hp.get("decode") or {}), data=data, extra=hp)


def load_network(path: str | Path, trust_checkpoint: bool = False) -> LoadedNetwork:
    """Rebuild the network of any supported file (see the module docstring).

    Raises:
        FileNotFoundError, CheckpointError: naming the file and what to do.
    """
    path = Path(path)
    blob = load_file(path, trust_checkpoint)
    if isinstance(blob, Mapping) and blob.get("format") == FORMAT:
        net = network_from_blob(blob, path)
        extra = dict(blob.get("extra") or {})
        codec, data = _codec_and_data(net, extra, extra.get("data") or {})
        loaded = LoadedNetwork(net=net, kind="model", codec=codec,
                               decode=dict(extra.get("decode") or {}), data=data, extra=extra)
    elif isinstance(blob, Mapping) and "state_dict" in blob and "hyper_parameters" in blob:
        loaded = _from_lightning(blob, path)
    elif is_published_state(blob):
        net = published_network(blob, source=path)
        log.info("%s: the published PINet's weights (layout %s), read with its conventions",
                 path, net.layout.name)
        loaded = LoadedNetwork(net=net, kind="published", codec=published_codec(net))
    else:
        raise CheckpointError(
            f"checkpoint '{path}' is neither a model.pt (save_model), a Lightning checkpoint "
            "of PINetModule (state_dict + hyper_parameters) nor the published PINet's weights")
    loaded.net.eval()
    return loaded


def published_codec(net: PINet) -> PINetCodec:
    """The frame the published weights were trained in: input 512, the published convention."""
    return PINetCodec.for_network(net, input_size=PUBLISHED_INPUT_SIZE, convention="published")


def convert_published(src: str | Path, dst: str | Path, layout: str | None = "crowdpose",
                      trust_checkpoint: bool = False) -> Path:
    """Convert the published PINet's weights file ``src`` into a ``model.pt`` at ``dst``
    that ``Predictor.from_checkpoint``, ``pinet-eval`` and ``pinet-predict`` load; returns ``dst``.

    Args:
        layout: ``crowdpose``, ``coco`` or ``ochuman`` (None: read off the file: 14 keypoints
            CrowdPose, 17 with 2 refinement layers COCO, with 3 OCHuman).
        trust_checkpoint: allow a file that needs the full unpickler (it can run code).
    """
    src, dst = Path(src), Path(dst)
    net = published_network(load_file(src, trust_checkpoint), layout, src)
    # no decode settings: the decoding defaults are the published inference under the
    # published convention the network records
    save_model(dst, net, extra={"codec": published_codec(net).to_dict(),
                                "converted_from": str(src), "source": "kennethwdk/PINet"})
    return dst
