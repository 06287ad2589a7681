"""Constants every stage shares, at the bottom of the import graph."""

from __future__ import annotations

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD"]

# The ImageNet statistics the backbones were trained with; the network normalizes 0..255
# input with them, and the published flip test pads its mirror with the mean pixel.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
