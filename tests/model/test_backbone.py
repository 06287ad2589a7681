"""Backbone: timm features upsampled to stride 4 and concatenated (ImageNet weights:
test_pretrained.py)."""

from __future__ import annotations

import pytest
import torch

from pinet_lightning.model.backbone import Backbone

SMALL = "hrnet_w18_small"  # branches 16/32/64/128 -> 240 channels


def test_hrnet_raw_branches_concatenated_at_stride_4():
    bb = Backbone(SMALL)
    assert bb.channels == [16, 32, 64, 128] and bb.reductions == [4, 8, 16, 32]
    assert bb.out_channels == 240
    assert bb.body.incre_modules is None  # raw branch outputs, not the "incre" features
    x = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        out = bb(x)
        branches = bb.body(x)
    assert out.shape == (2, 240, 32, 24)
    # The stride-4 branch is copied as is, the coarser ones upsampled bilinearly.
    assert torch.equal(out[:, :16], branches[0])
    up = torch.nn.functional.interpolate(branches[3], size=(32, 24), mode="bilinear",
                                         align_corners=False)
    assert torch.allclose(out[:, -128:], up)


def test_hrnet_w32_channels():
    # Channel bookkeeping only (no forward): SPEC's 32 + 64 + 128 + 256 = 480.
    bb = Backbone("hrnet_w32")
    assert bb.channels == [32, 64, 128, 256] and bb.out_channels == 480


def test_generic_backbone_drops_stride_2():
    bb = Backbone("resnet18")
    assert bb.reductions == [4, 8, 16, 32] and bb.out_channels == 64 + 128 + 256 + 512
    with torch.no_grad():
        assert bb(torch.randn(1, 3, 64, 64)).shape == (1, 960, 16, 16)


def test_backbone_without_stride_4_is_rejected():
    with pytest.raises(ValueError, match="stride-4"):
        Backbone("vit_tiny_patch16_224")
