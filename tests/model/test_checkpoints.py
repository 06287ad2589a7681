"""Checkpoint loading never runs a file's code unless the user opts in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pinet_lightning import Predictor
from pinet_lightning.core.files import CheckpointError, load_file
from pinet_lightning.data.datamodule import PINetDataModule
from pinet_lightning.model.checkpoints import FORMAT, load_model, load_network
from pinet_lightning.model.network import PINet


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

    with pytest.raises(CheckpointError, match="trust_checkpoint"):
        Predictor.from_checkpoint(path, device="cpu")

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


def _legacy_data(input_size: int) -> dict:
    """The data settings a file written before the codec carried (commit 503b177)."""
    return {"layout": "crowdpose", "protocol": "crowdpose", "train": None, "val": None,
            "test": None, "synthetic": {"root": "data/synthetic", "num_train": 8},
            "input_size": input_size, "output_stride": 4,
            "targets": {"sigma": 1.5, "radius": 2}, "augmentation": {"flip_prob": 0.5},
            "people": {"ignore_regions": False, "min_image_keypoints": None}, "batch_size": 4,
            "eval_batch_size": 1, "num_workers": 0, "pin_memory": False,
            "persistent_workers": False, "skip_invalid": False, "convention": "cell_center",
            "sparse_targets": True}


def test_files_written_before_the_codec_still_load(tmp_path):
    """model.pt and Lightning checkpoints of the earlier layout (input size and target
    settings in the data settings, the layout as a hyper-parameter, the optimizer as lr /
    milestones) load with the codec they imply, and their data settings rebuild the data."""

    torch.manual_seed(0)
    net = PINet("crowdpose", backbone="hrnet_w18_small", refine_layers=1).eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    decode = {"flip_test": False, "top_k": 5}
    old_model = tmp_path / "model.pt"
    torch.save({"format": FORMAT, "version": 1, "config": net.config, "state_dict": state,
                "extra": {"decode": decode, "protocol": "crowdpose", "input_size": 128,
                          "data": _legacy_data(128)}}, old_model)
    old_ckpt = tmp_path / "last.ckpt"
    network = {k: v for k, v in net.config.items() if k != "layout"}
    torch.save({"state_dict": {f"net._orig_mod.{k}": v for k, v in state.items()},
                "hyper_parameters": {"layout": "crowdpose", "network": network,
                                     "optimizer": {"lr": 0.002, "milestones": [20],
                                                   "gamma": 0.1}, "decode": decode},
                "datamodule_hyper_parameters": _legacy_data(96)}, old_ckpt)
    image = torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        want = net(image)["heatmaps"]
    for path, size in ((old_model, 128), (old_ckpt, 96)):
        loaded = load_network(path)
        codec = loaded.codec
        assert (codec.input_size, codec.convention, codec.sparse) == (size, "cell_center", True)
        assert codec.layout.name == "crowdpose" and codec.targets["sigma"] == 1.5
        assert not set(loaded.data) & {"layout", "input_size", "targets", "convention",
                                       "output_stride", "sparse_targets"}
        with torch.no_grad():
            assert torch.equal(loaded.net(image)["heatmaps"], want)
        dm = PINetDataModule(**{**loaded.data, "codec": codec})
        assert dm.codec == codec and dm.batch_size == 4
        predictor = Predictor.from_checkpoint(path, device="cpu")
        assert predictor.input_size == size and predictor.decode_cfg.top_k == 5
