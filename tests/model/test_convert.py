"""Converting the published PINet's weights (kennethwdk/PINet) into a model.pt.

tests/fixtures/published_crowdpose_state.json holds the tensor names and shapes of the published
CrowdPose network (read once from it); the values here are random.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pinet_lightning import Predictor
from pinet_lightning.cli.convert import main
from pinet_lightning.core.files import CheckpointError
from pinet_lightning.model.checkpoints import convert_published, load_model, load_network
from pinet_lightning.model.published import map_published_key

DATA = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def published_state() -> dict[str, torch.Tensor]:
    spec = json.loads((DATA / "published_crowdpose_state.json").read_text())["tensors"]
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in spec.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(7)
        else:
            state[name] = torch.randn(shape, generator=gen)
    return state


@pytest.fixture(scope="module")
def converted(published_state, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("convert")
    src = folder / "crowdpose_w32.pth"
    torch.save(published_state, src)
    return src, convert_published(src, folder / "model.pt")


def test_every_published_tensor_maps_and_loads_strictly(published_state, converted):
    _, dst = converted
    net = load_model(dst)  # strict load of the written file
    ours = net.state_dict()
    assert len(ours) == len(published_state) == 1895
    assert net.layout.name == "crowdpose" and net.refine_layers == 3
    assert net.convention.name == "published" and net.backbone_name == "hrnet_w32"
    assert net.extra["codec"]["input_size"] == 512
    assert net.extra["codec"]["convention"] == "published" and "decode" not in net.extra
    # Same values, each in its place (with the documented reshapes).
    pairs = {
        "backbone.conv1.weight": "backbone.body.conv1.weight",
        "backbone.stage4.2.fuse_layers.3.0.0.0.weight":
            "backbone.body.stage4.2.fuse_layers.3.0.0.0.weight",
        "ppg.detkptmap_head.weight": "heads.part_heatmap.weight",
        "ppg.offset_head.bias": "heads.offset.bias",
        "pr.adj": "pose_refinement.adjacency",
        "pr.gconv_layers.2.gconv2.bn.running_var":
            "pose_refinement.blocks.2.block2.norm.running_var",
        "pr.gconv_pred.1.bias": "pose_refinement.readout_norm.bias",
    }
    for theirs, mine in pairs.items():
        assert torch.equal(ours[mine], published_state[theirs]), theirs
    graph = published_state["pr.gconv_layers.1.gconv1.conv.weight"]  # stored (in, out)
    assert torch.equal(ours["pose_refinement.blocks.1.block1.linear.weight"], graph.t())
    readout = published_state["pr.gconv_pred.3.weight"]  # (2K, C, 1)
    assert readout.shape == (28, 480, 1)
    assert torch.equal(ours["pose_refinement.output.weight"], readout[..., 0])
    assert int(ours["pose_refinement.input_block.norm.num_batches_tracked"]) == 7


def test_converted_file_loads_in_the_predictor_with_published_conventions(converted):
    _, dst = converted
    predictor = Predictor.from_checkpoint(dst, device="cpu")
    assert predictor.input_size == 512
    assert predictor.net.convention.name == "published"
    assert predictor.net.pose_refinement.convention.name == "published"


def test_trainer_dict_with_module_prefix_and_raw_files(published_state, converted, tmp_path):
    _, dst = converted
    wrapped = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 300, "perf": 299, "optimizer": {"state": {}, "param_groups": []},
                "state_dict": {f"module.{k}": v for k, v in published_state.items()}}, wrapped)
    out = convert_published(wrapped, tmp_path / "from_trainer.pt", layout=None)
    a, b = load_model(out).state_dict(), load_model(dst).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A raw published file loads directly too (converted on the fly).
    loaded = load_network(wrapped)
    assert loaded.kind == "published" and loaded.codec.input_size == 512
    assert torch.equal(loaded.net.state_dict()["heads.heatmap.weight"],
                       b["heads.heatmap.weight"])


def test_wrong_layout_and_bad_files_are_named(published_state, tmp_path):
    src = tmp_path / "w.pth"
    torch.save(published_state, src)
    with pytest.raises(ValueError, match=r"w\.pth: the file has 14 keypoints but layout 'coco'"):
        convert_published(src, tmp_path / "x.pt", layout="coco")
    extra = dict(published_state, **{"ppg.extra_head.weight": torch.zeros(3)})
    torch.save(extra, src)
    with pytest.raises(ValueError, match=r"w\.pth.*without a counterpart.*ppg\.extra_head"):
        convert_published(src, tmp_path / "x.pt")
    wrong = dict(published_state, **{"ppg.offset_head.bias": torch.zeros(80)})
    torch.save(wrong, src)
    with pytest.raises(ValueError, match=r"another shape.*ppg\.offset_head\.bias \(80,\)"):
        convert_published(src, tmp_path / "x.pt")
    partial = {k: v for k, v in published_state.items() if k != "pr.gconv_pred.0.bias"}
    torch.save(partial, src)
    with pytest.raises(ValueError, match=r"missing from it.*pose_refinement\.readout\.bias"):
        convert_published(src, tmp_path / "x.pt")
    torch.save({"weights": torch.zeros(2)}, src)
    with pytest.raises(ValueError, match=r"w\.pth: not the published PINet's weights"):
        convert_published(src, tmp_path / "x.pt")
    src.write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError, match=r"w\.pth' is corrupt or not a torch file"):
        convert_published(src, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_key_mapping_table():
    assert map_published_key("backbone.layer1.0.conv1.weight")[0] == \
        "backbone.body.layer1.0.conv1.weight"
    assert map_published_key("pr.gconv_head.bn.running_mean")[0] == \
        "pose_refinement.input_block.norm.running_mean"
    assert map_published_key("pr.gconv_layers.10.gconv2.conv.bias")[0] == \
        "pose_refinement.blocks.10.block2.bias"
    assert map_published_key("pr.gconv_pred.2.weight") is None  # the ReLU has no tensors
    assert map_published_key("optimizer.state") is None


def test_pinet_convert_command(published_state, tmp_path, capsys):
    src = tmp_path / "pub.pth"
    torch.save(published_state, src)
    main([str(src), str(tmp_path / "out.pt"), "--layout", "crowdpose"])
    printed = capsys.readouterr().out
    assert "layout crowdpose, 3 refinement layers, 1895 tensors, convention published" in printed
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "absent.pth"), str(tmp_path / "o.pt")])
    assert exit_info.value.code == 2
    assert "absent.pth': no such file" in capsys.readouterr().err
