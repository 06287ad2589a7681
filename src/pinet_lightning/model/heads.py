"""Part-based Pose Generation heads (algorithm.md 3): three 1x1 convolutions on the features."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["PPGHeads"]


class PPGHeads(nn.Module):
    """K keypoint heatmaps, P part heatmaps and P*K*2 offsets from the backbone features.

    Weights start normal(std ``init_std`` = 0.001) and biases 0, so the first predictions
    are close to zero everywhere.

    The heads run in float32 even under bf16 autocast (the backbone stays bf16): bf16 keeps
    8 significant bits, so offsets of 32-128 cells would fall on a grid of 0.25-0.5 cell
    (1-2 input pixels). Three 1x1 convolutions cost little next to the backbone.
    """

    def __init__(self, in_channels: int, num_keypoints: int, num_parts: int,
                 init_std: float = 0.001) -> None:
        super().__init__()
        self.num_keypoints = num_keypoints
        self.num_parts = num_parts
        self.heatmap = nn.Conv2d(in_channels, num_keypoints, 1)
        self.part_heatmap = nn.Conv2d(in_channels, num_parts, 1)
        self.offset = nn.Conv2d(in_channels, num_parts * num_keypoints * 2, 1)
        for conv in (self.heatmap, self.part_heatmap, self.offset):
            nn.init.normal_(conv.weight, std=init_std)
            nn.init.zeros_(conv.bias)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, C, h, w) -> heatmaps (B, K, h, w), part heatmaps (B, P, h, w),
        offsets (B, P*K*2, h, w), all float32."""
        with torch.autocast(features.device.type, enabled=False):
            x = features.float()
            return self.heatmap(x), self.part_heatmap(x), self.offset(x)
