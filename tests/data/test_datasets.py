"""CocoKeypointDataset: errors, ignore masks, train / eval samples, path presets."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pinet_lightning.codec.codec import PINetCodec
from pinet_lightning.core.layouts import get_layout
from pinet_lightning.data.datasets import CocoKeypointDataset

# 64 px inputs, dense targets (the tests read the maps)
CODEC_64 = PINetCodec(input_size=64, sparse=False)

IDENTITY = {"max_rotation": 0, "min_scale": 1, "max_scale": 1, "max_translate": 0,
            "flip_prob": 0.0}
K = 14


def _person(x, y, image_id=1, ann_id=1):
    kp = np.zeros((K, 3))
    kp[:, 0], kp[:, 1], kp[:, 2] = x + np.arange(K), y + np.arange(K), 2
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
            "keypoints": kp.reshape(-1).tolist(), "num_keypoints": K,
            "bbox": [x, y, K, K], "area": float(K * K)}


def _write(tmp_path: Path, annotations, images=None, size=64, k=K) -> tuple[Path, Path]:
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    images = images or [{"id": 1, "file_name": "a.jpg", "height": size, "width": size}]
    for im in images:
        cv2.imwrite(str(img_dir / im["file_name"]), np.full((im["height"], im["width"], 3), 90,
                                                            np.uint8))
    cat = {"id": 1, "name": "person", "keypoints": [f"k{i}" for i in range(k)], "skeleton": []}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations,
                               "categories": [cat]}))
    return img_dir, ann


def test_missing_files_raise_clear_errors(tmp_path):
    img_dir, ann = _write(tmp_path, [_person(5, 5)])
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoKeypointDataset(img_dir, tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="image folder"):
        CocoKeypointDataset(tmp_path / "noimg", ann)


def test_wrong_keypoint_count_names_file_and_fix(tmp_path):
    img_dir, ann = _write(tmp_path, [_person(5, 5)])
    with pytest.raises(ValueError, match=r"ann\.json.*has 14 keypoints.*17 are expected.*"
                       r"layout is 'coco'.*top-level override layout=crowdpose \(14 keypoints\) "
                       r"or layout=coco / layout=ochuman \(17\), or describe yours in "
                       r"conf/layout/ and pass layout=<its name>$"):
        CocoKeypointDataset(img_dir, ann, codec=PINetCodec("coco", sparse=False))


def test_unreadable_and_missing_image_raise(tmp_path):
    images = [{"id": 1, "file_name": "a.jpg", "height": 64, "width": 64},
              {"id": 2, "file_name": "b.jpg", "height": 64, "width": 64}]
    img_dir, ann = _write(tmp_path, [_person(5, 5), _person(5, 5, image_id=2, ann_id=2)], images)
    (img_dir / "a.jpg").write_bytes(b"not a jpeg")
    ds = CocoKeypointDataset(img_dir, ann, codec=CODEC_64,
                             train=False)
    with pytest.raises(OSError, match=r"a\.jpg.*image id 1"):
        ds[0]
    (img_dir / "b.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"b\.jpg"):  # found at the start
        CocoKeypointDataset(img_dir, ann, codec=CODEC_64,
                            train=False)


def test_ignore_mask_from_crowd_and_empty_people(tmp_path):
    crowd = {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 1, "keypoints": [0] * 3 * K,
             "num_keypoints": 0, "bbox": [40, 0, 24, 16],
             "segmentation": [[40, 0, 63, 0, 63, 15, 40, 15]]}
    empty = {"id": 3, "image_id": 1, "category_id": 1, "iscrowd": 0, "keypoints": [0] * 3 * K,
             "num_keypoints": 0, "bbox": [0, 48, 16, 16]}  # no segmentation: its box
    img_dir, ann = _write(tmp_path, [_person(8, 8), crowd, empty])
    ds = CocoKeypointDataset(img_dir, ann, codec=CODEC_64, train=True,
                             augmentation=IDENTITY, ignore_regions=True)  # COCO's choice
    _, info, anns = ds.load(0)
    kps, boxes, mask = ds.people(anns, 64, 64)
    # the empty non-crowd annotation is a person (no keypoints: no targets), the crowd not
    assert kps.shape == (2, K, 3) and boxes.tolist() == [[8, 8, K, K], [0, 48, 16, 16]]
    assert (kps[1, :, 2] == 0).all()
    assert mask[:16, 40:].min() == 0 and mask[2:14, 42:62].max() == 0
    assert mask[48:, :16].max() == 0
    assert mask[20:40, 10:30].min() == 1
    sample = ds[0]
    hm = sample["heatmap_mask"]
    assert torch.all(hm[:, 0:3, 11:15] == 0)  # crowd region at output stride 4
    assert torch.all(hm[:, 13:, 0:3] == 0)
    assert torch.all(hm[:, 6:9, 6:9] > 0)
    # CrowdPose / OCHuman (the default): no ignore mask
    plain = CocoKeypointDataset(img_dir, ann, codec=CODEC_64, train=True,
                                augmentation=IDENTITY)
    assert plain.people(anns, 64, 64)[2].min() == 1
    assert torch.all(plain[0]["heatmap_mask"] > 0)


def test_crowdpose_head_and_neck_only_people_are_trained_on(tmp_path):
    # CrowdPose's num_keypoints counts the 12 body joints only: a person with just head (12)
    # and neck (13) labelled has num_keypoints 0 but is a person (v flags decide).
    kp = np.zeros((K, 3))
    kp[12] = [40.0, 30.0, 2]
    kp[13] = [40.0, 38.0, 1]
    head_only = {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 0,
                 "keypoints": kp.reshape(-1).tolist(), "num_keypoints": 0,
                 "bbox": [30, 24, 20, 24]}
    img_dir, ann = _write(tmp_path, [_person(4, 4), head_only])
    codec = PINetCodec(input_size=64, targets={"sigma": 1.0}, sparse=False)
    ds = CocoKeypointDataset(img_dir, ann, codec=codec, train=True, augmentation=IDENTITY)
    kps, _, mask = ds.people(ds.load(0)[2], 64, 64)
    assert len(kps) == 2 and mask.min() == 1
    s = ds[0]
    # head at input (40, 30) -> cell (9.625, 7.125): its Gaussian is there, not masked
    assert s["heatmaps"][12, 7, 10] > 0.6 and s["heatmaps"][13].max() > 0.6
    assert torch.all(s["heatmap_mask"][:, 5:12, 6:13] > 0)
    head = get_layout("crowdpose").part_names.index("head")
    assert s["part_heatmaps"][head, 7:10, 8:12].max() > 0.6  # its head part center
    assert s["offset_weights"][head * K * 2: (head + 1) * K * 2, 7:11, 8:12].max() > 0


def test_padding_is_ignored_by_the_heatmap_loss(tmp_path):
    img_dir, ann = _write(tmp_path, [_person(20, 20)])
    zoom_out = {**IDENTITY, "min_scale": 2.0, "max_scale": 2.0}  # image = central half
    s = CocoKeypointDataset(img_dir, ann, codec=CODEC_64, train=True,
                            augmentation=zoom_out)[0]
    # 16 x 16 output cells; the image covers the central 8 x 8, the rest is padding
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[4:12, 4:12] = True
    assert torch.all(s["heatmap_mask"][:, ~inside] == 0)
    assert torch.all(s["part_mask"][:, ~inside] == 0)
    assert torch.all(s["heatmap_mask"][:, inside] > 0)
    kept = CocoKeypointDataset(img_dir, ann, codec=CODEC_64, train=True,
                               augmentation={**zoom_out, "ignore_padding": False})[0]
    assert torch.all(kept["heatmap_mask"] > 0)


def test_image_filters(tmp_path):
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 64, "width": 64} for i in range(1, 5)]

    def labelled(n, image_id, ann_id, stored=None):
        a = _person(5, 5, image_id=image_id, ann_id=ann_id)
        a["keypoints"] = [v if i % 3 < 2 or i // 3 < n else 0 for i, v in
                          enumerate(a["keypoints"])]
        a["num_keypoints"] = n if stored is None else stored
        return a

    crowd = {"id": 9, "image_id": 3, "category_id": 1, "iscrowd": 1, "keypoints": [0] * 3 * K,
             "num_keypoints": 0, "bbox": [0, 0, 8, 8]}
    # image 5: 12 labelled keypoints, but its file says 4 + 4 (the stored count decides)
    anns = [labelled(10, 1, 1), labelled(6, 2, 2), labelled(6, 2, 3), crowd,
            labelled(6, 5, 5, stored=4), labelled(6, 5, 6, stored=4)]  # image 4: none
    images.append({"id": 5, "file_name": "5.jpg", "height": 64, "width": 64})
    img_dir, ann = _write(tmp_path, anns, images)
    # CrowdPose / OCHuman: every image with at least one annotation, even a crowd region
    assert CocoKeypointDataset(img_dir, ann, codec=CODEC_64).image_ids == [1, 2, 3, 5]
    # COCO: the annotations' num_keypoints summing to more than 10 (published)
    coco = CocoKeypointDataset(img_dir, ann, codec=CODEC_64, min_image_keypoints=10)
    assert coco.image_ids == [2]


def test_train_sample_shapes_and_keypoint_cells(tmp_path):
    img_dir, ann = _write(tmp_path, [_person(9.5, 9.5)])
    codec = PINetCodec(input_size=64, output_stride=4, targets={"sigma": 1.0}, sparse=False)
    ds = CocoKeypointDataset(img_dir, ann, codec=codec, train=True, augmentation=IDENTITY)
    s = ds[0]
    layout = get_layout("crowdpose")
    p = layout.num_parts
    shapes = {"image": (3, 64, 64), "heatmaps": (K, 16, 16), "heatmap_mask": (K, 16, 16),
              "part_heatmaps": (p, 16, 16), "part_mask": (p, 16, 16),
              "offsets": (p * K * 2, 16, 16), "offset_weights": (p * K * 2, 16, 16)}
    assert {k: tuple(v.shape) for k, v in s.items()} == shapes
    assert s["image"].dtype == torch.uint8
    assert all(s[k].dtype == torch.float32 for k in shapes if k != "image")
    # keypoint 0 at input (9.5, 9.5) -> cell ((9.5 - 1.5) / 4) = (2, 2): the heatmap peaks there
    assert s["heatmaps"][0, 2, 2] == pytest.approx(1.0)
    assert s["heatmaps"][0, 2, 3] == pytest.approx(np.exp(-0.5))  # sigma 1, one cell away
    assert s["offset_weights"].max() == pytest.approx(1 / K)  # 1 / sqrt(box area)


def test_train_mode_skips_images_without_people(tmp_path, caplog):
    images = [{"id": 1, "file_name": "a.jpg", "height": 64, "width": 64},
              {"id": 2, "file_name": "b.jpg", "height": 64, "width": 64}]
    img_dir, ann = _write(tmp_path, [_person(5, 5, image_id=2)], images)
    with caplog.at_level("INFO", logger="pinet_lightning.data.datasets"):
        train = CocoKeypointDataset(img_dir, ann, codec=CODEC_64,
                                    train=True)
    assert train.image_ids == [2]
    assert "skipped 1 without annotations" in caplog.text
    assert CocoKeypointDataset(img_dir, ann, codec=CODEC_64,
                               train=False).image_ids == [1, 2]


def test_eval_sample_back_transform(tmp_path):
    images = [{"id": 7, "file_name": "a.jpg", "height": 50, "width": 80}]
    img_dir, ann = _write(tmp_path, [_person(5, 5, image_id=7)], images)
    ds = CocoKeypointDataset(img_dir, ann, codec=CODEC_64,
                             train=False)
    s = ds[0]
    assert s["image"].dtype == torch.uint8 and tuple(s["image"].shape) == (3, 64, 128)
    assert s["image_id"] == 7 and tuple(s["orig_size"]) == (50, 80)
    back = s["back_transform"].numpy()
    assert back.dtype == np.float32 and back.shape == (2, 3)
    edge = back[:, :2] @ np.array([-0.5, -0.5]) + back[:, 2]
    np.testing.assert_allclose(edge, [-0.5, -0.5], atol=1e-5)
    np.testing.assert_allclose(back[0, 0], 80 / 102, rtol=1e-5)  # 80 * 64/50 = 102.4 -> 102


def test_synthetic_crowd_train_sample(synthetic_crowd):
    images, ann = synthetic_crowd
    ds = CocoKeypointDataset(images, ann, codec=PINetCodec(input_size=128, sparse=False),
                             train=True)
    s = ds[0]
    assert tuple(s["heatmaps"].shape) == (14, 32, 32)
    assert s["heatmaps"].max() > 0.9 and (s["offset_weights"] > 0).any()


def test_real_crowdpose_annotations(crowdpose_val_json, tmp_path):
    (tmp_path / "images").mkdir()
    for image in json.loads(crowdpose_val_json.read_text())["images"]:
        # present and not empty (checked at start); never decoded here
        (tmp_path / "images" / image["file_name"]).write_bytes(b"x")
    ds = CocoKeypointDataset(tmp_path / "images", crowdpose_val_json,
                             codec=PINetCodec("crowdpose", sparse=False))
    assert 0 < len(ds) <= 2000
    with pytest.raises(ValueError, match="crowdpose_val.json"):
        CocoKeypointDataset(tmp_path / "images", crowdpose_val_json,
                            codec=PINetCodec("coco", sparse=False))
