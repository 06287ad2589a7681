"""The PINet network (algorithm.md 3): backbone -> PPG heads, plus the Pose Refinement graph
network. Saving and loading it: :mod:`pinet_lightning.model.checkpoints`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from pinet_lightning.codec.conventions import get_convention
from pinet_lightning.core.constants import IMAGENET_MEAN, IMAGENET_STD
from pinet_lightning.core.layouts import Layout, get_layout
from pinet_lightning.model.backbone import OUTPUT_STRIDE, Backbone
from pinet_lightning.model.heads import PPGHeads
from pinet_lightning.model.refinement import PoseRefinement

__all__ = ["PINet"]


class PINet(nn.Module):
    """Pose-level Inference Network.

    Args:
        layout: keypoint layout (name, mapping or Layout): K keypoints, P parts, skeleton.
        backbone: timm model name (``hrnet_w32``).
        pretrained: ImageNet weights for the backbone: ``"imagenet"`` (timm's, from the hub
            or its cache), a local file (timm's or the official HRNet release's), or None
            (random); see :mod:`pinet_lightning.model.pretrained`.
        refine_layers: L residual graph blocks in PR (3 CrowdPose, 2 COCO/OCHuman).
        feature_channels: if set, a 1x1 conv + BN + ReLU projects the concatenated backbone
            features to this width before the heads and PR (None: use them as they are,
            algorithm.md 3).
        head_init_std: the PPG convolutions start normal(0, this) with zero biases (algorithm.md 3).
        convention: the cell/pixel convention the network is trained under (``cell_center``,
            ours; ``published`` for the authors' weights, see
            :mod:`pinet_lightning.codec.conventions`): decoding and the refinement follow it.
    """

    def __init__(self, layout: Layout | str | Mapping[str, Any], backbone: str = "hrnet_w32",
                 pretrained: str | None = None, refine_layers: int = 3,
                 feature_channels: int | None = None, head_init_std: float = 0.001,
                 convention: str = "cell_center") -> None:
        super().__init__()
        self.layout = get_layout(layout)
        self.convention = get_convention(convention)
        self.head_init_std = head_init_std
        self.backbone_name = backbone
        self.refine_layers = refine_layers
        self.feature_channels = feature_channels
        self.backbone = Backbone(backbone, pretrained=pretrained)
        channels = self.backbone.out_channels
        if feature_channels is not None:
            self.neck: nn.Module = nn.Sequential(
                nn.Conv2d(channels, feature_channels, 1, bias=False),
                nn.BatchNorm2d(feature_channels), nn.ReLU(inplace=True))
            channels = feature_channels
        else:
            self.neck = nn.Identity()
        self.out_channels = channels
        k, p = self.layout.num_keypoints, self.layout.num_parts
        self.heads = PPGHeads(channels, k, p, init_std=head_init_std)
        self.pose_refinement = PoseRefinement(channels, self.layout, num_layers=refine_layers,
                                              convention=self.convention)
        # Normalization of 0..255 input, kept out of the state dict.
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (layout as a dict); ``pretrained`` is None since the weights
        travel in the state dict."""
        return {"layout": self.layout.to_dict(), "backbone": self.backbone_name,
                "pretrained": None, "refine_layers": self.refine_layers,
                "feature_channels": self.feature_channels, "head_init_std": self.head_init_std,
                "convention": self.convention.name}

    @property
    def output_stride(self) -> int:
        """Network-input pixels per output cell (4)."""
        return OUTPUT_STRIDE

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 or float 0..255 (B, 3, H, W) -> ImageNet-normalized float."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) RGB, got "
                             f"{tuple(images.shape)}")
        return (images.float() - self.pixel_mean) / self.pixel_std

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """(B, 3, H, W) 0..255 images, H and W multiples of 32 -> features (B, C, h, w),
        heatmaps (B, K, h, w), part_heatmaps (B, P, h, w), offsets (B, P*K*2, h, w)."""
        h, w = images.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(f"input size {h}x{w} must be a multiple of 32 "
                             "(inference_resize rounds up to 64)")
        features = self.neck(self.backbone(self.normalize(images)))
        heatmaps, part_heatmaps, offsets = self.heads(features)
        return {"features": features, "heatmaps": heatmaps, "part_heatmaps": part_heatmaps,
                "offsets": offsets}

    def refine(self, features: Tensor, poses: Tensor, cells: Tensor, batch_index: Tensor,
               valid: Tensor | None = None) -> Tensor:
        """PR correction (N, K, 2) to the coarse offsets: refined offset = coarse offset +
        correction, refined pose = coarse pose - correction."""
        return self.pose_refinement(features, poses, cells, batch_index, valid)
