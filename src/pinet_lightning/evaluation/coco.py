"""OKS-based keypoint evaluation (algorithm.md 7).

- ``coco`` (COCO, OCHuman): pycocotools ``COCOeval(iouType="keypoints")``; OKS uses the
  ground truth's ``area`` (filled from the bbox, w * h, where a json lacks it).
- ``crowdpose``: faster-coco-eval's CrowdPose mode,
  ``COCOeval_faster(gt, dt, iouType="keypoints_crowd", kpt_oks_sigmas=..., use_area=False)``
  (the official CrowdPose tool: OKS area = 0.53 * bbox w * h, 20 detections an image,
  easy / medium / hard = crowdIndex < 0.2 / < 0.8 / >= 0.8). Its ``stats`` are
  ``[AP, AP50, AP75, AR, AR50, AR75, AP_easy, AP_medium, AP_hard]``.

Both protocols first check their inputs the same way: the ground truth by the training data's
rules (:func:`~pinet_lightning.core.annotations.validate_coco_keypoints`: only the person category
is evaluated; NaN, null or missing fields are errors naming the file and ids), the predictions
for their fields (``image_id``, ``keypoints``, ``score``), 3K finite keypoint values, finite
scores and known image ids (errors name the file and the first offending entry).

Metrics are fractions in [0, 1]; a metric pycocotools cannot define (no ground truth in
that area range) stays -1 as the evaluators report it. No predictions give zeros.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faster_coco_eval
import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pinet_lightning.core.annotations import (
    ValidationReport,
    load_json,
    number_rows,
    validate_coco_keypoints,
)
from pinet_lightning.core.atomic import write_json
from pinet_lightning.core.layouts import get_layout

__all__ = ["evaluate_keypoints", "to_coco_results", "metric_names", "PROTOCOLS",
           "KeypointEvaluator", "Evaluation", "merge_gathered_results"]

log = logging.getLogger(__name__)

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


def _load_gt(gt_json: str | Path | dict, skip_invalid: bool = False
             ) -> tuple[dict, ValidationReport]:
    """The ground truth validated by the training data's rules (person category only)."""
    if isinstance(gt_json, dict):
        data, source = gt_json, "ground truth (dict)"
    else:
        data, source = load_json(gt_json, "evaluation: ground-truth file"), str(gt_json)
    gt, report = validate_coco_keypoints(data, source, skip_invalid=skip_invalid)
    # the evaluators add fields to the records: work on copies
    gt = {**gt, "images": [dict(i) for i in gt["images"]],
          "annotations": [dict(a) for a in gt["annotations"]]}
    return gt, report


def _load_predictions(predictions: list[dict] | str | Path) -> tuple[list[dict], str]:
    source = "predictions"
    if isinstance(predictions, (str, Path)):
        source = str(predictions)
        predictions = load_json(predictions, "evaluation: predictions file")
    if not isinstance(predictions, list):
        raise TypeError(f"evaluation: {source} must be a list of COCO result dicts (or a path "
                        f"to a JSON list of them), not a {type(predictions).__name__}")
    # The evaluators add fields to the dicts: work on copies.
    return [dict(p) if isinstance(p, dict) else p for p in predictions], source


def _first(mask: np.ndarray, preds: list, what: str, source: str, fix: str) -> None:
    """Raise naming the count and the first prediction where ``mask`` is set."""
    bad = np.flatnonzero(mask)
    if bad.size:
        i = int(bad[0])
        entry = preds[i]
        image = f" (image_id {entry.get('image_id')!r})" if isinstance(entry, dict) else ""
        raise ValueError(f"evaluation: {source}: {bad.size} predictions {what}; the first is "
                         f"entry {i}{image}; {fix}")


def _check_predictions(preds: list, source: str, gt: dict, report: ValidationReport,
                       num_keypoints: int, skip_invalid: bool) -> list[dict]:
    """Every prediction an object with a known ``image_id``, ``keypoints`` 3K finite numbers,
    a finite ``score`` and (if given) the ground truth's person ``category_id``; returns the
    predictions to evaluate (those of images skipped by ``skip_invalid`` are dropped)."""
    n = len(preds)
    is_dict = np.fromiter((isinstance(p, dict) for p in preds), bool, n)
    _first(~is_dict, preds, "are not JSON objects", source,
           "each must be {image_id, category_id, keypoints, score}")
    for key in ("image_id", "keypoints", "score"):
        _first(np.fromiter((key not in p for p in preds), bool, n), preds,
               f"have no '{key}'", source, "COCO keypoint results need image_id, keypoints "
               "and score")
    kps, shape_ok, numeric = number_rows([p["keypoints"] for p in preds], 3 * num_keypoints)
    _first(~shape_ok, preds, f"do not have {num_keypoints} keypoints (3 * K = "
           f"{3 * num_keypoints} values)", source, "check the layout")
    _first(~numeric, preds, "have keypoint values that are null or not numbers", source,
           "write numbers")
    _first(~np.isfinite(kps).all(1), preds, "have NaN or infinite keypoint values", source,
           "a diverged model? every value must be finite")
    scores = np.fromiter((p["score"] if isinstance(p["score"], (int, float)) else np.nan
                          for p in preds), np.float64, n)
    _first(~np.isfinite(scores), preds, "have a 'score' that is not a finite number", source,
           "every score must be finite")
    person = report.person_category_id
    cat = [p.get("category_id", person) for p in preds]
    _first(np.fromiter((c != person for c in cat), bool, n), preds,
           f"have a category_id other than the ground truth's person category ({person})",
           source, f"write category_id {person}")
    image_ids = np.fromiter((i["id"] for i in gt["images"]), np.int64, len(gt["images"]))
    pred_ids = [p["image_id"] for p in preds]
    ok_type = np.fromiter((type(i) is int for i in pred_ids), bool, n)
    ids = np.fromiter((i if type(i) is int else 0 for i in pred_ids), np.int64, n)
    known = ok_type & np.isin(ids, image_ids)
    dropped = np.zeros(n, bool)
    if skip_invalid and report.skipped_image_ids:
        dropped = ok_type & ~known & np.isin(ids, list(report.skipped_image_ids))
    unknown = ~known & ~dropped
    if unknown.any():
        missing = sorted({str(i) for i in np.asarray(pred_ids, dtype=object)[unknown]})
        raise ValueError(
            f"evaluation: {source}: predictions for {len(missing)} image ids absent from the "
            f"ground truth (e.g. {missing[:5]}): evaluate against the matching annotation file"
        )
    if dropped.any():
        log.warning("evaluation: %s: %d predictions of images skipped as invalid "
                    "(skip_invalid) not evaluated", source, int(dropped.sum()))
    for p in preds:
        p.setdefault("category_id", person)
    return [p for p, k in zip(preds, known, strict=True) if k]


def _eval_coco(gt: dict, preds: list[dict], sigmas, verbose: bool) -> np.ndarray:
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
    missing = sum("crowdIndex" not in img for img in gt.get("images", []))
    if missing:
        raise ValueError(
            f"evaluation: {missing} images of the ground truth lack 'crowdIndex', which the "
            "crowdpose protocol needs for AP easy/medium/hard; add it or use protocol 'coco'"
        )
    if sigmas is None:
        sigmas = get_layout("crowdpose").sigmas
    quiet = print if verbose else (lambda *args, **kwargs: None)
    coco_gt = faster_coco_eval.COCO(gt, print_function=quiet)
    coco_dt = coco_gt.loadRes(preds)
    ev = faster_coco_eval.COCOeval_faster(coco_gt, coco_dt, iouType="keypoints_crowd",
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
    skip_invalid: bool = False,
) -> dict[str, float]:
    """OKS AP/AR of keypoint predictions.

    Both inputs are checked before either evaluator runs, the same way for both protocols:
    the ground truth by the training data's rules (:mod:`pinet_lightning.core.annotations`: only
    its person category is evaluated, NaN / missing fields are errors), the predictions for
    fields, keypoint count, finite keypoints and scores and known image ids. Errors name the
    file and the first offending entry.

    Args:
        gt_json: ground-truth COCO-format json (path or loaded dict).
        predictions: COCO result dicts (image_id, category_id, keypoints [x, y, s] * K,
            score) or a path to a json list of them. ``category_id``, when given, must be
            the ground truth's person category.
        protocol: ``coco`` (also OCHuman) or ``crowdpose``.
        sigmas: OKS sigmas (/10); default: COCO's for ``coco``, CrowdPose's for
            ``crowdpose``. Pass the layout's for other keypoint sets.
        results_path: when given, the predictions are written there (json) and the
            metrics beside it as ``<stem>_metrics.json``.
        verbose: let the evaluators print their tables.
        image_ids: evaluate on these images only (e.g. a partial validation run); default:
            every image of the ground truth (images without predictions count as misses).
        skip_invalid: images of the ground truth holding invalid records are left out of
            the evaluation (with their predictions), logged, instead of raising
            (``data.skip_invalid``, so that evaluation follows the training data's rule).

    Returns:
        ``AP AP50 AP75 AR AR50 AR75`` plus ``AP_M AP_L AR_M AR_L`` (coco) or
        ``AP_easy AP_medium AP_hard`` (crowdpose), as floats.
    """
    proto = _check_protocol(protocol)
    keys = metric_names(proto)
    gt, report = _load_gt(gt_json, skip_invalid)
    if not gt["images"]:  # every metric would be a silent 0 (or -1)
        raise ValueError(f"evaluation: the ground truth {report.source} has no images (left): "
                         "nothing to evaluate; use an annotation file with images")
    if image_ids is not None:
        keep = {int(i) for i in image_ids}
        gt["images"] = [img for img in gt["images"] if img["id"] in keep]
        gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in keep]
    preds, source = _load_predictions(predictions)
    if preds:
        k = report.num_keypoints
        if k is None:
            raise ValueError(f"evaluation: cannot tell the keypoint count from the ground "
                             f"truth {report.source}: give its person category a 'keypoints' "
                             "list")
        if sigmas is not None and len(sigmas) != k:
            raise ValueError(f"evaluation: {len(sigmas)} sigmas for {k} keypoints")
        if proto == "coco" and sigmas is None and k != 17:
            raise ValueError(
                f"evaluation: {k} keypoints but COCO's default sigmas have 17: pass sigmas "
                "(e.g. layout.sigmas)"
            )
        preds = _check_predictions(preds, source, gt, report, k, skip_invalid)
    if preds:
        results_for_file = copy.deepcopy(preds) if results_path is not None else None
        evaluate = _eval_coco if proto == "coco" else _eval_crowdpose
        stats = evaluate(gt, preds, sigmas, verbose)
        metrics = {key: float(stats[i]) for i, key in enumerate(_order(proto))}
        metrics = {key: metrics[key] for key in keys}
    else:
        results_for_file = []
        metrics = dict.fromkeys(keys, 0.0)

    if results_path is not None:  # whole files or none (a full disk names the path)
        path = Path(results_path)
        write_json(path, results_for_file)
        write_json(path.with_name(path.stem + "_metrics.json"), {"protocol": proto, **metrics},
                   indent=2)
    return metrics


def _order(protocol: str) -> tuple[str, ...]:
    """The evaluators' stats order."""
    if protocol == "coco":
        return ("AP", "AP50", "AP75", "AP_M", "AP_L", "AR", "AR50", "AR75", "AR_M", "AR_L")
    return _CROWD_KEYS


@dataclass(frozen=True)
class Evaluation:
    """What an evaluation gave: the metrics and where the results file was written."""

    metrics: dict[str, float]
    results_path: Path | None = None


def merge_gathered_results(gathered: Iterable[Mapping[int, Sequence[dict]]]
                           ) -> tuple[list[dict], list[int]]:
    """Merge per-rank ``{image_id: results}`` dicts, keeping one copy of each image.

    The DistributedSampler pads the last ranks with repeats of the first images, so an image
    may arrive from two ranks; the first copy (lowest rank) is kept, every other image is
    kept whole. Returns (flat COCO results ordered by image id, the unique image ids).
    """
    merged: dict[int, Sequence[dict]] = {}
    for part in gathered:
        for image_id, results in part.items():
            merged.setdefault(int(image_id), results)
    image_ids = sorted(merged)
    flat = [r for image_id in image_ids for r in merged[image_id]]
    return flat, image_ids


def _all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` outside torch.distributed."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


@dataclass(frozen=True)
class KeypointEvaluator:
    """One ground truth, one protocol, one set of OKS sigmas (:func:`evaluate_keypoints`).

    Call it with COCO results to evaluate them (and write them to ``results_path``), or use
    :meth:`gather_and_evaluate` under DDP: every rank's results are gathered, evaluated once
    on rank 0 and the metrics broadcast, so all ranks return the same values.
    """

    annotation_file: str
    protocol: str = "coco"
    sigmas: tuple[float, ...] | None = None
    skip_invalid: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "protocol", _check_protocol(self.protocol))

    def __call__(self, results: list[dict] | str | Path, image_ids: Sequence[int] | None = None,
                 results_path: str | Path | None = None) -> Evaluation:
        metrics = evaluate_keypoints(self.annotation_file, results, self.protocol,
                                     sigmas=self.sigmas, results_path=results_path,
                                     image_ids=image_ids, skip_invalid=self.skip_invalid)
        return Evaluation(metrics, None if results_path is None else Path(results_path))

    def gather_and_evaluate(self, local: Mapping[int, Sequence[dict]], strategy: Any,
                            results_path: str | Path | None = None) -> Evaluation:
        """Evaluate every rank's ``{image_id: results}`` once (rank 0) and share the metrics.

        Only the images the ranks evaluated count (partial validation, e.g. Lightning's sanity
        check, must not count the rest as misses); ``images`` and ``poses`` are added to the
        metrics. ``strategy``: a Lightning strategy (``is_global_zero``, ``broadcast``). An
        evaluator error on rank 0 is raised on every rank, so that no rank waits forever.
        """
        gathered = _all_gather_objects(dict(local))
        payload: dict[str, Any] = {}
        if strategy.is_global_zero:
            results, image_ids = merge_gathered_results(gathered)
            try:
                evaluation = self(results, image_ids, results_path)
                metrics = {key: float(value) for key, value in evaluation.metrics.items()}
                metrics.update(images=float(len(image_ids)), poses=float(len(results)))
                payload = {"metrics": metrics, "results_path": results_path and str(results_path)}
            except Exception as err:  # shared below
                payload = {"error": f"{type(err).__name__}: {err}"}
        payload = strategy.broadcast(payload, src=0)
        if "error" in payload:
            raise RuntimeError(f"evaluation of {self.annotation_file} failed on rank 0: "
                               f"{payload['error']}")
        path = payload.get("results_path")
        return Evaluation(payload["metrics"], None if path is None else Path(path))
