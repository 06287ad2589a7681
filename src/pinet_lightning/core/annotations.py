"""One validation pass over a COCO keypoint annotation file, before any training or evaluation.

Training data (:class:`~pinet_lightning.data.datasets.CocoKeypointDataset`) and evaluation's ground
truth (:func:`~pinet_lightning.evaluation.coco.evaluate_keypoints`) go through the same rules:

- Structure (always an error): a JSON object with ``images``, ``annotations`` and
  ``categories`` lists; one person category, the one named ``person`` or else the only one
  with a ``keypoints`` list; the file's keypoint count (that category's list, else the
  annotations' common length) equal to the expected one.
- Records: image ``id`` an integer, unique, with a ``file_name``; annotation ``id`` an
  integer, unique; its ``image_id`` a known image; its ``category_id`` a known category
  (annotations of other categories than the person one are dropped, with a logged count);
  ``keypoints`` a list of 3K finite numbers with visibility v in {0, 1, 2} (a crowd
  region, ``iscrowd`` 1, may have none: zeros are filled in); ``bbox``
  4 finite numbers, w, h >= 0, or absent (then derived from the labelled keypoints, said
  once with a count); ``iscrowd`` 0 / 1; ``num_keypoints`` and ``area``, when given, finite
  and >= 0 (``num_keypoints`` absent: counted from v > 0).

A record problem is an error naming the file, the ids and the fix, unless ``skip_invalid``:
then every image holding an invalid record is dropped whole (a person left out of an image
would be trained on as background), annotations whose image is unknown are dropped, and the
count and ids are logged. The checks are vectorized over the records (numpy), so that a
COCO-sized file (150k annotations) is validated in under a second.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["AnnotationError", "KeypointCountError", "ValidationReport",
           "validate_coco_keypoints", "load_json", "number_rows"]

log = logging.getLogger(__name__)

_SHOW = 5          # ids named in an error message per problem
_LOG_IDS = 50      # ids named in the skip log per problem
_said: set[tuple[str, str]] = set()  # notices already logged (evaluation runs every epoch)


class AnnotationError(ValueError):
    """An annotation file that cannot be used as it is (the message names file, ids and fix)."""


class KeypointCountError(AnnotationError):
    """The file's keypoint count is not the layout's (``found`` vs ``expected``): a caller
    that knows which setting chose the layout can word its own fix."""

    def __init__(self, message: str, source: str, found: int, expected: int) -> None:
        super().__init__(message)
        self.source, self.found, self.expected = source, found, expected


@dataclass
class ValidationReport:
    """What the pass found. ``skipped_*``: problem -> ids dropped under ``skip_invalid``."""

    source: str
    num_keypoints: int | None
    person_category_id: int | None
    num_images: int = 0
    num_annotations: int = 0
    other_category_annotations: int = 0
    derived_boxes: list[int] = field(default_factory=list)
    derived_num_keypoints: int = 0
    zero_keypoints: int = 0
    skipped_images: dict[str, list] = field(default_factory=dict)
    skipped_annotations: dict[str, list] = field(default_factory=dict)

    @property
    def skipped_image_ids(self) -> set:
        return {i for ids in self.skipped_images.values() for i in ids}


def load_json(path: str | Path, what: str = "annotation file") -> Any:
    """A JSON file, or an error naming the file, where it broke and the fix."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder, not a JSON file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise AnnotationError(
            f"{what} {path} is not valid JSON: {err.msg} at line {err.lineno}, column "
            f"{err.colno}; fix or re-download the file"
        ) from None
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{what} {path} is not UTF-8 text ({err.reason} at byte "
                              f"{err.start}): is it a JSON file?") from None


def number_rows(values: Sequence[Any], width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of ``width`` numbers out of a list of JSON values, vectorized.

    Returns ``rows`` (N, width) float64 (NaN where not usable), ``shape_ok`` (N,) (a list of
    ``width`` entries) and ``numeric`` (N,) (shape ok and every entry an int / float; null
    and strings are not). Finiteness is the caller's check on ``rows``.
    """
    n = len(values)
    lengths = np.fromiter((len(v) if isinstance(v, (list, tuple)) else -1 for v in values),
                          np.int64, n)
    shape_ok = lengths == width
    rows = np.full((n, width), np.nan)
    numeric = np.zeros(n, bool)
    good = np.flatnonzero(shape_ok)
    if not good.size:
        return rows, shape_ok, numeric
    sub = [values[i] for i in good]
    try:
        raw = np.array(sub)
    except (ValueError, TypeError):  # nested lists of other sizes inside
        raw = np.empty(0, object)
    if raw.dtype.kind in "biuf" and raw.shape == (len(sub), width):
        rows[good] = raw
        numeric[good] = True
        return rows, shape_ok, numeric
    # slow path, only for files with null / strings / nested values somewhere
    ok = np.array([all(isinstance(x, (int, float)) for x in row) for row in sub], bool)
    keep = good[ok]
    if keep.size:
        rows[keep] = np.array([values[i] for i in keep], dtype=np.float64)
    numeric[keep] = True
    return rows, shape_ok, numeric


def _int_ids(values: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(ids as int64, ok): ok where the value is an int (not a bool)."""
    ok = np.fromiter((type(v) is int for v in values), bool, len(values))
    ids = np.fromiter((v if type(v) is int else 0 for v in values), np.int64, len(values))
    return ids, ok


def _scalars(values: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(values as float64, given): NaN where absent or not a number."""
    given = np.fromiter((v is not None for v in values), bool, len(values))
    out = np.fromiter((v if isinstance(v, (int, float)) else np.nan for v in values),
                      np.float64, len(values))
    return out, given


def _names(ids: np.ndarray | list, limit: int = _SHOW) -> str:
    ids = [i.item() if isinstance(i, np.generic) else i for i in list(ids)]
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _structure(data: Any, source: str) -> tuple[list, list, list]:
    if not isinstance(data, dict):
        raise AnnotationError(f"{source}: a COCO keypoint file is a JSON object with 'images', "
                              f"'annotations' and 'categories', not a {type(data).__name__}")
    parts = []
    for key in ("images", "annotations", "categories"):
        value = data.get(key)
        if not isinstance(value, list):
            state = "is missing" if key not in data else f"is a {type(value).__name__}"
            raise AnnotationError(f"{source}: '{key}' {state}; a COCO keypoint file needs "
                                  f"'{key}' as a list (see cocodataset.org/#format-data)")
        parts.append(value)
    return parts[0], parts[1], parts[2]


def _person_category(categories: list, source: str) -> dict:
    cats = [c for c in categories if isinstance(c, dict) and type(c.get("id")) is int]
    if len(cats) != len(categories):
        raise AnnotationError(f"{source}: every category needs an integer 'id'")
    named = [c for c in cats if str(c.get("name", "")).strip().lower() == "person"]
    if len(named) > 1:
        raise AnnotationError(f"{source}: {len(named)} categories are named 'person' (ids "
                              f"{_names([c['id'] for c in named])}); keep one")
    if named:
        return named[0]
    with_kp = [c for c in cats if isinstance(c.get("keypoints"), list)]
    if len(with_kp) == 1:
        return with_kp[0]
    found = [f"{c.get('name')!r} (id {c['id']})" for c in cats] or ["none"]
    raise AnnotationError(
        f"{source}: no person category: categories are {', '.join(found)}; name the person "
        "category 'person' (or keep only one category with a 'keypoints' list)"
    )


def _file_keypoints(category: dict, kp_lengths: np.ndarray) -> int | None:
    names = category.get("keypoints")
    if isinstance(names, list) and names:
        return len(names)
    lengths = kp_lengths[(kp_lengths > 0) & (kp_lengths % 3 == 0)]
    if not lengths.size:
        return None
    return int(Counter(lengths.tolist()).most_common(1)[0][0]) // 3


class _Problems:
    """Record problems found: (kind, problem) -> row indices into images / annotations."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], np.ndarray] = {}

    def add(self, kind: str, problem: str, mask: np.ndarray) -> None:
        self.add_rows(kind, problem, np.flatnonzero(mask))

    def add_rows(self, kind: str, problem: str, rows: np.ndarray) -> None:
        if rows.size:
            old = self.rows.get((kind, problem))
            self.rows[(kind, problem)] = rows if old is None else np.union1d(old, rows)

    def mask(self, kind: str, n: int) -> np.ndarray:
        out = np.zeros(n, bool)
        for (k, _), rows in self.rows.items():
            if k == kind:
                out[rows] = True
        return out


def _labels(rows: np.ndarray, ids: np.ndarray, ok: np.ndarray, kind: str) -> list:
    """Record ids for messages: the integer id, else ``images[i]`` / ``annotations[i]``."""
    return [int(ids[r]) if ok[r] else f"{kind}s[{int(r)}]" for r in rows]


def _shown(rows: np.ndarray, ids: np.ndarray, ok: np.ndarray, kind: str,
           files: list | None = None) -> str:
    """The first few records of a problem, images with their file names."""
    labels = _labels(rows[:_SHOW], ids, ok, kind)
    if files is not None:
        labels = [f"{lab} ({files[r]})" if files[r] else str(lab)
                  for lab, r in zip(labels, rows[:_SHOW], strict=True)]
    more = f" and {rows.size - _SHOW} more" if rows.size > _SHOW else ""
    return ", ".join(map(str, labels)) + more


def validate_coco_keypoints(
    data: Any,
    source: str | Path = "annotations",
    num_keypoints: int | None = None,
    skip_invalid: bool = False,
    count_hint: str = "",
) -> tuple[dict, ValidationReport]:
    """Validate a loaded COCO keypoint dict (see the module docstring for the rules).

    Args:
        data: the loaded JSON.
        source: the file name, for messages.
        num_keypoints: the expected K (the layout's); None: the file's own.
        skip_invalid: drop invalid records (whole images) with a logged count instead of
            raising.
        count_hint: the fix appended to a keypoint-count mismatch error.

    Returns:
        (a new dict with the kept images, the kept person annotations (``bbox`` /
        ``num_keypoints`` filled in where absent, on copies), only the person category and
        the other top-level keys; the report). The input is not modified.
    """
    source = str(source)
    images, anns, categories = _structure(data, source)
    person = _person_category(categories, source)
    problems = _Problems()
    img = _check_images(images, problems)
    ann = _check_annotations(anns, categories, person["id"], img.known, problems)
    fields = _check_person_fields(ann, person, num_keypoints, source, count_hint, problems)
    problems.add("annotation", "'image_id' not in 'images'", ann.is_person & ~ann.image_known)

    if problems.rows and not skip_invalid:
        files = [im.get("file_name") if isinstance(im.get("file_name"), str) else None
                 for im in img.records]
        raise AnnotationError(_error_text(source, problems, (img.ids, img.id_ok, files),
                                          (ann.ids, ann.id_ok, None)))
    report = ValidationReport(source, fields.k, person["id"])
    keep_img, keep_sel = _keep(problems, img, ann, report)
    kept_images = [images[i] for i in keep_img]
    out_anns = _cleaned_annotations(anns, ann.sel, keep_sel, fields, report)

    report.num_images = len(kept_images)
    report.num_annotations = len(out_anns)
    report.other_category_annotations = int((ann.cat_known & ~ann.is_person).sum())
    _log_report(report, ann.cats, categories, ann.is_person, ann.cat_known)
    clean = {key: value for key, value in data.items()
             if key not in ("images", "annotations", "categories")}
    clean.update(images=kept_images, annotations=out_anns, categories=[person])
    return clean, report


@dataclass
class _Images:
    """The image records (non-dicts read as empty) and their ids."""

    records: list[dict]
    ids: np.ndarray
    id_ok: np.ndarray
    known: np.ndarray  # the distinct integer ids


@dataclass
class _Annotations:
    """The annotation records (non-dicts read as empty), their ids, categories and images."""

    records: list[dict]
    ids: np.ndarray
    id_ok: np.ndarray
    cats: list
    cat_known: np.ndarray
    is_person: np.ndarray
    image_ids: np.ndarray
    image_known: np.ndarray
    sel: np.ndarray  # the rows of the person annotations, the only ones read further


@dataclass
class _PersonFields:
    """The person annotations' keypoints and what is filled in (rows: positions in ``sel``)."""

    k: int | None
    rows: np.ndarray
    labelled: np.ndarray
    no_kp: np.ndarray
    derive: np.ndarray


def _check_images(images: list, problems: _Problems) -> _Images:
    """Check the images' ids (integer, unique) and file names."""
    m = len(images)
    img = [im if isinstance(im, dict) else {} for im in images]
    img_ids, img_id_ok = _int_ids([im.get("id") for im in img])
    problems.add("image", "image without an integer 'id'", ~img_id_ok)
    has_name = np.fromiter((isinstance(im.get("file_name"), str) and bool(im["file_name"])
                            for im in img), bool, m)
    problems.add("image", "image without a 'file_name'", img_id_ok & ~has_name)
    uniq, counts = np.unique(img_ids[img_id_ok], return_counts=True)
    duplicated = uniq[counts > 1]
    problems.add("image", "duplicate image id (ids must be unique: renumber them)",
                 img_id_ok & np.isin(img_ids, duplicated))
    return _Images(img, img_ids, img_id_ok, uniq)


def _check_annotations(anns: list, categories: list, person_id: int, known_images: np.ndarray,
                       problems: _Problems) -> _Annotations:
    """Check the annotations' ids (integer, unique) and categories; find their images."""
    n = len(anns)
    get = [a if isinstance(a, dict) else {} for a in anns]
    ann_ids, ann_id_ok = _int_ids([a.get("id") for a in get])
    problems.add("annotation", "annotation without an integer 'id'", ~ann_id_ok)
    uniq, counts = np.unique(ann_ids[ann_id_ok], return_counts=True)
    problems.add("annotation", "duplicate annotation id (ids must be unique)",
                 ann_id_ok & np.isin(ann_ids, uniq[counts > 1]))
    cat_ids = {c["id"] for c in categories}
    cats = [a.get("category_id") for a in get]
    cat_known = np.fromiter((type(c) is int and c in cat_ids for c in cats), bool, n)
    is_person = np.fromiter((type(c) is int and c == person_id for c in cats), bool, n)
    problems.add("annotation", "'category_id' not in 'categories'", ~cat_known)
    ann_img, ann_img_ok = _int_ids([a.get("image_id") for a in get])
    img_known = ann_img_ok & np.isin(ann_img, known_images)
    return _Annotations(get, ann_ids, ann_id_ok, cats, cat_known, is_person, ann_img,
                        img_known, np.flatnonzero(is_person))


def _check_person_fields(ann: _Annotations, person: dict, num_keypoints: int | None,
                         source: str, count_hint: str, problems: _Problems) -> _PersonFields:
    """Check the person annotations' fields (other categories are dropped unread)."""
    sel = ann.sel
    values = [ann.records[i] for i in sel]

    def add(problem: str, bad_sel: np.ndarray) -> None:
        problems.add_rows("annotation", problem, sel[bad_sel])

    kp_values = [a.get("keypoints") for a in values]
    k = _expected_keypoints(person, kp_values, num_keypoints, source, count_hint)
    crowd, crowd_given = _scalars([a.get("iscrowd") for a in values])
    add("'iscrowd' other than 0 or 1", crowd_given & ~np.isin(crowd, (0.0, 1.0)))
    # a crowd region may come without keypoints: it has none (zeros are filled in)
    no_kp = np.fromiter((v is None for v in kp_values), bool, len(sel)) & (crowd == 1)
    rows = _check_keypoint_rows(kp_values, no_kp, k, add)
    labelled = rows[:, 2::3] > 0

    box_values = [a.get("bbox") for a in values]
    box_given = np.fromiter((v is not None for v in box_values), bool, len(sel))
    boxes, _, box_num = number_rows(box_values, 4)
    box_ok = box_num & np.isfinite(boxes).all(1) & (boxes[:, 2] >= 0) & (boxes[:, 3] >= 0)
    add("'bbox' not 4 finite numbers [x, y, w, h] with w, h >= 0",
        box_given & ~box_ok)
    derive = ~box_given
    add("no 'bbox' and no labelled keypoint to derive one from",
        derive & ~labelled.any(1))
    for key in ("num_keypoints", "area"):
        value, given = _scalars([a.get(key) for a in values])
        add(f"'{key}' not a finite number >= 0",
            given & ~(np.isfinite(value) & (value >= 0)))
    return _PersonFields(k, rows, labelled, no_kp, derive)


def _expected_keypoints(person: dict, kp_values: list, num_keypoints: int | None,
                        source: str, count_hint: str) -> int | None:
    """K: the expected count, or else the file's; an error when the two differ."""
    kp_len = np.fromiter((len(v) if isinstance(v, (list, tuple)) else -1 for v in kp_values),
                         np.int64, len(kp_values))
    k_file = _file_keypoints(person, kp_len)
    if num_keypoints is not None and k_file is not None and k_file != num_keypoints:
        common = kp_len[(kp_len > 0) & (kp_len % 3 == 0)] // 3
        said = ", ".join(f"{c} ({cnt} annotations)" for c, cnt in
                         Counter(common.tolist()).most_common(3))
        raise KeypointCountError(
            f"{source}: the file has {k_file} keypoints (person category list; annotations: "
            f"{said or 'none'}) but {num_keypoints} are expected. {count_hint}".rstrip(),
            str(source), int(k_file), int(num_keypoints))
    return num_keypoints if num_keypoints is not None else k_file


def _check_keypoint_rows(kp_values: list, no_kp: np.ndarray, k: int | None,
                         add: Callable[[str, np.ndarray], None]) -> np.ndarray:
    """Check the ``keypoints`` lists; their (N, 3K) rows, zeros where a crowd region has none."""
    if k is None:  # no category keypoint list and no annotation with keypoints
        add("no 'keypoints' list", ~no_kp)
        return np.zeros((len(kp_values), 0))
    rows, shape_ok, numeric = number_rows(kp_values, 3 * k)
    rows[no_kp] = 0.0
    shape_ok |= no_kp
    numeric |= no_kp
    add(f"'keypoints' not a list of {3 * k} values (3 x {k} keypoints)", ~shape_ok)
    add("'keypoints' values null or not numbers", shape_ok & ~numeric)
    finite = np.isfinite(rows).all(1)
    add("'keypoints' values NaN or infinite", numeric & ~finite)
    vis_ok = np.isin(rows[:, 2::3], (0.0, 1.0, 2.0)).all(1)
    add("keypoint visibility flags other than 0, 1, 2", numeric & finite & ~vis_ok)
    return rows


def _keep(problems: _Problems, img: _Images, ann: _Annotations,
          report: ValidationReport) -> tuple[np.ndarray, np.ndarray]:
    """Report the skipped records; (the kept image rows, which person annotations are kept)."""
    for (kind, problem), bad_rows in problems.rows.items():
        target = report.skipped_images if kind == "image" else report.skipped_annotations
        target[problem] = (_labels(bad_rows, img.ids, img.id_ok, "image") if kind == "image"
                           else _labels(bad_rows, ann.ids, ann.id_ok, "annotation"))
    # An image holding an invalid annotation is dropped whole: a person left out would be
    # trained on (and evaluated) as background.
    bad_ann = problems.mask("annotation", len(ann.ids))
    bad_img = problems.mask("image", len(img.ids))
    holding = np.setdiff1d(ann.image_ids[bad_ann & ann.image_known], img.ids[bad_img])
    if holding.size:
        report.skipped_images["holding an invalid annotation (listed below)"] = \
            holding.tolist()
    keep_img = ~bad_img & ~np.isin(img.ids, holding)
    keep_sel = ~bad_ann[ann.sel] & np.isin(ann.image_ids[ann.sel], img.ids[keep_img])
    return np.flatnonzero(keep_img), keep_sel


def _cleaned_annotations(anns: list, sel: np.ndarray, keep_sel: np.ndarray,
                         fields: _PersonFields, report: ValidationReport) -> list[dict]:
    """The kept person annotations (copies where a field is filled in, counted in the report)."""
    rows, labelled = fields.rows, fields.labelled
    out_anns = []
    for j in np.flatnonzero(keep_sel):
        ann = anns[sel[j]]
        changes: dict[str, Any] = {}
        if fields.derive[j]:
            xy = rows[j].reshape(-1, 3)[labelled[j], :2]
            lo, hi = xy.min(0), xy.max(0)
            changes["bbox"] = [float(lo[0]), float(lo[1]), float(hi[0] - lo[0]),
                               float(hi[1] - lo[1])]
            report.derived_boxes.append(ann["id"])
        if fields.no_kp[j] and rows.shape[1]:
            changes["keypoints"] = [0] * rows.shape[1]
            report.zero_keypoints += 1
        if "num_keypoints" not in ann:
            changes["num_keypoints"] = int(labelled[j].sum())
            report.derived_num_keypoints += 1
        out_anns.append({**ann, **changes} if changes else ann)
    return out_anns


def _error_text(source: str, problems: _Problems, images: tuple, annotations: tuple) -> str:
    lines = [f"{source}: invalid records; fix them, or set data.skip_invalid=true to skip the "
             "images holding them (logged with their ids):"]
    for (kind, problem), rows in problems.rows.items():
        ids, ok, files = images if kind == "image" else annotations
        n = rows.size
        lines.append(f"  {problem}: {n} {kind}{'s' * (n > 1)}, id{'s' * (n > 1)} "
                     f"{_shown(rows, ids, ok, kind, files)}")
    return "\n".join(lines)


def _say_once(source: str, text: str, *args: Any) -> None:
    key = (source, text % args)
    if key not in _said:
        _said.add(key)
        log.warning(text, *args)


def _log_report(report: ValidationReport, cats: list, categories: list, is_person: np.ndarray,
                cat_known: np.ndarray) -> None:
    src = report.source
    if report.other_category_annotations:
        names = {c["id"]: str(c.get("name", c["id"])) for c in categories}
        counted = Counter(names[c] for c, p, k in zip(cats, is_person, cat_known, strict=True)
                          if k and not p)
        _say_once(src, "%s: %d annotations of other categories than 'person' (id %s) ignored: %s",
                  src, report.other_category_annotations, report.person_category_id,
                  ", ".join(f"{name} {m}" for name, m in counted.most_common()))
    if report.derived_boxes:
        _say_once(src, "%s: %d annotations have no 'bbox': derived from their labelled "
                  "keypoints (annotation ids %s)", src, len(report.derived_boxes),
                  _names(report.derived_boxes))
    for problem, ids in report.skipped_images.items():
        _say_once(src, "%s: skipped %d images (data.skip_invalid): %s: ids %s", src,
                  len(ids), problem, _names(ids, _LOG_IDS))
    for problem, ids in report.skipped_annotations.items():
        _say_once(src, "%s: skipped %d annotations (data.skip_invalid): %s: ids %s",
                  src, len(ids), problem, _names(ids, _LOG_IDS))
