"""Evaluation inputs at their edges: given and missing areas, the caller's data untouched,
quiet evaluators, ground truths without annotations, image filters, result formatting and
the error messages."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from test_evaluation_known_ap import COCO_SIGMAS, CROWD_SIGMAS, _moved_people

from pinet_lightning.evaluation.coco import evaluate_keypoints, metric_names, to_coco_results

COCO_KEYS = ("AP", "AP50", "AP75", "AR", "AR50", "AR75", "AP_M", "AP_L", "AR_M", "AR_L")
CROWD_KEYS = ("AP", "AP50", "AP75", "AR", "AR50", "AR75", "AP_easy", "AP_medium", "AP_hard")


def test_metric_names_and_default_protocol():
    assert metric_names("coco") == COCO_KEYS and metric_names("OCHuman") == COCO_KEYS
    assert metric_names("crowdpose") == CROWD_KEYS
    gt, preds = _moved_people(COCO_SIGMAS, 1.0)
    assert tuple(evaluate_keypoints(gt, preds)) == COCO_KEYS  # coco by default


def test_coco_protocol_reads_the_annotation_area_and_fills_a_missing_one():
    # A segmentation-sized area (half the box): OKS 0.72 at half the box area.
    gt, preds = _moved_people(COCO_SIGMAS, 0.5)
    for ann in gt["annotations"]:
        ann["area"] = 0.5 * ann["bbox"][2] * ann["bbox"][3]
    assert evaluate_keypoints(gt, preds, "coco")["AP"] == pytest.approx(0.5)
    # No area: the box's w * h (200 x 300), and the caller's dicts stay as they were.
    gt, preds = _moved_people(COCO_SIGMAS, 1.0)
    for ann in gt["annotations"]:
        del ann["area"]
    before = copy.deepcopy(gt)
    assert evaluate_keypoints(gt, preds, "coco")["AP"] == pytest.approx(0.5)
    assert gt == before


@pytest.mark.parametrize("protocol", ["coco", "crowdpose"])
def test_evaluators_print_only_when_verbose(protocol, capsys):
    gt, preds = _moved_people(CROWD_SIGMAS, 0.53)
    evaluate_keypoints(gt, preds, protocol, sigmas=CROWD_SIGMAS)
    assert capsys.readouterr().out == ""
    evaluate_keypoints(gt, preds, protocol, sigmas=CROWD_SIGMAS, verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def test_keypoint_count_from_the_categories_when_there_are_no_annotations():
    gt, preds = _moved_people(COCO_SIGMAS, 1.0)
    gt["annotations"] = []
    metrics = evaluate_keypoints(gt, preds, "coco")
    assert metrics["AP"] == -1.0  # nothing to find: undefined, not an error
    with pytest.raises(ValueError, match="17 keypoints"):
        evaluate_keypoints(gt, [dict(preds[0], keypoints=preds[0]["keypoints"][:42])], "coco")
    gt["categories"] = [{"id": 1, "name": "person"}]
    with pytest.raises(ValueError, match="cannot tell the keypoint count from the ground truth"):
        evaluate_keypoints(gt, preds, "coco")


def test_image_filter_and_unknown_images():
    gt, preds = _moved_people(COCO_SIGMAS, 1.0)
    # Predictions for an image outside image_ids: the ground truth no longer has it.
    with pytest.raises(ValueError, match=r"predictions for 1 image ids absent .*\['2'\]"):
        evaluate_keypoints(gt, preds, "coco", image_ids=[1])
    unknown = [dict(preds[0], image_id=i) for i in range(10, 16)]
    with pytest.raises(ValueError, match=r"6 image ids .*\['10', '11', '12', '13', '14'\]\)"):
        evaluate_keypoints(gt, unknown, "coco")


def test_error_messages_name_the_fix(tmp_path):
    gt, preds = _moved_people(COCO_SIGMAS, 1.0)
    with pytest.raises(ValueError, match=r"do not have 17 keypoints \(3 \* K = 51 values\)"):
        evaluate_keypoints(gt, [dict(preds[0], keypoints=[0.0] * 6)], "coco")
    with pytest.raises(FileNotFoundError, match="preds.json"):
        evaluate_keypoints(gt, tmp_path / "preds.json", "coco")
    with pytest.raises(TypeError, match="predictions must be a list of COCO result dicts"):
        evaluate_keypoints(gt, {"image_id": 1}, "coco")
    del gt["images"][0]["crowdIndex"]
    with pytest.raises(ValueError, match="add it or use protocol 'coco'"):
        evaluate_keypoints(gt, preds, "crowdpose", sigmas=COCO_SIGMAS)


def test_to_coco_results_values_and_shapes():
    poses = [np.array([[[1.23456, 2.0, 0.5], [3.0, 4.0, 1.0]]])]
    (res,) = to_coco_results([3], poses, [np.array([0.25])])
    assert res["keypoints"] == [1.235, 2.0, 0.5, 3.0, 4.0, 1.0]
    # Integer input still gives floats; flattened (F, 3K) poses are accepted.
    (res,) = to_coco_results([3], [np.array([[1, 2, 1, 3, 4, 1]])], [[0.5]])
    assert res["keypoints"] == [1.0, 2.0, 1.0, 3.0, 4.0, 1.0]
    assert all(type(v) is float for v in res["keypoints"])
    assert to_coco_results([3], [[]], [[]]) == []
    assert to_coco_results([4], [torch.zeros(0, 14, 3)], [torch.zeros(0)]) == []
    with pytest.raises(ValueError, match="image 7 has 2 poses but 1 scores"):
        to_coco_results([7], [np.zeros((2, 14, 3))], [[0.5]])
    with pytest.raises(ValueError, match="^to_coco_results: image_ids, poses_list and "
                                         "scores_list differ in length$"):
        to_coco_results([7, 8], [np.zeros((2, 14, 3))], [[0.5, 0.2]])
    json.dumps(res)
