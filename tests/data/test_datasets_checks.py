"""The data checks of datasets.py and images.py by hand: the JPEG truncation walk on crafted
bytes, the image-file problems and their messages, crowd regions from polygons, RLE and
boxes, and the labelled-keypoint count."""

from __future__ import annotations

import logging
import re

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pinet_lightning.core.images import (
    _jpeg_truncation,
    check_image_files,
    image_file_problem,
    read_image,
)
from pinet_lightning.data.datasets import _hull, _region

SOI, EOI, SOS = b"\xff\xd8", b"\xff\xd9", b"\xff\xda\x00\x04\x11\x22"
SCAN = b"\x12\xff\x00\x34"  # scan data: FF is followed by 00
CUT = "no end-of-image marker after its image data"
HEADER = "it ends inside its header"


@pytest.mark.parametrize(("data", "want"), [
    (SOI + SOS + SCAN + EOI, None),  # whole
    (SOI + SOS + SCAN, CUT),  # cut in the scan
    (SOI + SOS + SCAN + EOI + b"video", None),  # data after the end is allowed
    (SOI + b"\xff\xe0\x00\x06abcd" + SOS + SCAN + EOI, None),  # a segment with a length
    (SOI + b"\xff\xe0\x00\x06a" + EOI + b"d" + SOS + SCAN + EOI, None),  # FF D9 in a header
    (SOI + b"\xff\xe0\x00\x06a" + EOI + b"d" + SOS + SCAN, CUT),  # ... and none after it
    (SOI + b"\xff\xff" + SOS + SCAN, CUT),  # a fill byte before a marker
    (SOI + b"\xff\xff\xff" + SOS + SCAN, CUT),  # two fill bytes
    (SOI + b"\xff\xd8" + SOS + SCAN, HEADER),  # D8 is not a marker without a length
    (SOI + b"\xff\xd0" + SOS + SCAN, CUT),  # markers without a length: RST0 ...
    (SOI + b"\xff\xd7" + SOS + SCAN, CUT),  # ... RST7 ...
    (SOI + b"\xff\x01" + SOS + SCAN, CUT),  # ... and TEM
    (SOI + b"\xff\xd0" + SOS + SCAN + EOI, None),
    (SOI + b"\xff\xe0\x00", HEADER),  # ends inside a header
    (SOI + b"\xff\xe0\x00\x10ab", HEADER),  # a segment longer than the file
    (SOI + b"\x12\x34\x56\x78", None),  # not a marker: left to the decoder
    (SOI + EOI + b"\x00\x00", None),  # an end before any image: left to the decoder
    (b"\x89PNG\r\n\x1a\n", None),  # not a JPEG
])
def test_jpeg_truncation_walk(data, want):
    assert _jpeg_truncation(data) == want


def test_image_file_problems_and_messages(tmp_path, caplog):
    whole = SOI + SOS + SCAN + EOI
    (tmp_path / "ok.jpg").write_bytes(whole)
    (tmp_path / "padded.jpg").write_bytes(whole + b"\x00" * 10)
    (tmp_path / "cut.jpg").write_bytes(SOI + SOS + SCAN)
    (tmp_path / "dir.jpg").mkdir()
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert image_file_problem(tmp_path / "ok.jpg") is None
    assert image_file_problem(tmp_path / "padded.jpg") is None
    assert image_file_problem(tmp_path / "cut.jpg") == CUT
    assert image_file_problem(tmp_path / "cut.jpg", full=True) == CUT
    assert image_file_problem(tmp_path / "dir.jpg") == "folder"
    assert image_file_problem(tmp_path / "no.jpg") == "missing"
    assert image_file_problem(tmp_path / "empty.jpg") == "empty"
    with pytest.raises(OSError, match=re.escape(
            f"image {tmp_path / 'empty.jpg'} is empty (0 bytes): an interrupted download or "
            "copy? replace it, or set data.skip_invalid=true to skip it") + "$"):
        read_image(tmp_path / "empty.jpg")
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"image {tmp_path / 'no.jpg'} does not exist; check the images folder")):
        read_image(tmp_path / "no.jpg")
    with pytest.raises(IsADirectoryError, match="is a folder, not an image file"):
        read_image(tmp_path / "dir.jpg")
    with pytest.raises(OSError, match=re.escape(
            f"image {tmp_path / 'cut.jpg'} is a truncated JPEG ({CUT}): the file was cut short "
            "(an interrupted download or copy?); replace it, or set data.skip_invalid=true to "
            "skip it")):
        read_image(tmp_path / "cut.jpg")
    records = ([{"id": i, "file_name": f"m{i}.jpg"} for i in range(7)]
               + [{"id": 10, "file_name": "cut.jpg"}, {"id": 11, "file_name": "dir.jpg"},
                  {"id": 13, "file_name": "empty.jpg"}, {"id": 12, "file_name": "ok.jpg"}])
    lines = ("  7 missing (image id file): 0 m0.jpg, 1 m1.jpg, 2 m2.jpg, 3 m3.jpg, 4 m4.jpg "
             "and 2 more\n  1 truncated JPEG (image id file): 10 cut.jpg\n"
             "  1 folder (image id file): 11 dir.jpg\n"
             "  1 empty file (0 bytes) (image id file): 13 empty.jpg")
    with pytest.raises(FileNotFoundError) as err:
        check_image_files(tmp_path, records, "ann.json")
    assert str(err.value) == (
        f"ann.json: image files under {tmp_path} that cannot be used:\n{lines}\nfix the images "
        "folder (data.<split>.images) or the files, or set data.skip_invalid=true to skip "
        "these images")
    with caplog.at_level(logging.WARNING, logger="pinet_lightning.core.images"):
        skipped = check_image_files(tmp_path, records, "ann.json", skip_invalid=True)
    assert skipped == {0, 1, 2, 3, 4, 5, 6, 10, 11, 13}
    assert (f"ann.json: skipped 10 images whose files cannot be used (data.skip_invalid):\n"
            f"{lines}") in caplog.text
    five = check_image_files(tmp_path, records[:5], "a.json", skip_invalid=True)
    assert five == {0, 1, 2, 3, 4} and "more" not in caplog.text.split("a.json")[-1]
    assert check_image_files(tmp_path, records[-1:], "a.json") == set()


def test_regions_from_polygons_rle_and_boxes():
    poly = {"segmentation": [[2, 2, 6, 2, 6, 5, 2, 5]]}
    want = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly["segmentation"],
                                                                     8, 10)))
    got = _region(poly, 8, 10)
    np.testing.assert_array_equal(got, want)
    assert got.shape == (8, 10) and got.sum() > 0
    raw = np.zeros((8, 10), np.uint8, order="F")
    raw[1:4, 3:9] = 1
    compressed = mask_utils.encode(raw)
    np.testing.assert_array_equal(_region({"segmentation": compressed}, 8, 10), raw)
    counts = [int(c) for c in _uncompressed_counts(raw)]
    uncompressed = {"segmentation": {"counts": counts, "size": [8, 10]}}
    np.testing.assert_array_equal(_region(uncompressed, 8, 10), raw)
    box = _region({"bbox": [0.5, 0.2, 3.0, 2.5]}, 8, 10)  # pixels 0..3 x 0..2
    assert box.dtype == np.uint8 and set(np.unique(box)) == {0, 1}
    assert box[:3, :4].all() and box.sum() == 12
    assert _region({"bbox": [8.5, 6.5, 9.0, 9.0]}, 8, 10).sum() == 4  # clipped to the image
    assert _region({}, 8, 10).sum() == 0


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: run lengths of the column-major mask, starting with 0s."""
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return counts


def test_a_broken_header_is_caught_by_the_full_walk_only(tmp_path):
    """The start-up check trusts a file that ends with FF D9; reading it walks it all."""
    path = tmp_path / "odd.jpg"
    path.write_bytes(SOI + b"\xff\xe0\x40\x00" + SOS + SCAN + EOI)  # a header past the end
    assert image_file_problem(path) is None
    assert image_file_problem(path, full=True) == HEADER
    with pytest.raises(OSError, match=re.escape(f"is a truncated JPEG ({HEADER})")):
        read_image(path)
    tail = tmp_path / "tail.jpg"  # a whole image followed by 100 bytes of other data
    tail.write_bytes(SOI + b"\xff\xe0\x40\x00" + SOS + SCAN + EOI + b"\x01" * 100)
    assert image_file_problem(tail) == HEADER  # no FF D9 at the end: the walk decides


def test_read_image_is_rgb_and_refuses_undecodable_files(tmp_path):
    bgr = np.zeros((6, 8, 3), np.uint8)
    bgr[..., 2] = 250  # red in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "red.png"), bgr)
    rgb = read_image(tmp_path / "red.png")
    assert rgb.shape == (6, 8, 3) and rgb[0, 0].tolist() == [250, 0, 0]
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(OSError, match="cannot decode image .*junk.jpg: the file is corrupt or "
                                      "not an image; replace it or remove it from the "
                                      "annotation file"):
        read_image(tmp_path / "junk.jpg")


def test_hull_of_the_labelled_keypoints():
    kp = np.array([[1.0, 2.0, 2], [5.0, 7.0, 1], [9.0, 9.0, 0]])
    assert _hull(kp) == [1.0, 2.0, 4.0, 5.0]  # v = 0 points left out
    assert _hull(np.zeros((3, 3))) == [0.0, 0.0, 0.0, 0.0]
