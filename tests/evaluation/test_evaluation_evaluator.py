"""KeypointEvaluator and the result merging behind DDP evaluation, in one process: known AP
through the evaluator object, the merged images and pose counts, first copies of padded
duplicates, and an evaluator error shared with every rank."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch.distributed as dist
from test_evaluation_known_ap import COCO_SIGMAS, CROWD_SIGMAS, _moved_people

from pinet_lightning.evaluation.coco import (
    KeypointEvaluator,
    _all_gather_objects,
    merge_gathered_results,
)


class _Rank0:
    """A one-process stand-in for a Lightning strategy (rank 0 of 1)."""

    is_global_zero = True

    def __init__(self) -> None:
        self.broadcasts: list = []

    def broadcast(self, obj, src=0):
        self.broadcasts.append((obj, src))
        return obj


def _gt_file(tmp_path: Path, sigmas, factor: float) -> tuple[Path, list[dict]]:
    gt, preds = _moved_people(sigmas, factor)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return path, preds


def test_evaluator_settings_and_a_known_ap(tmp_path):
    path, preds = _gt_file(tmp_path, CROWD_SIGMAS, 0.53)
    ev = KeypointEvaluator(str(path), "CrowdPose", tuple(CROWD_SIGMAS))
    assert ev.protocol == "crowdpose" and ev.skip_invalid is False
    assert KeypointEvaluator(str(path)).protocol == "coco"
    with pytest.raises(ValueError, match="unknown protocol 'mpii'"):
        KeypointEvaluator(str(path), "mpii")
    out = tmp_path / "res" / "val.json"
    evaluation = ev(preds, results_path=out)
    assert evaluation.metrics["AP"] == pytest.approx(0.5)
    assert evaluation.results_path == out and json.loads(out.read_text())
    assert ev(preds).results_path is None
    # image_ids restrict the evaluation: only image 1 and its predictions.
    only = [p for p in preds if p["image_id"] == 1]
    assert ev(only, image_ids=[1]).metrics["AR"] == pytest.approx(0.5)


def test_merge_keeps_the_first_copy_and_sorts_by_image():
    a = {3: [{"image_id": 3, "r": "a"}], 1: [{"image_id": 1, "r": "a"}], 2: []}
    b = {3: [{"image_id": 3, "r": "b"}], 4: [{"image_id": 4, "r": "b"},
                                             {"image_id": 4, "r": "b2"}]}
    flat, ids = merge_gathered_results([a, b])
    assert ids == [1, 2, 3, 4]
    assert [(r["image_id"], r["r"]) for r in flat] == [(1, "a"), (3, "a"), (4, "b"),
                                                       (4, "b2")]


def test_gather_and_evaluate_in_one_process(tmp_path):
    path, preds = _gt_file(tmp_path, COCO_SIGMAS, 1.0)
    ev = KeypointEvaluator(str(path), "coco", tuple(COCO_SIGMAS))
    local = {1: [p for p in preds if p["image_id"] == 1],
             2: [p for p in preds if p["image_id"] == 2]}
    strategy = _Rank0()
    out = tmp_path / "r.json"
    evaluation = ev.gather_and_evaluate(local, strategy, out)
    assert evaluation.metrics["AP"] == pytest.approx(0.5)
    assert evaluation.metrics["images"] == 2.0 and evaluation.metrics["poses"] == 4.0
    assert all(type(v) is float for v in evaluation.metrics.values())
    assert evaluation.results_path == out and len(json.loads(out.read_text())) == 4
    (payload, src), = strategy.broadcasts
    assert src == 0 and payload["results_path"] == str(out)
    # Only the images the ranks evaluated count: image 2 alone is all found.
    alone = ev.gather_and_evaluate({2: local[2]}, _Rank0())
    assert alone.metrics["AR"] == pytest.approx(0.5) and alone.metrics["images"] == 1.0
    assert alone.results_path is None
    # A rank that is not rank 0 takes rank 0's payload.
    other = SimpleNamespace(is_global_zero=False,
                            broadcast=lambda obj, src=0: {"metrics": {"AP": 0.25},
                                                          "results_path": None})
    assert ev.gather_and_evaluate(local, other).metrics == {"AP": 0.25}


def test_an_evaluator_error_reaches_every_rank(tmp_path):
    path, preds = _gt_file(tmp_path, COCO_SIGMAS, 1.0)
    ev = KeypointEvaluator(str(path), "coco", tuple(COCO_SIGMAS))
    bad = {1: [dict(preds[0], image_id=99)]}
    with pytest.raises(RuntimeError, match=r"evaluation of .*gt.json failed on rank 0: "
                                           r"ValueError: evaluation: predictions: "):
        ev.gather_and_evaluate(bad, _Rank0())
    other = SimpleNamespace(is_global_zero=False,
                            broadcast=lambda obj, src=0: {"error": "ValueError: boom"})
    with pytest.raises(RuntimeError, match="failed on rank 0: ValueError: boom"):
        ev.gather_and_evaluate(bad, other)


def test_gather_under_torch_distributed_of_one_process(tmp_path):
    assert _all_gather_objects({1: []}) == [{1: []}]  # outside torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        assert _all_gather_objects({7: ["x"]}) == [{7: ["x"]}]
    finally:
        dist.destroy_process_group()


def test_evaluator_passes_its_sigmas_and_skip_invalid(tmp_path):
    sigmas = np.full(17, 0.1)
    gt, preds = _moved_people(sigmas, 1.0)
    gt["annotations"][2]["keypoints"][0] = None  # image 2 holds an invalid record
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    ev = KeypointEvaluator(str(path), "coco", tuple(sigmas), skip_invalid=True)
    assert ev(preds).metrics["AP"] == pytest.approx(0.5)  # its sigmas; image 2 left out
    with pytest.raises(ValueError, match="invalid records"):
        KeypointEvaluator(str(path), "coco", tuple(sigmas))(preds)
