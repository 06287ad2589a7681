"""Checkpoint loading never runs a file's code unless the user opts in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pinet_lightning.core.files import CheckpointError, load_file
from pinet_lightning.model.checkpoints import load_network


class _Payload:
    """Unpickling this object runs ``os.system`` (what a crafted checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"layout": "crowdpose"},
                "surprise": _Payload(marker)}, path)
    return path, marker


def test_crafted_checkpoint_is_refused_and_nothing_runs(tmp_path):
    path, marker = _crafted(tmp_path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt' holds Python objects.*refused.*"
                                              r"trust_checkpoint=True"):
        load_network(path)
    from pinet_lightning import Predictor

    with pytest.raises(CheckpointError, match="trust_checkpoint"):
        Predictor.from_checkpoint(path, device="cpu")
    from pinet_lightning.model.checkpoints import load_model

    with pytest.raises(CheckpointError, match="trust_checkpoint"):
        load_model(path)
    assert not marker.exists()


def test_trusting_a_checkpoint_is_an_explicit_opt_in(tmp_path):
    path, marker = _crafted(tmp_path)
    blob = load_file(path, trust_checkpoint=True)
    assert marker.exists()  # the full unpickler ran the file's code: the user asked for it
    assert blob["hyper_parameters"] == {"layout": "crowdpose"}


def test_cli_refuses_crafted_checkpoint(tmp_path):
    path, marker = _crafted(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    proc = subprocess.run([sys.executable, "-m", "pinet_lightning.cli.predict",
                           f"ckpt_path={path}", f"input={images}",
                           f"output_dir={tmp_path / 'out'}", "device=cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "holds Python objects" in proc.stderr and "evil.ckpt" in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", b"\x80\x02garbage"])
def test_corrupt_checkpoint_names_the_file(tmp_path, content):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"broken\.pt' is corrupt or not a torch file"):
        load_network(path)
