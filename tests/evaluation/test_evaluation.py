"""OKS evaluation: CrowdPose protocol on the real validation annotations, COCO protocol on a
small hand-built json, empty predictions, files written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pinet_lightning.evaluation.coco import evaluate_keypoints, metric_names, to_coco_results

CROWD_KEYS = {"AP", "AP50", "AP75", "AR", "AR50", "AR75", "AP_easy", "AP_medium", "AP_hard"}
COCO_KEYS = {"AP", "AP50", "AP75", "AR", "AR50", "AR75", "AP_M", "AP_L", "AR_M", "AR_L"}


def _gt_as_predictions(gt: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"],
             "score": 1.0} for a in gt["annotations"] if a["num_keypoints"] > 0]


def test_crowdpose_protocol_ground_truth_scores_one(crowdpose_val_json, tmp_path):
    gt = json.loads(crowdpose_val_json.read_text())
    preds = _gt_as_predictions(gt)
    out = tmp_path / "res" / "val.json"
    metrics = evaluate_keypoints(crowdpose_val_json, preds, "crowdpose", results_path=out)
    assert set(metrics) == CROWD_KEYS
    for key, value in metrics.items():
        assert value == pytest.approx(1.0), key
    assert json.loads(out.read_text()) == preds  # the caller's dicts were not mutated
    saved = json.loads((tmp_path / "res" / "val_metrics.json").read_text())
    assert saved["protocol"] == "crowdpose" and saved["AP"] == pytest.approx(1.0)


def _small_coco() -> tuple[dict, list[dict]]:
    """Two images, four people with all 17 keypoints visible, large boxes."""
    rng = np.random.default_rng(0)
    images = [{"id": 1, "file_name": "a.jpg", "width": 640, "height": 480},
              {"id": 2, "file_name": "b.jpg", "width": 640, "height": 480}]
    anns, preds = [], []
    for i, (image_id, x0) in enumerate([(1, 10), (1, 300), (2, 50), (2, 350)]):
        xy = rng.uniform(0, 1, size=(17, 2)) * [200, 300] + [x0, 50]
        kpts = np.concatenate([xy, np.full((17, 1), 2)], 1).ravel().tolist()
        box = [float(xy[:, 0].min()), float(xy[:, 1].min()), float(np.ptp(xy[:, 0])),
               float(np.ptp(xy[:, 1]))]
        anns.append({"id": i + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                     "keypoints": kpts, "num_keypoints": 17, "bbox": box,
                     "area": box[2] * box[3]})
        preds.append({"image_id": image_id, "category_id": 1, "score": 0.9 - 0.1 * i,
                      "keypoints": [round(v, 2) if j % 3 < 2 else 1.0
                                    for j, v in enumerate(kpts)]})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": 1, "name": "person", "keypoints": [str(k) for k in range(17)],
                          "skeleton": []}]}
    return gt, preds


def test_coco_protocol_on_a_small_json(tmp_path, capsys):
    gt, preds = _small_coco()
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    metrics = evaluate_keypoints(gt_path, preds, "coco")
    assert set(metrics) == COCO_KEYS
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AR"] == pytest.approx(1.0)
    assert metrics["AP_L"] == pytest.approx(1.0)
    assert metrics["AP_M"] == -1.0  # no medium-sized person: undefined, as pycocotools says
    # Drop the lowest-scored person: recall 3/4 at every threshold, precision 1 up to it,
    # so AP = 76 of the 101 recall points.
    metrics = evaluate_keypoints(gt, preds[:3], "coco")
    assert metrics["AR"] == pytest.approx(0.75)
    assert metrics["AP"] == pytest.approx(76 / 101)
    # A far-off pose is a false positive ranked first: precision drops everywhere.
    bad = dict(preds[0], keypoints=[v + 80 if j % 3 < 2 else 1.0
                                    for j, v in enumerate(preds[0]["keypoints"])], score=0.99)
    assert evaluate_keypoints(gt, [bad, *preds], "coco")["AP"] < 0.9
    assert capsys.readouterr().out == ""  # quiet unless verbose
    evaluate_keypoints(gt, preds, "coco", verbose=True)
    assert "Average Precision" in capsys.readouterr().out
    # Predictions from a json path; OCHuman is the COCO protocol.
    pred_path = tmp_path / "preds.json"
    pred_path.write_text(json.dumps(preds))
    assert evaluate_keypoints(gt, pred_path, "ochuman")["AP"] == pytest.approx(1.0)


def test_coco_protocol_custom_sigmas_and_missing_area():
    gt, preds = _small_coco()
    for ann in gt["annotations"]:
        del ann["area"]  # OCHuman-style: the bbox gives the area
    metrics = evaluate_keypoints(gt, preds, "coco", sigmas=[0.05] * 17)
    assert metrics["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("protocol", ["coco", "crowdpose"])
def test_empty_predictions_give_zeros(protocol, tmp_path):
    gt, _ = _small_coco()
    metrics = evaluate_keypoints(gt, [], protocol, results_path=tmp_path / "r.json")
    assert metrics == dict.fromkeys(metric_names(protocol), 0.0)
    assert json.loads((tmp_path / "r.json").read_text()) == []


def test_clear_errors():
    gt, preds = _small_coco()
    with pytest.raises(ValueError, match="protocol"):
        evaluate_keypoints(gt, preds, "mpii")
    with pytest.raises(ValueError, match="absent from the ground truth"):
        evaluate_keypoints(gt, [dict(preds[0], image_id=99)], "coco")
    with pytest.raises(ValueError, match="17 keypoints"):
        evaluate_keypoints(gt, [dict(preds[0], keypoints=preds[0]["keypoints"][:42])], "coco")
    with pytest.raises(ValueError, match="crowdIndex"):
        evaluate_keypoints(gt, preds, "crowdpose", sigmas=[0.05] * 17)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        evaluate_keypoints("nope.json", preds, "coco")


def test_to_coco_results_format():
    poses = [torch.arange(2 * 14 * 3, dtype=torch.float32).view(2, 14, 3), np.zeros((0, 14, 3))]
    scores = [torch.tensor([0.5, 0.25]), np.zeros(0)]
    results = to_coco_results([7, 8], poses, scores)
    assert len(results) == 2
    assert results[0] == {"image_id": 7, "category_id": 1,
                          "keypoints": [float(v) for v in range(42)], "score": 0.5}
    assert results[1]["keypoints"][0] == 42.0 and results[1]["score"] == 0.25
    json.dumps(results)  # plain python types


def test_image_ids_restrict_the_evaluation():
    gt, preds = _small_coco()
    only_first = [p for p in preds if p["image_id"] == 1]
    assert evaluate_keypoints(gt, only_first, "coco")["AR"] == pytest.approx(0.5)
    assert evaluate_keypoints(gt, only_first, "coco", image_ids=[1])["AR"] == pytest.approx(1.0)
