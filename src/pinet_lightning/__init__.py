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
    "Layout": "layouts",
    "get_layout": "layouts",
    "register_layout": "layouts",
    "available_layouts": "layouts",
    # training targets (codec)
    "encode_targets": "targets",
    "PINetTargetCodec": "targets",
    # data
    "generate_synthetic_crowd": "synthetic",
    "CocoKeypointDataset": "datasets",
    "dataset_paths": "datasets",
    "PINetDataModule": "datamodule",
    # network
    "PINet": "network",
    "save_model": "network",
    "load_model": "network",
    "PINetLoss": "losses",
    "PINetModule": "module",
    # inference
    "DecodeConfig": "decoding",
    "predict_poses": "decoding",
    "pose_fusion": "fusion",
    "oks_nms": "fusion",
    "oks_matrix": "fusion",
    "evaluate_keypoints": "evaluation",
    "to_coco_results": "evaluation",
    "Predictor": "predictor",
    "convert_published": "convert",
    "export_onnx": "export",
    "OnnxPINet": "onnx_model",
    "load_network": "checkpoints",
    "Person": "predictor",
    "load_image": "predictor",
    "draw_poses": "visualize",
}

__all__ = [  # literal, so linters see the TYPE_CHECKING imports as re-exports
    "__version__",
    "Layout",
    "get_layout",
    "register_layout",
    "available_layouts",
    "encode_targets",
    "PINetTargetCodec",
    "generate_synthetic_crowd",
    "CocoKeypointDataset",
    "dataset_paths",
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
    from pinet_lightning.checkpoints import load_network
    from pinet_lightning.convert import convert_published
    from pinet_lightning.datamodule import PINetDataModule
    from pinet_lightning.datasets import CocoKeypointDataset, dataset_paths
    from pinet_lightning.decoding import DecodeConfig, predict_poses
    from pinet_lightning.evaluation import evaluate_keypoints, to_coco_results
    from pinet_lightning.export import export_onnx
    from pinet_lightning.fusion import oks_matrix, oks_nms, pose_fusion
    from pinet_lightning.layouts import Layout, available_layouts, get_layout, register_layout
    from pinet_lightning.losses import PINetLoss
    from pinet_lightning.module import PINetModule
    from pinet_lightning.network import PINet, load_model, save_model
    from pinet_lightning.onnx_model import OnnxPINet
    from pinet_lightning.predictor import Person, Predictor, load_image
    from pinet_lightning.synthetic import generate_synthetic_crowd
    from pinet_lightning.targets import PINetTargetCodec, encode_targets
    from pinet_lightning.visualize import draw_poses
