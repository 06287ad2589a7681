"""``pinet-export``: a checkpoint and its decoding as one ONNX graph.

    pinet-export CKPT OUT.onnx [--input-size S] [--flip/--no-flip] [--scales 1.0]

CKPT is any file ``Predictor.from_checkpoint`` loads (``model.pt``, a Lightning ``.ckpt``, the
published weights, converted or not). ``Predictor.from_checkpoint("OUT.onnx")`` and
``pinet-predict ckpt_path=OUT.onnx`` run the graph with onnxruntime. See
:mod:`pinet_lightning.inference.export` for what the graph computes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pinet_lightning.inference.export import export_onnx

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``pinet-export``."""
    parser = argparse.ArgumentParser(
        prog="pinet-export",
        description="Export a PINet checkpoint with its decoding (flip test, peaks, "
                    "refinement, scores) to one ONNX graph: uint8 images (B, 3, S, S) -> "
                    "candidates, scores, valid. Pose fusion runs outside (Predictor).")
    parser.add_argument("checkpoint", help="model.pt, Lightning .ckpt or published weights")
    parser.add_argument("output", help="the .onnx file to write")
    parser.add_argument("--input-size", type=int, default=None,
                        help="S of the S x S input (default: the size the checkpoint records, "
                             "else 512); a multiple of 64")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help="flip test in the graph (default: the checkpoint's setting, on)")
    parser.add_argument("--scales", type=float, nargs="+", default=None,
                        help="only 1.0: the multi-scale test cannot be exported (default: the "
                             "checkpoint's setting)")
    parser.add_argument("--opset", type=int, default=None,
                        help="ONNX opset (default: the exporter's)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow a file that needs Python's full unpickler (can run code)")
    args = parser.parse_args(argv)
    if not args.output.lower().endswith(".onnx"):
        parser.exit(2, f"pinet-export: the output must be a .onnx file, got {args.output}\n")
    overrides = {} if args.scales is None else {"scales": tuple(args.scales)}
    start = time.perf_counter()
    try:
        out = export_onnx(args.checkpoint, args.output, input_size=args.input_size,
                          flip_test=args.flip, trust_checkpoint=args.trust_checkpoint,
                          opset_version=args.opset, **overrides)
    except (OSError, ValueError, ImportError) as err:
        parser.exit(2, f"pinet-export: {err}\n")
    meta = _summary(out)
    print(f"pinet-export: {args.checkpoint} -> {out} ({Path(out).stat().st_size / 2**20:.1f} "
          f"MiB, {time.perf_counter() - start:.0f} s): {meta}")


def _summary(path: Path) -> str:
    import onnx  # optional dependency

    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    return (f"input images uint8 (B, 3, {props['input_size']}, {props['input_size']}), "
            f"convention {props['convention']}, opset "
            f"{max(o.version for o in model.opset_import if o.domain in ('', 'ai.onnx'))}")


if __name__ == "__main__":
    main()
