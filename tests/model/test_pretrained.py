"""ImageNet weights of the backbone (pretrained.py): ``imagenet`` through timm's hub support
(mocked: nothing reaches the network), timm-format and official-HRNet-format files loaded
strictly, and the errors that name what did not fit."""

from __future__ import annotations

import logging

import pytest
import timm
import timm.models._hub as timm_hub
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import save_file

from pinet_lightning.model.backbone import Backbone
from pinet_lightning.model.pretrained import HRNET_HEAD, PretrainedWeightsError
from pinet_lightning.training.module import PINetModule

SMALL = "hrnet_w18_small"
SMALL_HUB = "timm/hrnet_w18_small.gluon_in1k"  # timm's default weights of hrnet_w18_small


def _imagenet_state(name: str = SMALL, seed: int = 1) -> dict[str, torch.Tensor]:
    """An "ImageNet" state dict of the full classification model (head included): its names
    and shapes (read off a model on the meta device: no initialization), random values."""
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in timm.create_model(name).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) if dtype.is_floating_point
            else torch.randint(0, 1000, shape, generator=gen, dtype=dtype)
            for k, (shape, dtype) in shapes.items()}


def _same_backbone(bb: Backbone, state: dict[str, torch.Tensor]) -> None:
    body = bb.body.state_dict()
    for key, value in body.items():
        assert torch.equal(value, state[key]), key
    assert sorted(bb.ignored_keys) == sorted(k for k in state if k.split(".")[0] in HRNET_HEAD)


@pytest.fixture
def offline_hub(monkeypatch):
    """timm's hub download as it fails with no internet and nothing cached; the calls made."""
    calls = []

    def unreachable(repo_id, filename=None, **kwargs):
        calls.append((repo_id, filename))
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on "
                                      "the Hub and we cannot find the requested files in the "
                                      "local cache.")

    monkeypatch.setattr(timm_hub, "hf_hub_download", unreachable)
    return calls


def test_imagenet_offline_fails_at_once_naming_the_file_option(offline_hub, monkeypatch):
    built = []
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: built.append(a) or create(*a, **k))
    with pytest.raises(PretrainedWeightsError) as err:
        Backbone(SMALL, pretrained="imagenet")
    text = str(err.value)
    assert "could not fetch the ImageNet weights" in text and SMALL_HUB in text
    assert "no internet" in text and "Nothing falls back to random weights" in text
    assert "model.network.pretrained=/path/to/hrnet_w18_small.pth" in text
    assert "hrnet_w32-36af842e.pth" in text and "LocalEntryNotFoundError" in text
    assert offline_hub and {repo for repo, _ in offline_hub} == {SMALL_HUB}
    assert not built  # stopped before building the network


def test_imagenet_from_timms_hub_cache(monkeypatch, tmp_path, caplog):
    # the hub (mocked) hands timm a cached safetensors file: loaded strictly, logged with its id
    state = _imagenet_state()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    asked = []
    monkeypatch.setattr(timm_hub, "hf_hub_download",
                        lambda repo_id, filename=None, **k: asked.append(filename) or str(path))
    with caplog.at_level(logging.INFO, logger="pinet_lightning.model.backbone"):
        bb = Backbone(SMALL, pretrained="imagenet")
    _same_backbone(bb, state)
    assert asked and set(asked) <= {"model.safetensors", "pytorch_model.bin"}  # timm's names
    line = f"ImageNet weights from hub {SMALL_HUB}: {len(bb.body.state_dict())} tensors loaded"
    assert line in bb.weights_source and line in caplog.text


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_format_file_loads_every_backbone_tensor(tmp_path, suffix, caplog):
    state = _imagenet_state()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with caplog.at_level(logging.INFO, logger="pinet_lightning.model.backbone"):
        bb = Backbone(SMALL, pretrained=str(path))
    _same_backbone(bb, state)
    assert not torch.equal(Backbone(SMALL).body.conv1.weight, state["conv1.weight"])
    n = len(bb.body.state_dict())
    assert f"{path}: {n} tensors loaded, every one of the backbone" in caplog.text


def test_official_hrnet_w32_imagenet_file_loads_every_backbone_tensor(tmp_path):
    # The official release (HRNet-Image-Classification's cls_hrnet, the file the published PINet
    # loads as hrnet_w32-36af842e.pth) is the classification network's plain state dict. Its
    # names, read off cls_hrnet.py: conv1/bn1/conv2/bn2, layer1.<i>.{conv,bn}{1,2,3} and
    # .downsample, transition<s>.<b>.<i>, stage<s>.<m>.branches.<b>.<i>.{conv,bn}{1,2},
    # stage<s>.<m>.fuse_layers.<i>.<j>..., and the head incre_modules / downsamp_modules /
    # final_layer / classifier; timm's hrnet.py kept every one of them.
    official = _imagenet_state("hrnet_w32", seed=3)
    for key in ("conv1.weight", "bn2.running_var", "layer1.0.downsample.0.weight",
                "layer1.3.bn3.num_batches_tracked", "transition1.1.0.0.weight",
                "transition3.3.0.1.running_mean", "stage2.0.branches.1.3.conv2.weight",
                "stage3.3.fuse_layers.2.0.1.0.weight", "stage4.2.fuse_layers.0.3.1.bias",
                "incre_modules.3.0.conv3.weight", "downsamp_modules.2.1.num_batches_tracked",
                "final_layer.0.weight", "classifier.weight"):
        assert key in official, key
    path = tmp_path / "hrnet_w32-36af842e.pth"
    torch.save(official, path)
    bb = Backbone("hrnet_w32", pretrained=str(path))
    _same_backbone(bb, official)
    assert len(bb.body.state_dict()) == 1830 and len(bb.ignored_keys) == 126


@pytest.mark.parametrize("wrap", ["checkpoint", "dataparallel", "no_counters"])
def test_checkpoint_forms_of_the_same_weights(tmp_path, wrap):
    # the official training script's checkpoint.pth.tar ({"state_dict": ..., "epoch": ...}),
    # a DataParallel state dict (module.*), a release without BatchNorm's step counters
    state = _imagenet_state()
    if wrap == "checkpoint":
        blob = {"epoch": 100, "model": "cls_hrnet", "state_dict": state, "perf": 0.7}
    elif wrap == "dataparallel":
        blob = {f"module.{k}": v for k, v in state.items()}
    else:
        blob = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "w.pth"
    torch.save(blob, path)
    bb = Backbone(SMALL, pretrained=str(path))
    body = bb.body.state_dict()
    for key, value in body.items():
        if key.endswith("num_batches_tracked") and wrap == "no_counters":
            continue
        assert torch.equal(value, state[key]), key


def test_a_wrong_shape_is_named(tmp_path):
    state = _imagenet_state()
    key = "stage2.0.branches.0.0.conv1.weight"
    state[key] = torch.zeros(7, 7, 3, 3)
    path = tmp_path / "w18.pth"
    torch.save(state, path)
    with pytest.raises(PretrainedWeightsError, match="1 tensors have the wrong shape") as err:
        Backbone(SMALL, pretrained=str(path))
    assert f"{key} (file (7, 7, 3, 3), backbone (16, 16, 3, 3))" in str(err.value)
    assert str(path) in str(err.value)


def test_missing_and_unknown_tensors_are_listed(tmp_path):
    state = _imagenet_state()
    del state["conv1.weight"]
    state["stage9.extra.weight"] = torch.zeros(1)  # not the head: not dropped, not known
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(PretrainedWeightsError) as err:
        Backbone(SMALL, pretrained=str(path))
    text = str(err.value)
    assert "are not in the file: conv1.weight" in text
    assert "1 tensors of the file are not the backbone's: stage9.extra.weight" in text
    assert "nothing was loaded" in text


def test_a_missing_file_and_an_unsafe_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.pth.*model.network.pretrained=imagenet"):
        Backbone(SMALL, pretrained=str(tmp_path / "nope.pth"))
    path = tmp_path / "pickled.pth"
    torch.save({"conv1.weight": torch.zeros(1), "note": object()}, path)
    with pytest.raises(PretrainedWeightsError, match="holds Python objects"):
        Backbone(SMALL, pretrained=str(path))


def test_random_initialisation_is_said_once(caplog):
    with caplog.at_level(logging.INFO, logger="pinet_lightning"):
        PINetModule("crowdpose", network={"backbone": SMALL, "pretrained": None,
                                          "refine_layers": 1})
    lines = [r.getMessage() for r in caplog.records if "backbone" in r.getMessage()]
    assert lines == [f"backbone {SMALL}: randomly initialised (model.network.pretrained=null)"]
