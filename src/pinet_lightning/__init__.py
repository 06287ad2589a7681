"""pinet-lightning: PINet multi-person pose estimation with PyTorch Lightning and Hydra.

The public API, usable without Hydra::

    from pinet_lightning import Predictor
    predictor = Predictor.from_checkpoint("outputs/.../checkpoints/model.pt")
    people = predictor("street.jpg")          # list[Person]: keypoints (K, 3), score

    from pinet_lightning import PINet, get_layout, save_model, load_model
    net = PINet("crowdpose", backbone="hrnet_w32", pretrained="hrnet_w32.pth")

Names are imported on first use, so ``import pinet_lightning`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # keypoint layouts
    "Layout": "core.layouts",
    "get_layout": "core.layouts",
    "register_layout": "core.layouts",
    "available_layouts": "core.layouts",
    # the frame and the training targets (codec)
    "PINetCodec": "codec.codec",
    "encode_targets": "codec.targets",
    "PINetTargetCodec": "codec.targets",
    # data
    "generate_synthetic_crowd": "data.synthetic",
    "CocoKeypointDataset": "data.datasets",
    "PINetDataModule": "data.datamodule",
    # network
    "PINet": "model.network",
    "save_model": "model.checkpoints",
    "load_model": "model.checkpoints",
    "PINetLoss": "training.losses",
    "PINetModule": "training.module",
    # inference
    "DecodeConfig": "inference.decoding",
    "predict_poses": "inference.decoding",
    "pose_fusion": "inference.fusion",
    "oks_nms": "inference.fusion",
    "oks_matrix": "inference.fusion",
    "evaluate_keypoints": "evaluation.coco",
    "to_coco_results": "evaluation.coco",
    "Predictor": "inference.predictor",
    "export_onnx": "inference.export",
    "OnnxPINet": "inference.onnx_model",
    "convert_published": "model.checkpoints",
    "load_network": "model.checkpoints",
    "Person": "inference.predictor",
    "load_image": "inference.predictor",
    "draw_poses": "inference.visualize",
}

__all__ = [  # literal, so linters see the TYPE_CHECKING imports as re-exports
    "__version__",
    "Layout",
    "get_layout",
    "register_layout",
    "available_layouts",
    "PINetCodec",
    "encode_targets",
    "PINetTargetCodec",
    "generate_synthetic_crowd",
    "CocoKeypointDataset",
    "PINetDataModule",
    "PINet",
    "save_model",
    "load_model",
    "PINetLoss",
    "PINetModule",
    "DecodeConfig",
    "predict_poses",
    "pose_fusion",
    "oks_nms",
    "oks_matrix",
    "evaluate_keypoints",
    "to_coco_results",
    "Predictor",
    "Person",
    "convert_published",
    "export_onnx",
    "OnnxPINet",
    "load_network",
    "load_image",
    "draw_poses",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pinet_lightning' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"pinet_lightning.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers and IDEs see the real objects
    from pinet_lightning.codec.codec import PINetCodec
    from pinet_lightning.codec.targets import PINetTargetCodec, encode_targets
    from pinet_lightning.core.layouts import Layout, available_layouts, get_layout, register_layout
    from pinet_lightning.data.datamodule import PINetDataModule
    from pinet_lightning.data.datasets import CocoKeypointDataset
    from pinet_lightning.data.synthetic import generate_synthetic_crowd
    from pinet_lightning.evaluation.coco import evaluate_keypoints, to_coco_results
    from pinet_lightning.inference.decoding import DecodeConfig, predict_poses
    from pinet_lightning.inference.export import export_onnx
    from pinet_lightning.inference.fusion import oks_matrix, oks_nms, pose_fusion
    from pinet_lightning.inference.onnx_model import OnnxPINet
    from pinet_lightning.inference.predictor import Person, Predictor, load_image
    from pinet_lightning.inference.visualize import draw_poses
    from pinet_lightning.model.checkpoints import (
        convert_published,
        load_model,
        load_network,
        save_model,
    )
    from pinet_lightning.model.network import PINet
    from pinet_lightning.training.losses import PINetLoss
    from pinet_lightning.training.module import PINetModule
