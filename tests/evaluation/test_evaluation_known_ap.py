"""Evaluation against predictions moved by a known OKS: the AP each protocol must give.

Every keypoint of a prediction is moved along x by the distance that gives OKS ``oks``
against its ground truth, d = 2 sigma sqrt(-2 s ln(oks)), with s the protocol's scale: the
annotation's ``area`` for COCO, 0.53 x box w x h for CrowdPose (its official tool). With
OKS 0.72 a match holds at the thresholds 0.50 .. 0.70 and fails from 0.75 on: AP = 5/10,
AP50 = 1, AP75 = 0. Sigmas ten times too large would give OKS ~1 (AP 1); CrowdPose run with
the COCO scale (area w x h) would give OKS 0.72 ** 0.53 = 0.84 (AP 0.7).
"""

from __future__ import annotations

import numpy as np
import pytest

from pinet_lightning.evaluation.coco import evaluate_keypoints

# SPEC 1, written out here (not read from layouts.py) so a wrong table there shows too.
COCO_SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07,
                        .87, .87, .89, .89]) / 10
CROWD_SIGMAS = np.array([.79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89, .79,
                         .79]) / 10
OKS = 0.72


def _moved_people(sigmas: np.ndarray, scale_factor: float, oks: float = OKS
                  ) -> tuple[dict, list[dict]]:
    """Two images, two people each (200 x 300 boxes far apart); each prediction moved to
    OKS ``oks`` with s = scale_factor x box area."""
    k = len(sigmas)
    rng = np.random.default_rng(1)
    images = [{"id": 1, "file_name": "a.jpg", "width": 900, "height": 500, "crowdIndex": 0.1},
              {"id": 2, "file_name": "b.jpg", "width": 900, "height": 500, "crowdIndex": 0.5}]
    anns, preds = [], []
    for i, (image_id, x0) in enumerate([(1, 20), (1, 500), (2, 60), (2, 520)]):
        xy = rng.uniform(0, 1, size=(k, 2)) * [200, 300] + [x0, 100]
        xy[0], xy[1] = [x0, 100], [x0 + 200, 400]  # the box is exactly 200 x 300
        box = [float(x0), 100.0, 200.0, 300.0]
        anns.append({"id": i + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                     "keypoints": np.c_[xy, np.full(k, 2.0)].ravel().tolist(),
                     "num_keypoints": k, "bbox": box, "area": box[2] * box[3]})
        s = scale_factor * box[2] * box[3]
        d = 2 * sigmas * np.sqrt(-2 * s * np.log(oks))
        moved = xy + np.c_[d, np.zeros(k)]
        preds.append({"image_id": image_id, "category_id": 1, "score": 0.9 - 0.1 * i,
                      "keypoints": np.c_[moved, np.ones(k)].ravel().tolist()})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": 1, "name": "person", "keypoints": [str(j) for j in range(k)],
                          "skeleton": []}]}
    return gt, preds


@pytest.mark.parametrize("sigmas", [None, COCO_SIGMAS])
def test_coco_protocol_ap_of_predictions_at_a_known_oks(sigmas):
    gt, preds = _moved_people(COCO_SIGMAS, 1.0)
    metrics = evaluate_keypoints(gt, preds, "coco", sigmas=sigmas)
    assert metrics["AP"] == pytest.approx(0.5)
    assert metrics["AP50"] == pytest.approx(1.0) and metrics["AP75"] == pytest.approx(0.0)
    assert metrics["AR"] == pytest.approx(0.5) and metrics["AR50"] == pytest.approx(1.0)
    assert metrics["AR75"] == pytest.approx(0.0)
    assert metrics["AP_L"] == pytest.approx(0.5) and metrics["AR_L"] == pytest.approx(0.5)
    assert metrics["AP_M"] == -1.0 and metrics["AR_M"] == -1.0


def test_coco_protocol_uses_the_sigmas_it_is_given():
    sigmas = np.full(17, 0.1)
    gt, preds = _moved_people(sigmas, 1.0)
    assert evaluate_keypoints(gt, preds, "coco", sigmas=sigmas)["AP"] == pytest.approx(0.5)
    # With COCO's own (smaller) sigmas the same moves give OKS = mean_k 0.72 ** (0.1 /
    # sigma_k) ** 2 = 0.43: no match at any threshold.
    assert np.mean(OKS ** ((0.1 / COCO_SIGMAS) ** 2)) == pytest.approx(0.43, abs=0.01)
    assert evaluate_keypoints(gt, preds, "coco")["AP"] == pytest.approx(0.0)


@pytest.mark.parametrize("sigmas", [None, CROWD_SIGMAS])
def test_crowdpose_protocol_ap_of_predictions_at_a_known_oks(sigmas):
    gt, preds = _moved_people(CROWD_SIGMAS, 0.53)
    metrics = evaluate_keypoints(gt, preds, "crowdpose", sigmas=sigmas)
    assert metrics["AP"] == pytest.approx(0.5)
    assert metrics["AP50"] == pytest.approx(1.0) and metrics["AP75"] == pytest.approx(0.0)
    assert metrics["AR"] == pytest.approx(0.5) and metrics["AR50"] == pytest.approx(1.0)
    assert metrics["AR75"] == pytest.approx(0.0)
    # crowdIndex 0.1 -> easy (image 1), 0.5 -> medium (image 2), no hard image.
    assert metrics["AP_easy"] == pytest.approx(0.5)
    assert metrics["AP_medium"] == pytest.approx(0.5)
    assert metrics["AP_hard"] == -1.0


def test_crowdpose_protocol_is_not_the_coco_evaluator():
    """CrowdPose's OKS scale is 0.53 x box w x h, not the annotation area (COCO's)."""
    gt, preds = _moved_people(CROWD_SIGMAS, 1.0)  # OKS 0.72 with COCO's scale
    assert evaluate_keypoints(gt, preds, "coco", sigmas=CROWD_SIGMAS)["AP"] == pytest.approx(0.5)
    # The same predictions under the CrowdPose scale: OKS 0.72 ** (1 / 0.53) = 0.54.
    metrics = evaluate_keypoints(gt, preds, "crowdpose")
    assert metrics["AP"] == pytest.approx(0.1) and metrics["AP50"] == pytest.approx(1.0)

