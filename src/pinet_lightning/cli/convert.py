"""``pinet-convert SRC DST [--layout ...]``: the published PINet weights as a ``model.pt``
(:func:`~pinet_lightning.model.checkpoints.convert_published`)."""

from __future__ import annotations

import argparse
import shlex

from pinet_lightning.core.files import UntrustedCheckpointError
from pinet_lightning.model.checkpoints import convert_published, load_model
from pinet_lightning.model.published import PUBLISHED_INPUT_SIZE

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``pinet-convert SRC DST [--layout ...]``."""
    parser = argparse.ArgumentParser(
        prog="pinet-convert",
        description="Convert the published PINet weights (kennethwdk/PINet) into a model.pt "
                    "that Predictor.from_checkpoint, pinet-eval and pinet-predict load.")
    parser.add_argument("src", help="the published weights file (.pth / .pth.tar)")
    parser.add_argument("dst", help="the model.pt to write")
    parser.add_argument("--layout", choices=["crowdpose", "coco", "ochuman"], default=None,
                        help="keypoint layout (default: read off the file)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow a file that needs Python's full unpickler (can run code)")
    args = parser.parse_args(argv)
    try:
        dst = convert_published(args.src, args.dst, args.layout, args.trust_checkpoint)
    except UntrustedCheckpointError as err:  # this command's way to trust a file is its flag
        parser.exit(2, f"pinet-convert: {err.path} holds Python objects, and loading them can "
                       "run code. It was refused. Only if you trust where it comes from, run "
                       f"again with --trust-checkpoint: pinet-convert {shlex.quote(args.src)} "
                       f"{shlex.quote(args.dst)} --trust-checkpoint\n")
    except (OSError, ValueError) as err:
        parser.exit(2, f"pinet-convert: {err}\n")
    net = load_model(dst)
    print(f"pinet-convert: {args.src} -> {dst}: layout {net.layout.name}, "
          f"{net.refine_layers} refinement layers, {len(net.state_dict())} tensors, "
          f"convention {net.convention.name}, input size {PUBLISHED_INPUT_SIZE}")


if __name__ == "__main__":
    main()
