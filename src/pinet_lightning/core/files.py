"""Reading torch files safely, and cleaning the keys of a state dict.

Every checkpoint (``model.pt``, a Lightning ``.ckpt``, the published PINet weights, an ImageNet
backbone) is data: :func:`load_file` reads it with ``torch.load(weights_only=True)``, tensors
and plain containers only, no code. A file that needs the full unpickler (it holds Python
objects, whose loading can run arbitrary code) is refused with a clear error unless the caller
opts in with ``trust_checkpoint=True`` for a file whose source they trust.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "UntrustedCheckpointError", "load_file", "clean_state_dict",
           "WRAPPER_PREFIXES"]

log = logging.getLogger(__name__)

# Prefixes wrappers add to every key: torch.compile's module and DDP / DataParallel's.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


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


def clean_state_dict(state: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The entries of ``state`` under ``prefix`` (others dropped), the prefix and every
    wrapper prefix (:data:`WRAPPER_PREFIXES`, at the start or after ``prefix``) removed."""
    out = {}
    for key, value in state.items():
        key = str(key)
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        stripped = True
        while stripped:
            stripped = False
            for wrapper in WRAPPER_PREFIXES:
                if key.startswith(wrapper):
                    key, stripped = key[len(wrapper):], True
        out[key] = value
    return out
