"""OKS-based keypoint evaluation (SPEC 7).

- ``coco`` (COCO, OCHuman): pycocotools ``COCOeval(iouType="keypoints")``; OKS uses the
  ground truth's ``area`` (filled from the bbox, w * h, where a json lacks it).
- ``crowdpose``: faster-coco-eval's CrowdPose mode,
  ``COCOeval_faster(gt, dt, iouType="keypoints_crowd", kpt_oks_sigmas=..., use_area=False)``
  (the official CrowdPose tool: OKS area = 0.53 * bbox w * h, 20 detections an image,
  easy / medium / hard = crowdIndex < 0.2 / < 0.8 / >= 0.8). Its ``stats`` are
  ``[AP, AP50, AP75, AR, AR50, AR75, AP_easy, AP_medium, AP_hard]``.

Metrics are fractions in [0, 1]; a metric pycocotools cannot define (no ground truth in
that area range) stays -1 as the evaluators report it. No predictions give zeros.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["evaluate_keypoints", "to_coco_results", "metric_names", "PROTOCOLS"]

PROTOCOLS = ("coco", "crowdpose")
_COCO_KEYS = ("AP", "AP50", "AP75", "AR", "AR50", "AR75", "AP_M", "AP_L", "AR_M", "AR_L")
_CROWD_KEYS = ("AP", "AP50", "AP75", "AR", "AR50", "AR75", "AP_easy", "AP_medium", "AP_hard")


def metric_names(protocol: str) -> tuple[str, ...]:
    """The metric keys :func:`evaluate_keypoints` returns for a protocol."""
    return _COCO_KEYS if _check_protocol(protocol) == "coco" else _CROWD_KEYS


def _check_protocol(protocol: str) -> str:
    p = str(protocol).lower()
    if p == "ochuman":
        p = "coco"
    if p not in PROTOCOLS:
        raise ValueError(f"evaluation: unknown protocol '{protocol}'; use one of {PROTOCOLS}")
    return p


def to_coco_results(
    image_ids: Sequence[int],
    poses_list: Sequence[np.ndarray | torch.Tensor],
    scores_list: Sequence[np.ndarray | torch.Tensor],
    category_id: int = 1,
) -> list[dict[str, Any]]:
    """COCO keypoint result dicts from per-image poses (F, K, 3) and scores (F,)."""
    if not len(image_ids) == len(poses_list) == len(scores_list):
        raise ValueError("to_coco_results: image_ids, poses_list and scores_list differ in length")
    results = []
    for image_id, poses, scores in zip(image_ids, poses_list, scores_list, strict=True):
        if isinstance(poses, torch.Tensor):
            poses = poses.detach().float().cpu().numpy()
        if isinstance(scores, torch.Tensor):
            scores = scores.detach().float().cpu().numpy()
        poses = np.asarray(poses, dtype=np.float64)
        n = poses.shape[0] if poses.ndim > 1 else 0
        poses = poses.reshape(n, -1) if poses.size else np.zeros((n, 0))
        if poses.shape[0] != len(scores):
            raise ValueError(f"to_coco_results: image {image_id} has {poses.shape[0]} poses "
                             f"but {len(scores)} scores")
        for pose, score in zip(poses.tolist(), np.asarray(scores).tolist(), strict=True):
            results.append({"image_id": int(image_id), "category_id": int(category_id),
                            "keypoints": [round(v, 3) for v in pose], "score": float(score)})
    return results


def _load_gt(gt_json: str | Path | dict) -> dict:
    if isinstance(gt_json, dict):
        return copy.deepcopy(gt_json)
    path = Path(gt_json)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation: ground-truth file {path} not found")
    with open(path) as f:
        return json.load(f)


def _load_predictions(predictions: list[dict] | str | Path) -> list[dict]:
    if isinstance(predictions, (str, Path)):
        path = Path(predictions)
        if not path.is_file():
            raise FileNotFoundError(f"evaluation: predictions file {path} not found")
        with open(path) as f:
            predictions = json.load(f)
    if not isinstance(predictions, list):
        raise TypeError("evaluation: predictions must be a list of COCO result dicts or a path")
    # The evaluators add fields to the dicts: work on copies.
    return [dict(p) for p in predictions]


def _check_predictions(preds: list[dict], gt: dict, num_keypoints: int) -> None:
    image_ids = {img["id"] for img in gt.get("images", [])}
    unknown = {p["image_id"] for p in preds} - image_ids
    if unknown:
        raise ValueError(
            f"evaluation: predictions for {len(unknown)} image ids absent from the ground "
            f"truth (e.g. {sorted(unknown)[:5]}): evaluate against the matching annotation file"
        )
    bad = [p for p in preds if len(p["keypoints"]) != 3 * num_keypoints]
    if bad:
        raise ValueError(
            f"evaluation: {len(bad)} predictions do not have {num_keypoints} keypoints "
            f"(3 * K = {3 * num_keypoints} values): check the layout"
        )


def _num_keypoints(gt: dict) -> int:
    for ann in gt.get("annotations", []):
        return len(ann["keypoints"]) // 3
    cats = gt.get("categories", [])
    if cats and "keypoints" in cats[0]:
        return len(cats[0]["keypoints"])
    raise ValueError("evaluation: cannot tell the keypoint count from the ground truth")


def _eval_coco(gt: dict, preds: list[dict], sigmas, verbose: bool) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    for ann in gt.get("annotations", []):
        if "area" not in ann:  # OCHuman/CrowdPose-style jsons: the bbox gives the area
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(preds)
        ev = COCOeval(coco_gt, coco_dt, iouType="keypoints")
        if sigmas is not None:
            ev.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats, dtype=np.float64)


def _eval_crowdpose(gt: dict, preds: list[dict], sigmas, verbose: bool) -> np.ndarray:
    from faster_coco_eval import COCO, COCOeval_faster

    missing = sum("crowdIndex" not in img for img in gt.get("images", []))
    if missing:
        raise ValueError(
            f"evaluation: {missing} images of the ground truth lack 'crowdIndex', which the "
            "crowdpose protocol needs for AP easy/medium/hard; add it or use protocol 'coco'"
        )
    if sigmas is None:
        from pinet_lightning.layouts import get_layout

        sigmas = get_layout("crowdpose").sigmas
    quiet = print if verbose else (lambda *args, **kwargs: None)
    coco_gt = COCO(gt, print_function=quiet)
    coco_dt = coco_gt.loadRes(preds)
    ev = COCOeval_faster(coco_gt, coco_dt, iouType="keypoints_crowd",
                         kpt_oks_sigmas=list(np.asarray(sigmas, dtype=np.float64)),
                         use_area=False, print_function=quiet)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return np.asarray(ev.all_stats, dtype=np.float64)[: len(_CROWD_KEYS)]


def evaluate_keypoints(
    gt_json: str | Path | dict,
    predictions: list[dict] | str | Path,
    protocol: str = "coco",
    sigmas: Sequence[float] | np.ndarray | None = None,
    results_path: str | Path | None = None,
    verbose: bool = False,
    image_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """OKS AP/AR of keypoint predictions.

    Args:
        gt_json: ground-truth COCO-format json (path or loaded dict).
        predictions: COCO result dicts (image_id, category_id, keypoints [x, y, s] * K,
            score) or a path to a json list of them.
        protocol: ``coco`` (also OCHuman) or ``crowdpose``.
        sigmas: OKS sigmas (/10); default: COCO's for ``coco``, CrowdPose's for
            ``crowdpose``. Pass the layout's for other keypoint sets.
        results_path: when given, the predictions are written there (json) and the
            metrics beside it as ``<stem>_metrics.json``.
        verbose: let the evaluators print their tables.
        image_ids: evaluate on these images only (e.g. a partial validation run); default:
            every image of the ground truth (images without predictions count as misses).

    Returns:
        ``AP AP50 AP75 AR AR50 AR75`` plus ``AP_M AP_L AR_M AR_L`` (coco) or
        ``AP_easy AP_medium AP_hard`` (crowdpose), as floats.
    """
    proto = _check_protocol(protocol)
    keys = metric_names(proto)
    gt = _load_gt(gt_json)
    if image_ids is not None:
        keep = {int(i) for i in image_ids}
        gt["images"] = [img for img in gt.get("images", []) if img["id"] in keep]
        gt["annotations"] = [a for a in gt.get("annotations", []) if a["image_id"] in keep]
    preds = _load_predictions(predictions)
    if preds:
        k = _num_keypoints(gt)
        if sigmas is not None and len(sigmas) != k:
            raise ValueError(f"evaluation: {len(sigmas)} sigmas for {k} keypoints")
        if proto == "coco" and sigmas is None and k != 17:
            raise ValueError(
                f"evaluation: {k} keypoints but COCO's default sigmas have 17: pass sigmas "
                "(e.g. layout.sigmas)"
            )
        _check_predictions(preds, gt, k)
        results_for_file = copy.deepcopy(preds) if results_path is not None else None
        evaluate = _eval_coco if proto == "coco" else _eval_crowdpose
        stats = evaluate(gt, preds, sigmas, verbose)
        metrics = {key: float(stats[i]) for i, key in enumerate(_order(proto))}
        metrics = {key: metrics[key] for key in keys}
    else:
        results_for_file = []
        metrics = dict.fromkeys(keys, 0.0)

    if results_path is not None:
        path = Path(results_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump(results_for_file, f)
        with open(path.with_name(path.stem + "_metrics.json"), "w") as f:
            json.dump({"protocol": proto, **metrics}, f, indent=2)
    return metrics


def _order(protocol: str) -> tuple[str, ...]:
    """The evaluators' stats order."""
    if protocol == "coco":
        return ("AP", "AP50", "AP75", "AP_M", "AP_L", "AR", "AR50", "AR75", "AR_M", "AR_L")
    return _CROWD_KEYS
