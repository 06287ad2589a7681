"""Backbone: a timm feature extractor whose stride >= 4 maps are upsampled to the stride-4
map and concatenated (algorithm.md 3: HRNet-W32 -> 32 + 64 + 128 + 256 = 480 channels at S/4).

HRNet uses its four raw branch outputs (``feature_location=""``), not timm's "incre"
classification-head features. Any other timm model with ``features_only`` support works
too: its stride-2 map, if any, is dropped; a model whose finest map is coarser than stride 4
(e.g. a ViT) is rejected, since PINet's heads and targets live at stride 4.

ImageNet weights (:mod:`pinet_lightning.model.pretrained`): ``pretrained="imagenet"`` (timm's hub
weights, fetched and cached by timm), a local ``.pth`` / ``.safetensors`` file (timm's or the
official HRNet release's), or None (random). HRNet weights are loaded strictly: every backbone
tensor, or an error listing what did not match.
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pinet_lightning.model.pretrained import describe, load_hrnet_weights, resolve_pretrained

__all__ = ["Backbone"]

log = logging.getLogger(__name__)

OUTPUT_STRIDE = 4


class Backbone(nn.Module):
    """Multi-resolution features concatenated at stride 4.

    Args:
        name: a timm model name (``hrnet_w32``, ``hrnet_w18_small_v2``, ``resnet50``, ...).
        pretrained: ``"imagenet"`` (timm's ImageNet weights of ``name``, from the hub or
            timm's cache), the path of a local ImageNet weights file (.pth / .pt /
            .safetensors), or None for random initialization.

    Attributes:
        out_channels: channels of the concatenated map (480 for hrnet_w32).
        channels, reductions: per selected timm feature.
        weights_source: where the weights came from, one line (logged when loaded).
        ignored_keys: the classification-head tensors of the weights file, dropped.
    """

    def __init__(self, name: str = "hrnet_w32", pretrained: str | Path | None = None) -> None:
        super().__init__()
        self.name = name
        self.is_hrnet = name.startswith("hrnet")
        # the weights first: a missing file or an unreachable hub stops before any building
        weights = resolve_pretrained(pretrained, name)
        try:
            if self.is_hrnet:
                self.body = timm.create_model(name, features_only=True, feature_location="",
                                              out_indices=(1, 2, 3, 4))
            else:
                kwargs = {}
                if weights is not None:
                    # timm loads them into the full model (strictly) before wrapping it.
                    kwargs = {"pretrained": True,
                              "pretrained_cfg_overlay": {"state_dict": weights.state}}
                self.body = timm.create_model(name, features_only=True, **kwargs)
        except RuntimeError as err:
            if weights is None:
                raise
            raise RuntimeError(f"could not load {weights.source} into '{name}': {err}. "
                               "Is it an ImageNet checkpoint of this exact model?") from err
        except Exception as err:
            if "Unknown model" in str(err) or isinstance(err, (KeyError, ValueError)):
                raise ValueError(f"timm cannot build '{name}' as a feature "
                                 f"extractor ({err}); pick a timm model name such as "
                                 "hrnet_w32, hrnet_w18_small_v2 or resnet50") from err
            raise
        info = self.body.feature_info
        reductions = list(info.reduction())
        channels = list(info.channels())
        keep = [i for i, r in enumerate(reductions) if r >= OUTPUT_STRIDE]
        if not keep or reductions[keep[0]] != OUTPUT_STRIDE:
            raise ValueError(
                f"'{name}' has feature strides {reductions}; PINet needs a "
                f"stride-{OUTPUT_STRIDE} map (its heads and targets are at input/4). Use a "
                "backbone with stride-4 features (hrnet_*, resnet*, convnext_*, ...).")
        self.keep = keep
        self.channels = [channels[i] for i in keep]
        self.reductions = [reductions[i] for i in keep]
        self.out_channels = sum(self.channels)
        self.ignored_keys: list[str] = []
        counts = None
        if weights is not None and self.is_hrnet:
            counts = load_hrnet_weights(self.body, weights, name)
            own = self.body.state_dict()
            self.ignored_keys = [k for k in weights.state if k not in own]
        self.weights_source = describe(weights, counts)
        if weights is not None:
            log.info("backbone %s: %s", name, self.weights_source)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) normalized images -> (B, out_channels, H/4, W/4)."""
        feats = self.body(images)
        feats = [feats[i] for i in self.keep]
        size = feats[0].shape[-2:]
        ups = [feats[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                            for f in feats[1:]]
        return torch.cat(ups, dim=1)
