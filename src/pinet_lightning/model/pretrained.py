"""ImageNet initialization of the backbone (algorithm.md 3): where the weights come from and
how strictly they are loaded.

``pretrained`` (``model.network.pretrained``) is one of:

- ``"imagenet"``: timm's ImageNet weights of the backbone, from the Hugging Face hub entry
  timm names (``timm/hrnet_w32.ms_in1k`` for ``hrnet_w32``), fetched and cached by timm's
  own hub support (``~/.cache/huggingface``; ``HF_HOME`` moves it, ``HF_HUB_OFFLINE=1``
  reads the cache only). When they can be neither fetched nor found in the cache the run
  stops at once, saying so and naming the file option; it never falls back to random weights.
- a local file: ``.pth`` / ``.pt`` / ``.bin`` (read with ``torch.load(weights_only=True)``
  by :func:`pinet_lightning.core.files.load_file`: nothing in it runs) or ``.safetensors``;
  a plain state dict or a checkpoint holding one under ``state_dict`` / ``model``, keys
  optionally prefixed ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile). timm's
  ``hrnet_w32`` weights, and the official HRNet ImageNet release the published PINet loads
  (``hrnet_w32-36af842e.pth``, ``hrnetv2_w32_imagenet_pretrained.pth``:
  HRNet-Image-Classification's ``cls_hrnet``), name their tensors alike: timm's ``hrnet.py``
  keeps the official module names (``conv1``, ``layer1``, ``transition1``,
  ``stage2.0.branches.0.0.conv1``, ``stage2.0.fuse_layers.0.1.0``, ...), so both load
  through the same map.
- ``None``: random initialization.

HRNet files are loaded here, strictly: the classification head (``incre_modules``,
``downsamp_modules``, ``final_layer``, ``classifier``) is dropped by name and every other
tensor must match one of the backbone's, which must all be given (BatchNorm's
``num_batches_tracked`` counters aside, which some releases lack and nothing reads), or the
run stops with an error listing what did not match (missing, unknown, or of a wrong shape,
named). timm's own HRNet feature loader is not strict, which is why it is not used. Any other
timm backbone is loaded by timm into its full classification model, strictly, before it is
cut into a feature extractor.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file as load_safetensors
from timm.models import get_pretrained_cfg, load_state_dict_from_hf
from torch import Tensor, nn

from pinet_lightning.core.files import CheckpointError, clean_state_dict, load_file

__all__ = ["IMAGENET", "HRNET_HEAD", "PretrainedWeightsError", "PretrainedWeights",
           "imagenet_hub_id", "fetch_imagenet", "read_weights_file", "resolve_pretrained",
           "load_hrnet_weights", "describe"]

log = logging.getLogger(__name__)

IMAGENET = "imagenet"
# The ImageNet classification head of HRNet (official names and timm's): not part of the
# feature extractor, dropped by name.
HRNET_HEAD = ("incre_modules", "downsamp_modules", "final_layer", "classifier")
_COUNTER = "num_batches_tracked"  # BatchNorm's step counter: not a weight, read by no layer
_SHOWN = 8  # names listed per kind of mismatch


class PretrainedWeightsError(RuntimeError):
    """Backbone weights that cannot be had or do not fit (the message names the fix)."""


@dataclass
class PretrainedWeights:
    """A backbone state dict and where it came from (a file path or ``hub <id>``)."""

    state: dict[str, Tensor]
    source: str


def _file_option(name: str) -> str:
    # no double quotes: Hydra shows the message through repr(), which would escape the quotes
    return (f"give a local file instead: model.network.pretrained=/path/to/{name}.pth, timm's "
            f"weights saved on a machine with internet (torch.save of "
            f"timm.create_model('{name}', pretrained=True).state_dict()) or a .safetensors of "
            "them, or, for hrnet_w32, the official HRNet ImageNet file the published PINet "
            "loads (hrnet_w32-36af842e.pth / hrnetv2_w32_imagenet_pretrained.pth); or "
            "model.network.pretrained=null to start from random weights")


def imagenet_hub_id(name: str) -> str:
    """The Hugging Face hub id of timm's default ImageNet weights of ``name``."""
    cfg = get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        raise PretrainedWeightsError(
            f"model.network.pretrained=imagenet: timm has no ImageNet weights on the hub for "
            f"'{name}'; {_file_option(name)}")
    return str(hub_id)


def fetch_imagenet(name: str) -> PretrainedWeights:
    """timm's ImageNet weights of ``name`` through timm's hub support (cached after the first
    fetch). Raises :class:`PretrainedWeightsError` at once when they cannot be had."""
    hub_id = imagenet_hub_id(name)
    try:
        state = load_state_dict_from_hf(hub_id)
    except Exception as err:  # offline, hub unreachable, not cached, huggingface_hub missing
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise PretrainedWeightsError(
            f"model.network.pretrained=imagenet: could not fetch the ImageNet weights of "
            f"'{name}' (hub id {hub_id}, through timm) and they are not in the local cache: "
            f"no internet here, or the hub is unreachable ({type(err).__name__}: {reason}). "
            "Nothing falls back to random weights. Run once where there is internet (timm "
            f"caches the file under HF_HOME, ~/.cache/huggingface), or {_file_option(name)}."
        ) from err
    return PretrainedWeights(clean_state_dict(dict(state)), f"hub {hub_id}")


def read_weights_file(path: str | Path, name: str) -> PretrainedWeights:
    """A local weights file as a state dict (safely: tensors and plain containers only)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights file '{path}' not found (model.network.pretrained); "
            f"{_file_option(name)}, or model.network.pretrained=imagenet on a machine with "
            "internet")
    try:
        if path.suffix == ".safetensors":
            blob: Any = load_safetensors(str(path), device="cpu")
        else:  # torch.load(weights_only=True): a file holding Python objects is refused
            blob = load_file(path)
    except CheckpointError as err:
        raise PretrainedWeightsError(f"{err} (model.network.pretrained)") from None
    except Exception as err:  # a damaged safetensors header, ...
        raise PretrainedWeightsError(f"could not read '{path}' as a weights file "
                                     f"({type(err).__name__}: {err})") from None
    state = blob
    if isinstance(blob, Mapping):  # a training checkpoint holding the state dict
        for key in ("state_dict", "model"):
            if isinstance(blob.get(key), Mapping):
                state = blob[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"'{path}' is not a state dict of tensors (nor a "
                                     "checkpoint holding one under 'state_dict' or 'model')")
    return PretrainedWeights(clean_state_dict(dict(state)), str(path))


def resolve_pretrained(pretrained: str | Path | None, name: str) -> PretrainedWeights | None:
    """``"imagenet"`` -> the hub weights, a path -> the file, None -> None."""
    if pretrained is None:
        return None
    if str(pretrained).lower() == IMAGENET:
        return fetch_imagenet(name)
    return read_weights_file(pretrained, name)


def _listed(keys: list[str]) -> str:
    more = f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def load_hrnet_weights(body: nn.Module, weights: PretrainedWeights, name: str) -> dict[str, int]:
    """Load ImageNet HRNet weights (timm's or the official names) into timm's HRNet feature
    extractor, strictly (see the module docstring). Returns the counts ``loaded`` and
    ``dropped`` (classification-head tensors)."""
    own = body.state_dict()
    dropped = [k for k in weights.state if k.split(".", 1)[0] in HRNET_HEAD]
    given = {k: v for k, v in weights.state.items() if k.split(".", 1)[0] not in HRNET_HEAD}
    missing = [k for k in own if k not in given and not k.endswith(_COUNTER)]
    unknown = [k for k in given if k not in own]
    wrong = [f"{k} (file {tuple(v.shape)}, backbone {tuple(own[k].shape)})"
             for k, v in given.items() if k in own and v.shape != own[k].shape]
    if missing or unknown or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} of the backbone's {len(own)} tensors are not in "
                            f"the file: {_listed(missing)}")
        if unknown:
            problems.append(f"{len(unknown)} tensors of the file are not the backbone's: "
                            f"{_listed(unknown)}")
        if wrong:
            problems.append(f"{len(wrong)} tensors have the wrong shape: {_listed(wrong)}")
        raise PretrainedWeightsError(
            f"the weights of {weights.source} do not fit the backbone '{name}' (nothing was "
            f"loaded): {'; '.join(problems)}. Is it an ImageNet checkpoint of '{name}' "
            "(timm's, or the official HRNet release's)?")
    body.load_state_dict(given, strict=False)  # only absent num_batches_tracked may be left
    return {"loaded": len(given), "dropped": len(dropped)}


def describe(weights: PretrainedWeights | None, counts: Mapping[str, Any] | None = None) -> str:
    """One line for the log: where the backbone weights came from."""
    if weights is None:
        return "randomly initialised (model.network.pretrained=null)"
    text = f"ImageNet weights from {weights.source}"
    if counts:
        text += (f": {counts['loaded']} tensors loaded, every one of the backbone "
                 f"({counts['dropped']} classification-head tensors dropped)")
    else:
        text += ": loaded by timm into the full model, strictly"
    return text
