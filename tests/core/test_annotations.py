"""The validation pass over COCO keypoint files (issue 10): every bad record is an error
naming the file, the id and the fix before any training, or with ``skip_invalid`` a logged,
counted skip; image files are checked when the dataset is built. Each case goes through
``CocoKeypointDataset`` (what training builds) and asserts the error type and the message."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from pinet_lightning.codec.codec import PINetCodec
from pinet_lightning.core.annotations import AnnotationError, validate_coco_keypoints
from pinet_lightning.data.datasets import CocoKeypointDataset, read_image

# 64 px inputs, dense targets (the tests read the maps)
CODEC_64 = PINetCodec(input_size=64, sparse=False)

K = 14


def _person(x, y, image_id=1, ann_id=1, category_id=1):
    kp = np.zeros((K, 3))
    kp[:, 0], kp[:, 1], kp[:, 2] = x + np.arange(K), y + np.arange(K), 2
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": 0,
            "keypoints": kp.reshape(-1).tolist(), "num_keypoints": K,
            "bbox": [x, y, K, K], "area": float(K * K)}


def _image(image_id, name=None, size=64):
    return {"id": image_id, "file_name": name or f"{image_id}.jpg", "height": size,
            "width": size}


def _coco(anns, images=None, categories=None) -> dict:
    cats = categories or [{"id": 1, "name": "person",
                           "keypoints": [f"k{i}" for i in range(K)], "skeleton": []}]
    return {"images": images or [_image(1), _image(2)], "annotations": anns,
            "categories": cats}


def _write(tmp_path: Path, data: dict | str) -> tuple[Path, Path]:
    """The json and one gray JPEG per image record (file names as given)."""
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    if isinstance(data, dict):
        for im in data.get("images", []):
            if isinstance(im, dict) and isinstance(im.get("file_name"), str):
                cv2.imwrite(str(img_dir / im["file_name"]), np.full((64, 64, 3), 90, np.uint8))
    ann = tmp_path / "ann.json"
    ann.write_text(data if isinstance(data, str) else json.dumps(data))
    return img_dir, ann


def _dataset(tmp_path, data, train=True, **kwargs):
    img_dir, ann = _write(tmp_path, data)
    return CocoKeypointDataset(img_dir, ann, codec=CODEC_64,
                               train=train, **kwargs)


def _two_people() -> dict:
    return _coco([_person(5, 5, 1, 1), _person(20, 20, 2, 2)])


# ----------------------------------------------------------------- structure
def test_duplicate_image_ids_are_an_error_naming_the_id_and_files(tmp_path):
    data = _coco([_person(5, 5, 7, 1)], images=[_image(7, "a.jpg"), _image(7, "b.jpg")])
    with pytest.raises(ValueError, match=r"ann\.json(.|\n)*duplicate image id(.|\n)*2 images, ids "
                                         r"7 \(a\.jpg\), 7 \(b\.jpg\)"):
        _dataset(tmp_path, data)


def test_duplicate_image_ids_skipped_under_skip_invalid(tmp_path, caplog):
    data = _coco([_person(5, 5, 7, 1), _person(5, 5, 8, 2)],
                 images=[_image(7, "a.jpg"), _image(7, "b.jpg"), _image(8, "c.jpg")])
    with caplog.at_level(logging.WARNING, logger="pinet_lightning.core.annotations"):
        ds = _dataset(tmp_path, data, skip_invalid=True)
    assert ds.image_ids == [8]  # both records of id 7 dropped, never mixed up
    assert ds.coco.getAnnIds(imgIds=[7]) == []
    assert "skipped 2 images" in caplog.text and "7" in caplog.text


def test_annotation_of_an_unknown_image_is_an_error_naming_it(tmp_path):
    data = _two_people()
    data["annotations"].append(_person(5, 5, image_id=99, ann_id=31))
    with pytest.raises(ValueError, match=r"ann\.json(.|\n)*'image_id' not in 'images': "
                                         r"1 annotation, id 31"):
        _dataset(tmp_path, data)
    (tmp_path / "skip").mkdir()
    ds = _dataset(tmp_path / "skip", data, skip_invalid=True)
    assert ds.image_ids == [1, 2] and 31 not in ds.coco.anns


@pytest.mark.parametrize("train", [True, False])
def test_other_categories_are_ignored_with_a_count(tmp_path, caplog, train):
    cats = [{"id": 1, "name": "person", "keypoints": [f"k{i}" for i in range(K)]},
            {"id": 2, "name": "dog", "keypoints": [f"k{i}" for i in range(K)]}]
    data = _coco([_person(5, 5, 1, 1), _person(30, 30, 1, 2, category_id=2),
                  _person(5, 5, 2, 3, category_id=2)], categories=cats)
    with caplog.at_level(logging.WARNING, logger="pinet_lightning.core.annotations"):
        ds = _dataset(tmp_path, data, train=train)
    assert sorted(ds.coco.anns) == [1]  # the dog is not trained (or evaluated) as a person
    assert ds.image_ids == ([1] if train else [1, 2])  # image 2 holds no person
    assert "2 annotations of other categories" in caplog.text and "dog 2" in caplog.text


def test_person_category_chosen_by_name_else_the_only_one_with_keypoints(tmp_path):
    cats = [{"id": 5, "name": "hand"}, {"id": 3, "name": "pedestrian",
                                       "keypoints": [f"k{i}" for i in range(K)]}]
    data = _coco([_person(5, 5, 1, 1, category_id=3)], categories=cats)
    clean, report = validate_coco_keypoints(data, "x.json")
    assert report.person_category_id == 3 and clean["categories"] == [cats[1]]
    cats.append({"id": 4, "name": "rider", "keypoints": ["a"] * K})
    with pytest.raises(AnnotationError, match=r"x\.json: no person category.*'person'"):
        validate_coco_keypoints(data, "x.json")


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_sections_are_errors(tmp_path, key):
    data = _two_people()
    del data[key]
    with pytest.raises(ValueError, match=rf"ann\.json: '{key}' is missing"):
        _dataset(tmp_path, data)


def test_invalid_json_names_the_file_and_position(tmp_path):
    with pytest.raises(ValueError, match=r"^annotation file \S*ann\.json is not valid JSON.*"
                                         r"line 1, column"):
        _dataset(tmp_path, '{"images": [}')


# ----------------------------------------------------------------- fields
def test_missing_bbox_is_derived_from_the_keypoints_and_said_once(tmp_path, caplog):
    data = _two_people()
    del data["annotations"][0]["bbox"]
    data["annotations"][1]["bbox"] = None
    with caplog.at_level(logging.WARNING, logger="pinet_lightning.core.annotations"):
        ds = _dataset(tmp_path, data)
    assert ds.coco.anns[1]["bbox"] == [5.0, 5.0, K - 1.0, K - 1.0]  # the labelled extent
    assert ds.coco.anns[2]["bbox"] == [20.0, 20.0, K - 1.0, K - 1.0]
    assert caplog.text.count("have no 'bbox'") == 1 and "2 annotations" in caplog.text
    report = ds.coco.validation  # the validation report, kept with the index
    assert (report.num_images, report.num_annotations) == (2, 2)
    assert sorted(report.derived_boxes) == [1, 2]
    assert ds[0]["heatmaps"].ndim == 3  # trains (evaluation: see test_reliability)


def test_missing_bbox_without_labelled_keypoints_is_an_error(tmp_path):
    data = _two_people()
    ann = data["annotations"][0]
    del ann["bbox"]
    ann["keypoints"] = [0] * (3 * K)
    with pytest.raises(ValueError,
                       match=r"no 'bbox' and no labelled keypoint.*: 1 annotation, id 1"):
        _dataset(tmp_path, data)


@pytest.mark.parametrize("value,problem", [
    (None, "values null or not numbers"), ("12", "values null or not numbers"),
    (float("nan"), "values NaN or infinite"), (float("inf"), "values NaN or infinite")])
def test_bad_keypoint_values_name_the_annotation(tmp_path, value, problem):
    data = _two_people()
    data["annotations"][1]["keypoints"][3] = value
    with pytest.raises(ValueError,
                       match=rf"ann\.json(.|\n)*'keypoints' {problem}: 1 annotation, id 2"):
        _dataset(tmp_path, data)


def test_bad_visibility_flag_and_keypoint_count_name_the_annotation(tmp_path):
    data = _two_people()
    data["annotations"][0]["keypoints"][2] = 3
    data["annotations"][1]["keypoints"] = data["annotations"][1]["keypoints"][:-3]
    with pytest.raises(ValueError) as err:
        _dataset(tmp_path, data)
    text = str(err.value)
    assert "visibility flags other than 0, 1, 2: 1 annotation, id 1" in text
    assert f"'keypoints' not a list of {3 * K} values (3 x {K} keypoints): 1 annotation, id 2" \
        in text
    assert "data.skip_invalid=true" in text  # the way out is named


def test_crowd_region_without_keypoints_gets_zeros_a_person_does_not(tmp_path):
    data = _two_people()
    crowd = {"id": 9, "image_id": 1, "category_id": 1, "iscrowd": 1, "bbox": [30, 0, 20, 10]}
    data["annotations"].append(crowd)
    ds = _dataset(tmp_path, data)
    assert ds.coco.anns[9]["keypoints"] == [0] * (3 * K)
    assert ds.coco.anns[9]["num_keypoints"] == 0 and "keypoints" not in crowd
    del data["annotations"][0]["keypoints"]  # a person without keypoints: an error
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match=r"'keypoints' not a list of 42 values.*1 annotation, "
                                         r"id 1"):
        _dataset(tmp_path / "b", data)


@pytest.mark.parametrize("bbox", [[1, 2, 3], [1, 2, float("nan"), 4], [1, 2, -3, 4], "box"])
def test_bad_bbox_names_the_annotation(tmp_path, bbox):
    data = _two_people()
    data["annotations"][1]["bbox"] = bbox
    with pytest.raises(ValueError, match=r"'bbox' not 4 finite.*: 1 annotation, id 2"):
        _dataset(tmp_path, data)


def test_skip_invalid_drops_the_whole_image_of_a_bad_annotation(tmp_path, caplog):
    data = _coco([_person(5, 5, 1, 1), _person(20, 20, 1, 2), _person(20, 20, 2, 3)])
    data["annotations"][1]["keypoints"][0] = None
    with caplog.at_level(logging.WARNING, logger="pinet_lightning.core.annotations"):
        ds = _dataset(tmp_path, data, skip_invalid=True)
    # person 1 alone would be trained with person 2 as background: image 1 goes whole
    assert ds.image_ids == [2] and sorted(ds.coco.anns) == [3]
    assert "skipped 1 images" in caplog.text and "skipped 1 annotations" in caplog.text
    assert "ids 2" in caplog.text


def test_validation_does_not_modify_the_input():
    data = _two_people()
    del data["annotations"][0]["bbox"]
    before = copy.deepcopy(data)
    clean, report = validate_coco_keypoints(data, "x.json", num_keypoints=K)
    assert data == before and "bbox" in clean["annotations"][0]
    assert report.derived_boxes == [1] and report.num_annotations == 2


# ----------------------------------------------------------------- image files
def test_missing_image_file_is_found_at_the_start(tmp_path):
    img_dir, ann = _write(tmp_path, _two_people())
    (img_dir / "2.jpg").unlink()
    # before any sample is read (not mid-epoch), naming the file and its image id
    with pytest.raises(FileNotFoundError, match=r"ann\.json(.|\n)*1 missing(.|\n)*2 2\.jpg"):
        CocoKeypointDataset(img_dir, ann, codec=CODEC_64)
    ds = CocoKeypointDataset(img_dir, ann, codec=CODEC_64,
                             skip_invalid=True)
    assert ds.image_ids == [1]


def _truncated_jpeg(path: Path) -> None:
    x = np.linspace(0, 255, 64)
    image = np.stack([np.add.outer(x, x) / 2] * 3, -1).astype(np.uint8)
    data = cv2.imencode(".jpg", image)[1].tobytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_jpeg_is_named_not_trained_as_gray(tmp_path):
    img_dir, ann = _write(tmp_path, _two_people())
    _truncated_jpeg(img_dir / "2.jpg")
    with pytest.raises(FileNotFoundError, match=r"1 truncated JPEG(.|\n)*2 2\.jpg"):
        CocoKeypointDataset(img_dir, ann, codec=CODEC_64)
    ds = CocoKeypointDataset(img_dir, ann, codec=CODEC_64,
                             skip_invalid=True)
    assert ds.image_ids == [1]
    with pytest.raises(OSError, match=r"2\.jpg is a truncated JPEG"):
        read_image(img_dir / "2.jpg")  # OpenCV alone returns it with a gray lower half


def test_read_image_names_a_folder_as_a_folder(tmp_path):
    (tmp_path / "x.jpg").mkdir()
    with pytest.raises(IsADirectoryError, match=r"x\.jpg is a folder"):
        read_image(tmp_path / "x.jpg")


def test_real_crowdpose_file_passes_unchanged(crowdpose_val_json):
    data = json.loads(crowdpose_val_json.read_text())
    clean, report = validate_coco_keypoints(data, crowdpose_val_json, num_keypoints=14)
    assert clean["annotations"] == data["annotations"]  # nothing to fill in or drop
    assert len(clean["images"]) == 2000 and report.num_annotations == 8527
    assert not report.skipped_images and not report.derived_boxes
