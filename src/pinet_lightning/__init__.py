"""pinet-lightning: PINet multi-person pose estimation with PyTorch Lightning and Hydra."""

from pinet_lightning.layouts import Layout, get_layout

__version__ = "0.1.0"
__all__ = ["Layout", "get_layout", "__version__"]
