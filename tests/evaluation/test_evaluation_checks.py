"""Evaluation's input checks, message by message (the same for both protocols): what is
wrong, which entry, the fix; files named by path; skip_invalid; results written."""

from __future__ import annotations

import copy
import json
import logging
import re

import numpy as np
import pytest
from test_evaluation_known_ap import COCO_SIGMAS, CROWD_SIGMAS, _moved_people

from pinet_lightning.evaluation.coco import evaluate_keypoints

FIELDS = "each must be {image_id, category_id, keypoints, score}"


def _bad(preds: list, index: int, **change) -> list:
    out = copy.deepcopy(preds)
    entry = dict(out[index], **change)
    for key in [k for k, v in change.items() if v is KeyError]:
        del entry[key]
    out[index] = entry
    return out


@pytest.mark.parametrize("protocol", ["coco", "crowdpose"])
def test_each_bad_prediction_is_named_with_its_fix(protocol):
    gt, preds = _moved_people(COCO_SIGMAS, 1.0)
    sigmas = COCO_SIGMAS
    cases = [
        (preds[:1] + ["oops"] + preds[1:],
         f"1 predictions are not JSON objects; the first is entry 1; {FIELDS}"),
        (_bad(preds, 2, score=KeyError), "1 predictions have no 'score'; the first is entry 2 "
         "(image_id 2); COCO keypoint results need image_id, keypoints and score"),
        (_bad(preds, 1, keypoints=[1.0] * 6), "1 predictions do not have 17 keypoints (3 * K = "
         "51 values); the first is entry 1 (image_id 1); check the layout"),
        (_bad(preds, 3, keypoints=[None] * 51), "1 predictions have keypoint values that are "
         "null or not numbers; the first is entry 3 (image_id 2); write numbers"),
        (_bad(preds, 2, keypoints=[np.nan] * 51), "1 predictions have NaN or infinite keypoint "
         "values; the first is entry 2 (image_id 2); a diverged model? every value must be "
         "finite"),
        (_bad(preds, 1, score="0.5"), "1 predictions have a 'score' that is not a finite "
         "number; the first is entry 1 (image_id 1); every score must be finite"),
        (_bad(_bad(preds, 1, category_id=2), 3, category_id=3), "2 predictions have a "
         "category_id other than the ground truth's person category (1); the first is entry 1 "
         "(image_id 1); write category_id 1"),
        (_bad(preds, 2, image_id="2"), "predictions for 1 image ids absent from the ground "
         "truth (e.g. ['2']): evaluate against the matching annotation file"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=re.escape(f"evaluation: predictions: {message}")):
            evaluate_keypoints(gt, bad, protocol, sigmas=sigmas)


def test_predictions_without_category_and_the_callers_dicts():
    gt, preds = _moved_people(COCO_SIGMAS, 1.0)
    for p in preds:
        del p["category_id"]
    before = copy.deepcopy(preds)
    gt_before = copy.deepcopy(gt)
    assert evaluate_keypoints(gt, preds, "coco")["AP"] == pytest.approx(0.5)
    assert evaluate_keypoints(gt, preds, "crowdpose", sigmas=COCO_SIGMAS)["AP"] != -1
    assert preds == before and gt == gt_before  # the evaluators worked on copies


def test_files_are_named_by_path(tmp_path):
    gt, preds = _moved_people(COCO_SIGMAS, 1.0)
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"evaluation: predictions file {tmp_path / 'p.json'} does not exist")):
        evaluate_keypoints(gt, tmp_path / "p.json", "coco")
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"evaluation: ground-truth file {tmp_path / 'g.json'} does not exist")):
        evaluate_keypoints(tmp_path / "g.json", preds, "coco")
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_bad(preds, 0, score=KeyError)))
    with pytest.raises(ValueError, match=re.escape(f"evaluation: {path}: 1 predictions have "
                                                   "no 'score'")):
        evaluate_keypoints(gt, path, "coco")
    with pytest.raises(TypeError, match=r"evaluation: predictions must be a list of COCO "
                                        r"result dicts \(or a path to a JSON list of them\), "
                                        r"not a dict"):
        evaluate_keypoints(gt, {"image_id": 1}, "coco")
    bad_gt = copy.deepcopy(gt)
    bad_gt["annotations"][0]["keypoints"][0] = None
    with pytest.raises(ValueError, match=r"^ground truth \(dict\): invalid records"):
        evaluate_keypoints(bad_gt, preds, "coco")
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(bad_gt))
    with pytest.raises(ValueError, match=re.escape(str(gt_path))):
        evaluate_keypoints(gt_path, preds, "coco")
    # a ground truth without images would give every metric as a silent 0 (or -1)
    empty = tmp_path / "no_images.json"
    empty.write_text(json.dumps({**gt, "images": [], "annotations": []}))
    with pytest.raises(ValueError, match=re.escape(
            f"evaluation: the ground truth {empty} has no images (left): nothing to evaluate; "
            "use an annotation file with images") + "$"):
        evaluate_keypoints(empty, [], "crowdpose")


def test_skip_invalid_drops_the_bad_image_and_its_predictions(caplog):
    gt, preds = _moved_people(COCO_SIGMAS, 1.0)
    gt["annotations"][2]["keypoints"][0] = None  # image 2 holds an invalid record
    with pytest.raises(ValueError):
        evaluate_keypoints(gt, preds, "coco")
    with caplog.at_level(logging.WARNING, logger="pinet_lightning.evaluation.coco"):
        metrics = evaluate_keypoints(gt, preds, "coco", skip_invalid=True)
    assert metrics["AP"] == pytest.approx(0.5) and metrics["AR"] == pytest.approx(0.5)
    assert ("predictions: 2 predictions of images skipped as invalid (skip_invalid) not "
            "evaluated") in caplog.text


def test_keypoint_count_and_sigma_messages():
    gt, preds = _moved_people(CROWD_SIGMAS, 1.0)
    with pytest.raises(ValueError, match=re.escape(
            "evaluation: 14 keypoints but COCO's default sigmas have 17: pass sigmas (e.g. "
            "layout.sigmas)")):
        evaluate_keypoints(gt, preds, "coco")
    with pytest.raises(ValueError, match=re.escape("evaluation: 17 sigmas for 14 keypoints")):
        evaluate_keypoints(gt, preds, "crowdpose", sigmas=COCO_SIGMAS)
    gt["annotations"] = []
    del gt["categories"][0]["keypoints"]
    with pytest.raises(ValueError, match=re.escape("give its person category a 'keypoints' "
                                                   "list")):
        evaluate_keypoints(gt, preds, "crowdpose")
    gt, preds = _moved_people(COCO_SIGMAS, 1.0)
    del gt["images"][1]["crowdIndex"]
    with pytest.raises(ValueError, match=r"1 images of the ground truth lack 'crowdIndex', which "
                                         r"the crowdpose protocol needs for AP easy/medium/hard; "
                                         r"add it or use protocol 'coco'$"):
        evaluate_keypoints(gt, preds, "crowdpose", sigmas=COCO_SIGMAS)


@pytest.mark.parametrize("protocol", ["coco", "crowdpose"])
def test_results_and_metrics_written_beside_each_other(protocol, tmp_path):
    gt, preds = _moved_people(COCO_SIGMAS, 1.0)
    for p in preds[:2]:
        del p["category_id"]
    out = tmp_path / "deep" / "er" / "val.json"
    metrics = evaluate_keypoints(gt, preds, protocol, sigmas=COCO_SIGMAS, results_path=out)
    written = json.loads(out.read_text())
    assert written == [dict(p, category_id=1) for p in preds]
    text = (tmp_path / "deep" / "er" / "val_metrics.json").read_text()
    assert json.loads(text) == {"protocol": protocol, **metrics}
    assert text.startswith('{\n  "protocol"')  # indented by 2
