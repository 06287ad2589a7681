"""PINet end to end on CPU with the small backbone: shapes, normalization, save/load and an
overfit run on synthetic crowds."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from pinet_lightning.codec.codec import PINetCodec
from pinet_lightning.codec.targets import TARGET_KEYS
from pinet_lightning.core.layouts import get_layout
from pinet_lightning.data.datasets import CocoKeypointDataset
from pinet_lightning.model.checkpoints import load_model, save_model
from pinet_lightning.model.network import PINet
from pinet_lightning.model.refinement import PoseRefinement
from pinet_lightning.training.losses import PINetLoss

SMALL = "hrnet_w18_small"


@pytest.fixture(scope="module")
def crowdpose_net() -> PINet:
    torch.manual_seed(0)
    return PINet("crowdpose", backbone=SMALL, refine_layers=3).eval()


@pytest.mark.parametrize("layout, k", [("crowdpose", 14), ("coco", 17)])
def test_output_shapes(layout, k, crowdpose_net):
    net = crowdpose_net if layout == "crowdpose" else PINet(layout, backbone=SMALL,
                                                           refine_layers=2).eval()
    assert net.layout.num_keypoints == k
    images = torch.randint(0, 256, (2, 3, 128, 96), dtype=torch.uint8)
    with torch.no_grad():
        out = net(images)
    assert out["features"].shape == (2, 240, 32, 24)
    assert out["heatmaps"].shape == (2, k, 32, 24)
    assert out["part_heatmaps"].shape == (2, 3, 32, 24)
    assert out["offsets"].shape == (2, 3 * k * 2, 32, 24)
    poses = torch.rand(5, k, 2) * 20
    cells = torch.randint(0, 24, (5, 2))
    with torch.no_grad():
        corr = net.refine(out["features"], poses, cells, torch.tensor([0, 1, 1, 0, 1]))
    assert corr.shape == (5, k, 2)


def test_uint8_and_float_input_identical(crowdpose_net):
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        a = crowdpose_net(images)
        b = crowdpose_net(images.float())
    for key in a:
        assert torch.equal(a[key], b[key]), key
    norm = crowdpose_net.normalize(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8))
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(norm.flatten(), expected)


def test_bad_input_errors(crowdpose_net):
    with pytest.raises(ValueError, match="multiple of 32"):
        crowdpose_net(torch.zeros(1, 3, 70, 64))
    with pytest.raises(ValueError, match="RGB"):
        crowdpose_net(torch.zeros(1, 1, 64, 64))


def test_save_load_round_trip(tmp_path, crowdpose_net):
    path = tmp_path / "model.pt"
    save_model(path, crowdpose_net, extra={"epoch": 3})
    loaded = load_model(path)
    assert loaded.config == crowdpose_net.config
    assert loaded.layout == get_layout("crowdpose") and loaded.extra == {"epoch": 3}
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    loaded.eval()
    with torch.no_grad():
        a, b = crowdpose_net(images), loaded(images)
        poses = torch.rand(3, 14, 2) * 15
        cells = torch.randint(0, 16, (3, 2))
        bi = torch.zeros(3, dtype=torch.long)
        ra = crowdpose_net.refine(a["features"], poses, cells, bi)
        rb = loaded.refine(b["features"], poses, cells, bi)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(ra, rb)
    # A torch.compile-style wrapper is unwrapped on save.
    wrapper = torch.nn.Module()
    wrapper._orig_mod = crowdpose_net
    save_model(tmp_path / "wrapped.pt", wrapper)
    assert load_model(tmp_path / "wrapped.pt").config == crowdpose_net.config


def test_load_validates(tmp_path, crowdpose_net):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_model(tmp_path / "missing.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="save_model"):
        load_model(tmp_path / "other.pt")
    path = tmp_path / "model.pt"
    save_model(path, crowdpose_net)
    blob = torch.load(path, weights_only=True)
    blob["config"]["refine_layers"] = 2  # weights of 3 blocks no longer fit
    torch.save(blob, path)
    with pytest.raises(RuntimeError, match="do not fit"):
        load_model(path)


def test_pretrained_backbone_file_reaches_the_network(tmp_path):
    full = timm.create_model(SMALL)
    path = tmp_path / "imagenet.pth"
    torch.save(full.state_dict(), path)
    net = PINet("crowdpose", backbone=SMALL, pretrained=str(path))
    assert torch.equal(net.backbone.body.conv1.weight, full.conv1.weight)
    assert net.config["pretrained"] is None
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        PINet("crowdpose", backbone=SMALL, pretrained=str(tmp_path / "absent.pth"))


def _overfit_batch(images_dir, ann, size: int) -> dict[str, torch.Tensor]:
    """4 training samples at ``size`` with augmentation off."""

    off = {"max_rotation": 0, "min_scale": 1.0, "max_scale": 1.0, "max_translate": 0,
           "flip_prob": 0.0}
    codec = PINetCodec("crowdpose", input_size=size, sparse=False)
    ds = CocoKeypointDataset(images_dir, ann, codec=codec, train=True, augmentation=off)
    samples = [ds[i] for i in range(4)]
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples])
            for key in ("image", *TARGET_KEYS)}


@pytest.mark.slow
def test_overfit_four_synthetic_images(synthetic_crowd):
    images_dir, ann = synthetic_crowd
    batch = _overfit_batch(images_dir, ann, size=128)
    assert batch["offset_weights"].sum() > 0
    torch.manual_seed(0)
    net = PINet("crowdpose", backbone=SMALL, refine_layers=1).train()
    criterion = PINetLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    history = []
    for _ in range(150):
        losses = criterion(net(batch["image"]), batch, net)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in losses.items()})
    first, last = history[0], history[-1]
    assert last["loss"] < 0.2 * first["loss"], (first, last)
    assert last["refine"] < first["refine"] and last["offset"] < first["offset"]


def test_head_init_std_reaches_the_ppg_heads():
    net = PINet("crowdpose", backbone="hrnet_w18_small", refine_layers=1, head_init_std=0.05)
    convs = [m for m in net.heads.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs
    for conv in convs:
        assert 0.04 < conv.weight.std().item() < 0.06
        assert torch.count_nonzero(conv.bias) == 0
    assert net.config["head_init_std"] == 0.05


def test_refinement_starts_as_the_published_network():
    """Graph convolutions: W Xavier-uniform with gain 1.414, b uniform in +-1/sqrt(out);
    the readout keeps PyTorch's default initialization (published: plain Conv1d)."""

    torch.manual_seed(0)
    pr = PoseRefinement(480, "crowdpose", num_layers=2)
    xavier = 1.414 * math.sqrt(6 / (480 + 480))
    blocks = [pr.input_block] + [b for res in pr.blocks for b in (res.block1, res.block2)]
    assert len(blocks) == 5
    for block in blocks:
        w, b = block.linear.weight, block.bias
        assert w.abs().max() <= xavier and w.abs().max() > 0.95 * xavier
        assert w.std().item() == pytest.approx(xavier / math.sqrt(3), rel=0.02)
        assert b.abs().max() <= 1 / math.sqrt(480) and b.abs().max() > 0.9 / math.sqrt(480)
    default = 1 / math.sqrt(480)  # nn.Linear / Conv1d: U(+-1/sqrt(fan_in))
    assert pr.output.weight.abs().max() <= default
    assert pr.output.weight.std().item() == pytest.approx(default / math.sqrt(3), rel=0.05)
