"""One loader for every file a PINet comes in, and nothing in a file ever runs.

- ``model.pt`` written by :func:`pinet_lightning.network.save_model` (training saves one, and
  ``pinet-convert`` writes one from the published weights);
- a Lightning ``.ckpt`` of :class:`~pinet_lightning.module.PINetModule`;
- the published PINet's own weights (kennethwdk/PINet: a plain state dict, or its trainer's
  dict holding ``state_dict``), converted on the fly (see :mod:`pinet_lightning.convert`).

Every file is read with ``torch.load(weights_only=True)``: tensors and plain containers only,
no code. A file that needs the full unpickler (it holds Python objects, whose loading can run
arbitrary code) is refused with a clear error unless the caller opts in with
``trust_checkpoint=True`` for a file whose source they trust.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "UntrustedCheckpointError", "LoadedNetwork", "load_file",
           "load_network"]

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be (safely) loaded; the message names the file and the fix."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint refused because it holds Python objects (``path``); the way to trust it
    depends on the caller (the API's ``trust_checkpoint=True``, the Hydra commands'
    ``trust_checkpoint=true``, ``pinet-convert --trust-checkpoint``)."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


def load_file(path: str | Path, trust_checkpoint: bool = False) -> Any:
    """``torch.load`` a checkpoint on the CPU, safely (see the module docstring).

    Raises:
        FileNotFoundError: no such file. CheckpointError: corrupt, not a torch file, or
        holding Python objects while ``trust_checkpoint`` is False.
    """
    path = Path(path)
    if not path.is_file():
        what = "a folder, not a file" if path.is_dir() else "no such file"
        raise FileNotFoundError(f"checkpoint '{path}': {what}; pass a model.pt, a Lightning "
                                ".ckpt or the published PINet weights file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch names the Python object (a "GLOBAL") the safe unpickler refused; any other
        # unpickling error is a damaged file
        if "GLOBAL" not in str(err):
            raise CheckpointError(f"checkpoint '{path}' is corrupt or not a torch file "
                                  "(unreadable pickle data); re-download or re-save it"
                                  ) from None
        if not trust_checkpoint:
            raise UntrustedCheckpointError(
                f"checkpoint '{path}' holds Python objects, and loading them can run code. "
                "It was refused. Only if you trust where it comes from, pass "
                "trust_checkpoint=True (pinet-train / pinet-eval / pinet-predict: "
                "trust_checkpoint=true)", path) from None
    except Exception as err:  # truncated zip, wrong magic number, empty file, ...
        raise CheckpointError(f"checkpoint '{path}' is corrupt or not a torch file "
                              f"({type(err).__name__}: {err}); re-download or re-save it"
                              ) from None
    log.warning("loading %s with the full unpickler (trust_checkpoint=True)", path)
    return torch.load(path, map_location="cpu", weights_only=False)


@dataclass
class LoadedNetwork:
    """A network and what its file says about it.

    Attributes:
        net: the :class:`~pinet_lightning.network.PINet`, in eval mode, on the CPU.
        kind: ``"model"`` (save_model), ``"lightning"`` or ``"published"`` (raw authors'
            weights).
        decode: the decoding settings the file records (may be empty).
        input_size: the input size the network was trained at, when the file says.
        data: the data module's settings of the training run (``PINetDataModule`` keyword
            arguments), when the file has them.
        extra: the remaining metadata (``save_model``'s ``extra``, or the Lightning
            hyper-parameters).
    """

    net: Any
    kind: str
    decode: dict[str, Any] = field(default_factory=dict)
    input_size: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def _strip(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _from_lightning(blob: Mapping[str, Any], path: Path) -> LoadedNetwork:
    from pinet_lightning.network import PINet

    hp = dict(blob["hyper_parameters"])
    network = dict(hp.get("network") or {})
    network["pretrained"] = None  # the weights are in the checkpoint
    state = {k.replace("_orig_mod.", ""): v for k, v in _strip(blob["state_dict"], "net.").items()}
    if not state:
        raise CheckpointError(f"checkpoint '{path}' has no 'net.*' weights; is it a "
                              "PINetModule checkpoint?")
    net = PINet(hp.get("layout", "crowdpose"), **network)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint '{path}': its weights do not fit the network of its "
                              f"hyper-parameters: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}")
    data = dict(blob.get("datamodule_hyper_parameters") or {})
    size = data.get("input_size")
    return LoadedNetwork(net=net, kind="lightning", decode=dict(hp.get("decode") or {}),
                         input_size=int(size) if size else None, data=data, extra=hp)


def load_network(path: str | Path, trust_checkpoint: bool = False) -> LoadedNetwork:
    """Rebuild the network of any supported file (see the module docstring).

    Raises:
        FileNotFoundError, CheckpointError: naming the file and what to do.
    """
    from pinet_lightning.convert import is_published_state, published_network
    from pinet_lightning.network import FORMAT, network_from_blob

    path = Path(path)
    blob = load_file(path, trust_checkpoint)
    if isinstance(blob, Mapping) and blob.get("format") == FORMAT:
        net = network_from_blob(blob, path)
        extra = dict(blob.get("extra") or {})
        data = dict(extra.get("data") or {})
        size = extra.get("input_size") or data.get("input_size")
        loaded = LoadedNetwork(net=net, kind="model", decode=dict(extra.get("decode") or {}),
                               input_size=int(size) if size else None, data=data, extra=extra)
    elif isinstance(blob, Mapping) and "state_dict" in blob and "hyper_parameters" in blob:
        loaded = _from_lightning(blob, path)
    elif is_published_state(blob):
        net = published_network(blob, source=path)
        log.info("%s: the published PINet's weights (layout %s), read with its conventions",
                 path, net.layout.name)
        loaded = LoadedNetwork(net=net, kind="published", input_size=512)
    else:
        raise CheckpointError(
            f"checkpoint '{path}' is neither a model.pt (save_model), a Lightning checkpoint "
            "of PINetModule (state_dict + hyper_parameters) nor the published PINet's weights")
    loaded.net.eval()
    return loaded
