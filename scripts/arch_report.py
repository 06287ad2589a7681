"""Architecture figures of a checkout: modules and lines, import cycles, imports that run back
up the stage order, imports inside functions, the longest functions.

    python scripts/arch_report.py                 # this checkout
    python scripts/arch_report.py /path/to/checkout

The stages, bottom to top (docs/architecture.md): core, codec, model | evaluation,
data | inference, training, cli (``a | b``: siblings that must not import each other). A
checkout of the earlier flat layout (``pinet_lightning/<module>.py``) is read with the stage
each of its modules moved to, so that the two layouts are measured alike. ``lint-imports``
enforces the contracts; this script only counts.
"""

from __future__ import annotations

import argparse
import ast
from collections import defaultdict
from pathlib import Path

import networkx as nx

PACKAGE = "pinet_lightning"
# rank of each stage, and the siblings of one rank that must stay independent
STAGES = {"core": 0, "codec": 1, "model": 2, "evaluation": 2, "data": 3, "inference": 3,
          "training": 4, "cli": 5}
# the stage of each module of the flat layout (before the stage packages)
FLAT = {
    "layouts": "core", "images": "core", "sampling": "core", "annotations": "core",
    "config": "core", "atomic": "core", "people": "core", "sync_debug": "core",
    "conventions": "codec", "targets": "codec",
    "backbone": "model", "heads": "model", "refinement": "model", "network": "model",
    "checkpoints": "model", "convert": "model", "pretrained": "model",
    "evaluation": "evaluation",
    "augmentation": "data", "synthetic": "data", "datasets": "data", "datamodule": "data",
    "decoding": "inference", "fusion": "inference", "predictor": "inference",
    "visualize": "inference",
    "proposals": "training", "losses": "training", "module": "training",
    "callbacks": "training", "checkpoint_io": "training",
}
# optional extras, imported where they are used (pyproject: TID253's list)
OPTIONAL = ("onnx", "onnxruntime", "onnxscript", "submitit", "optuna", "hydra_plugins", "mutmut")


def _modules(root: Path) -> dict[str, Path]:
    mods = {}
    for path in sorted((root / "src" / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root / "src").with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if ".conf" not in name:
            mods[name] = path
    return mods


def _stage(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the package root
    return parts[1] if parts[1] in STAGES else FLAT.get(parts[1])


def _targets(node: ast.ImportFrom | ast.Import, module: str, is_pkg: bool,
             mods: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            here = module.split(".")[: len(module.split(".")) - node.level + int(is_pkg)]
            base = ".".join(here + ([node.module] if node.module else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                 for a in node.names]
    out = []
    for name in names:
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in mods and name != PACKAGE:
            out.append(name)
    return out


def report(root: Path) -> dict[str, object]:
    mods = _modules(root)
    graph = nx.DiGraph()
    inner, longest = [], []
    lines = 0
    for name, path in mods.items():
        text = path.read_text()
        lines += len(text.splitlines())
        tree = ast.parse(text)
        graph.add_node(name)
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                longest.append((fn.end_lineno - fn.lineno + 1, f"{name}.{fn.name}"))
                for sub in ast.walk(fn):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        first = (sub.module if isinstance(sub, ast.ImportFrom)
                                 else sub.names[0].name) or ""
                        if not first.startswith(OPTIONAL):
                            inner.append(f"{name}:{sub.lineno}")
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skip:
                for target in _targets(node, name, path.name == "__init__.py", mods):
                    if target != name:
                        graph.add_edge(name, target)
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    upward = []
    for a, b in graph.edges:
        sa, sb = _stage(a), _stage(b)
        if sa is None or sb is None or sa == sb:
            continue
        if STAGES[sa] < STAGES[sb] or STAGES[sa] == STAGES[sb]:
            upward.append(f"{a} -> {b}")
    by_stage = defaultdict(int)
    for name in mods:
        by_stage[_stage(name) or "(root)"] += 1
    longest.sort(reverse=True)
    return {"modules": len(mods), "lines": lines, "modules per stage": dict(by_stage),
            "import cycles": cycles, "imports running back up": sorted(upward),
            "imports inside functions": inner, "longest functions": longest[:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parents[1]))
    figures = report(Path(parser.parse_args().root))
    for key, value in figures.items():
        if isinstance(value, list):
            print(f"{key}: {len(value)}")
            for item in value[:12]:
                print(f"    {item}")
        else:
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
