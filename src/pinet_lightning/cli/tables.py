"""Metric tables of the commands: scalar metrics as floats, one row per stage, rich tables
printed and returned as markdown."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from pinet_lightning.evaluation.coco import metric_names

__all__ = ["format_metrics", "metric_table_rows", "print_table", "markdown_table",
           "print_metric_table", "rich_console"]

# every protocol's metrics in display order: CrowdPose's, then COCO's area ranges
METRIC_ORDER = tuple(dict.fromkeys(metric_names("crowdpose") + metric_names("coco")))


def _as_float(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def format_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Scalar metrics as floats (tensors included), others dropped."""
    out = {}
    for key, value in metrics.items():
        number = _as_float(value)
        if number is not None:
            out[str(key)] = number
    return out


def metric_table_rows(metrics: Mapping[str, float]) -> tuple[list[str], list[list[str]]]:
    """(columns, rows): one row per stage (``val``, ``test``), one column per AP/AR metric."""
    stages: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        stage, _, name = key.partition("/")
        if name in METRIC_ORDER:
            stages.setdefault(stage, {})[name] = value
    names = [n for n in METRIC_ORDER if any(n in s for s in stages.values())]
    rows = [[stage] + [_fmt(values.get(n)) for n in names] for stage, values in stages.items()]
    return ["split"] + names, rows


def _fmt(value: float | None) -> str:
    # the evaluators report -1 for a metric without data (e.g. no hard images)
    if value is None or math.isnan(value) or value < 0:
        return "-"
    return f"{value:.4f}"


def rich_console() -> Any:
    """A rich Console; when the output is not a terminal (logs, pipes) it is 140 columns
    wide so that metric tables are not squeezed into 80."""

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 140))
    return console


def print_table(title: str, columns: list[str], rows: list[list[str]],
                label_columns: int = 1) -> str:
    """Print a rich table (the first ``label_columns`` left-aligned, numbers right-aligned);
    returns it as markdown text."""

    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i < label_columns else "right")
    for row in rows:
        table.add_row(*row)
    rich_console().print(table)
    return markdown_table(columns, rows)


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """The same table as markdown text."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def print_metric_table(metrics: Mapping[str, float], title: str = "metrics") -> str:
    """Print the AP/AR metrics as a rich table; returns the table as markdown text."""
    columns, rows = metric_table_rows(metrics)
    return print_table(title, columns, rows) if rows else ""
