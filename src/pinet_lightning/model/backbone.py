"""Backbone: a timm feature extractor whose stride >= 4 maps are upsampled to the stride-4
map and concatenated (algorithm.md 3: HRNet-W32 -> 32 + 64 + 128 + 256 = 480 channels at S/4).

HRNet uses its four raw branch outputs (``feature_location=""``), not timm's "incre"
classification-head features. Any other timm model with ``features_only`` support works
too: its stride-2 map, if any, is dropped; a model whose finest map is coarser than stride 4
(e.g. a ViT) is rejected, since PINet's heads and targets live at stride 4.

ImageNet weights come from a local file only (``pretrained="path.pth|.safetensors"``);
there is no download at run time.
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models import load_state_dict
from torch import Tensor, nn

__all__ = ["Backbone"]

log = logging.getLogger(__name__)

OUTPUT_STRIDE = 4


class Backbone(nn.Module):
    """Multi-resolution features concatenated at stride 4.

    Args:
        name: a timm model name (``hrnet_w32``, ``hrnet_w18_small_v2``, ``resnet50``, ...).
        pretrained: path of a local ImageNet weights file (.pth / .pt / .safetensors), or
            None for random initialization.

    Attributes:
        out_channels: channels of the concatenated map (480 for hrnet_w32).
        channels, reductions: per selected timm feature.
    """

    def __init__(self, name: str = "hrnet_w32", pretrained: str | None = None) -> None:
        super().__init__()
        self.name = name
        if pretrained is not None:
            path = Path(pretrained).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"pretrained weights file '{path}' not found. Pass the path "
                    f"of a local ImageNet checkpoint of '{name}' (.pth or .safetensors, e.g. "
                    "saved from timm on a machine with internet), or pretrained=None for "
                    "random initialization; nothing is downloaded at run time.")
        self.is_hrnet = name.startswith("hrnet")
        try:
            if self.is_hrnet:
                self.body = timm.create_model(name, features_only=True, feature_location="",
                                              out_indices=(1, 2, 3, 4))
            else:
                kwargs = {}
                if pretrained is not None:
                    # timm loads the file into the full model (strictly) before wrapping it.
                    kwargs = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}
                self.body = timm.create_model(name, features_only=True, **kwargs)
        except RuntimeError as err:
            if pretrained is None:
                raise
            raise RuntimeError(f"could not load '{path}' into '{name}': {err}. "
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
        if pretrained is not None and self.is_hrnet:
            self._load_hrnet(path)

    def _load_hrnet(self, path: Path) -> None:
        """Load an HRNet ImageNet checkpoint; the classification head's keys are ignored,
        any missing backbone key is an error."""

        state = load_state_dict(str(path))
        state = {k.removeprefix("module.").removeprefix("_orig_mod."): v
                 for k, v in state.items()}
        result = self.body.load_state_dict(state, strict=False)
        if result.missing_keys:
            shown = ", ".join(result.missing_keys[:8])
            raise RuntimeError(
                f"'{path}' lacks {len(result.missing_keys)} weights of "
                f"'{self.name}' (e.g. {shown}); is it an ImageNet checkpoint of this model?")
        self.ignored_keys = list(result.unexpected_keys)
        log.info("loaded %s into %s (%d classification-head keys ignored)", path, self.name,
                 len(self.ignored_keys))

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) normalized images -> (B, out_channels, H/4, W/4)."""
        feats = self.body(images)
        feats = [feats[i] for i in self.keep]
        size = feats[0].shape[-2:]
        ups = [feats[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                            for f in feats[1:]]
        return torch.cat(ups, dim=1)
