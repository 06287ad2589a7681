"""PINetCodec: the frame (pixels <-> cells, resize, decode) and the targets, configured once,
stored as plain data."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pinet_lightning.codec.batch import OmegaBatch, train_collate
from pinet_lightning.codec.codec import TARGET_DEFAULTS, PINetCodec
from pinet_lightning.codec.conventions import cells_to_image, get_convention
from pinet_lightning.codec.targets import PINetTargetCodec, encode_targets
from pinet_lightning.core.layouts import get_layout

K = 14


def _people(seed: int = 0, n: int = 3, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    kp = np.concatenate([rng.uniform(2, size - 2, (n, K, 2)), np.full((n, K, 1), 2.0)], -1)
    kp[0, :3, 2] = 0  # some unlabelled keypoints
    return kp, rng.uniform(200, 900, n)


def test_defaults_and_plain_round_trip():
    codec = PINetCodec()
    assert (codec.layout.name, codec.input_size, codec.output_stride, codec.convention,
            codec.sparse) == ("crowdpose", 512, 4, "cell_center", True)
    assert codec.targets == TARGET_DEFAULTS and codec.output_size == 128
    custom = PINetCodec("coco", input_size=96, convention="PUBLISHED", sparse=False,
                        targets={"sigma": 1.5})
    plain = custom.to_dict()
    assert plain["convention"] == "published" and plain["targets"]["sigma"] == 1.5
    assert plain["targets"]["radius"] == 2 and type(plain["layout"]) is dict
    again = PINetCodec.from_dict(plain)
    assert again == custom and again.layout == get_layout("coco")
    assert PINetCodec.from_any({"_target_": "x.y", **plain}) == custom  # a Hydra node
    assert PINetCodec.from_any(custom) is custom
    assert PINetCodec.from_any(custom, input_size=128).input_size == 128
    assert PINetCodec.from_any("coco", input_size=96) == PINetCodec("coco", input_size=96)
    assert PINetCodec.from_any(get_layout("ochuman")).layout.name == "ochuman"


def test_fields_become_plain_values():
    """A Hydra node may give strings or numpy numbers: the fields are stored as the plain
    int / bool / lower-case name the checkpoint and every stage read."""
    codec = PINetCodec("coco", input_size="128", output_stride=np.int64(2), sparse=1,
                       convention="Published")
    assert (codec.input_size, codec.output_stride, codec.sparse, codec.convention) == (
        128, 2, True, "published")
    assert type(codec.input_size) is int and type(codec.output_stride) is int
    assert codec.sparse is True and codec.output_size == 64
    assert PINetCodec(sparse=0).sparse is False
    # stride 1 is a valid stride (cells are pixels)
    assert PINetCodec(input_size=64, output_stride=1).output_size == 64


def test_codec_survives_a_weights_only_load(tmp_path):
    codec = PINetCodec("ochuman", input_size=128, targets={"min_part_area": 1024.0})
    torch.save({"codec": codec.to_dict()}, tmp_path / "c.pt")
    blob = torch.load(tmp_path / "c.pt", weights_only=True)
    assert PINetCodec.from_dict(blob["codec"]) == codec


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"input_size": 100}, r"codec.input_size=100 must be a positive multiple of 32.*96 or 128"),
    ({"input_size": 0}, r"codec.input_size=0 must be a positive multiple of 32.*"
                        r"use codec.input_size=32$"),
    ({"input_size": 40}, r"use codec.input_size=32 or 64$"),  # 32 is the lowest size offered
    ({"output_stride": 3, "input_size": 64}, r"codec.output_stride=3 must divide"),
    ({"output_stride": 0, "input_size": 64},
     r"^codec.output_stride=0 must divide codec.input_size=64$"),
    ({"convention": "pixel"}, r"unknown convention 'pixel'"),
    ({"targets": {"sigmaa": 2.0}}, r"unknown codec.targets keys \['sigmaa'\]"),
    ({"targets": {"offsets_format": "omega"}}, r"the batch format is codec.sparse"),
])
def test_bad_settings_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PINetCodec(**kwargs)


def test_for_network_takes_the_networks_frame():
    net = SimpleNamespace(layout=get_layout("coco"), output_stride=8,
                          convention=get_convention("published"))
    assert PINetCodec.for_network(net) == PINetCodec("coco", output_stride=8,
                                                     convention="published")
    # overrides win over the network's fields and fill the others
    assert PINetCodec.for_network(net, input_size=128, convention="cell_center") == PINetCodec(
        "coco", input_size=128, output_stride=8, convention="cell_center")
    # a network without a stride or a convention: the defaults (4, cell_center)
    assert PINetCodec.for_network(SimpleNamespace(layout="ochuman")) == PINetCodec("ochuman")
    with pytest.raises(ValueError, match=r"codec.output_stride=3 must divide"):
        PINetCodec.for_network(SimpleNamespace(layout="coco", output_stride=3))


def test_from_dict_refuses_an_unknown_field():
    with pytest.raises(ValueError, match="unknown codec fields"):
        PINetCodec.from_dict({"input_sise": 64})


@pytest.mark.parametrize("convention", ["cell_center", "published"])
@pytest.mark.parametrize("sparse", [True, False])
def test_encode_in_pixels_is_encode_targets_in_cells(convention, sparse):
    codec = PINetCodec(input_size=64, convention=convention, sparse=sparse,
                       targets={"sigma": 1.5})
    kp, areas = _people()
    mask = np.ones((64, 64), np.uint8)
    mask[:, :10] = 0  # 2.5 cells: cell 2 is half ignored, so ignored
    got = codec.encode(kp, areas, ignore_mask=mask)
    cells = kp.copy()
    cells[..., :2] = get_convention(convention).input_to_cell(kp[..., :2], 4)
    small = np.ones((16, 16), np.float32)
    small[:, :3] = 0
    formats = ({"offsets_format": "omega", "heatmaps_format": "windows"} if sparse else {})
    want = encode_targets(cells, areas, "crowdpose", (16, 16), sigma=1.5, ignore_mask=small,
                          **formats)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert np.array_equal(kp, _people()[0])  # the caller's keypoints are not modified


def test_encode_casts_the_keypoints_and_averages_the_mask_over_each_cell():
    codec = PINetCodec(input_size=64, sparse=False)
    kp, areas = _people()
    kp = np.round(kp)
    # integer pixels are cast to float before the mapping to cells (no truncation)
    got = codec.encode(kp.astype(np.int64), areas)
    want = codec.encode(kp, areas)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # columns 4c and 4c + 3 of every cell ignored: half of every cell, so every cell is
    # ignored (an area average; a bilinear shrink would read columns 4c + 1, 4c + 2 only)
    mask = np.ones((64, 64), np.float32)
    mask[:, 0::4] = mask[:, 3::4] = 0
    ignored = codec.encode(kp, areas, ignore_mask=mask)
    assert not ignored["heatmap_mask"].any()
    # a bool mask is read as 0 / 1
    half = np.ones((64, 64), bool)
    half[:, :32] = False
    as_bool = codec.encode(kp, areas, ignore_mask=half)
    as_float = codec.encode(kp, areas, ignore_mask=half.astype(np.float32))
    np.testing.assert_array_equal(as_bool["heatmap_mask"], as_float["heatmap_mask"])
    assert as_bool["heatmap_mask"][:, :, :8].sum() == 0 and as_bool["heatmap_mask"][:, :, 8:].all()


def test_to_cells_and_to_input_invert_each_other():
    for convention in ("cell_center", "published"):
        codec = PINetCodec(input_size=64, convention=convention)
        px = np.array([[0.0, 0.0], [13.5, 40.25], [63.0, 1.0]])
        back = codec.to_input(torch.from_numpy(codec.to_cells(px)))
        np.testing.assert_allclose(back.numpy(), px, atol=1e-12)
    assert PINetCodec(input_size=64).to_cells(np.array([1.5, 5.5])).tolist() == [0.0, 1.0]
    assert PINetCodec(input_size=64, convention="published").to_cells(
        np.array([4.0, 8.0])).tolist() == [1.0, 2.0]
    # cells are float64 whatever the pixels' dtype (the precision encode_targets works in)
    assert PINetCodec(input_size=64).to_cells(np.array([1.5, 5.5], np.float32)).dtype == np.float64


def test_collate_and_device_readers_are_the_sparse_batch():
    codec = PINetCodec(input_size=64)
    samples = []
    for seed in range(2):
        kp, areas = _people(seed)
        targets = codec.encode(kp, areas)
        samples.append({"image": torch.zeros(3, 64, 64, dtype=torch.uint8),
                        **{k: torch.from_numpy(v) for k, v in targets.items()}})
    batch = codec.collate(samples)
    reference = train_collate(samples)
    assert batch.keys() == reference.keys()
    assert torch.equal(batch["omega_index"], reference["omega_index"])
    omega = codec.omega(batch, 2)
    assert isinstance(omega, OmegaBatch) and omega.shape == (2, 3, K, 16, 16)
    heat = codec.heatmap_targets(batch)
    assert heat["heatmaps"].shape == (2, K, 16, 16) and heat["part_heatmaps"].shape[1] == 3
    dense = PINetTargetCodec("crowdpose", 16)  # the rendered maps equal the dense encoder's
    cells = _people(0)[0].copy()
    cells[..., :2] = codec.to_cells(cells[..., :2])
    want = dense.encode(cells, _people(0)[1])
    assert torch.equal(heat["heatmaps"][0], torch.from_numpy(want["heatmaps"]))


def test_decode_and_resize_follow_the_convention():
    image = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    for convention in ("cell_center", "published"):
        codec = PINetCodec(input_size=64, convention=convention)
        resized, back = codec.resize(image)
        want = get_convention(convention).resize(image, 64, 64)
        assert np.array_equal(resized, want[0]) and np.allclose(back, want[1])
        poses = torch.tensor([[[[3.0, 5.0, 0.9], [0.0, 1.0, 0.2]]]])
        back_t = torch.from_numpy(back[None]).float()
        assert torch.equal(codec.decode(poses, back_t),
                           cells_to_image(poses, back_t, convention, 4))
    assert PINetCodec(input_size=96).resize(image)[0].shape == (128, 192, 3)
    assert PINetCodec(input_size=96).resize(image, multiple=32)[0].shape == (96, 160, 3)
    # the codec's stride reaches the mapping: cell x is pixel 2 x + 0.5 at stride 2
    poses = torch.tensor([[[[3.0, 5.0, 0.5]]]])
    got = PINetCodec(input_size=64, output_stride=2).decode(poses, torch.eye(2, 3)[None])
    assert got.tolist() == [[[[6.5, 10.5, 0.5]]]]


def test_replace_keeps_the_checks():
    codec = PINetCodec(input_size=64)
    with pytest.raises(ValueError, match="multiple of 32"):
        dataclasses.replace(codec, input_size=70)


def test_check_network_names_the_setting():
    """A network whose output stride or convention is not the codec's is refused, naming the
    codec setting to change; a network that states neither passes."""
    ours = PINetCodec("crowdpose", input_size=128)
    net = SimpleNamespace(output_stride=4, convention=get_convention("cell_center"))
    ours.check_network(net)
    ours.check_network(SimpleNamespace())  # a user's own network states neither
    ours.check_network(SimpleNamespace(output_stride="4", convention="CELL_CENTER"))
    with pytest.raises(ValueError, match=r"^codec.output_stride=4 but the network's output "
                                         r"maps are input/2: set codec.output_stride=2$"):
        ours.check_network(SimpleNamespace(output_stride=2, convention="cell_center"))
    with pytest.raises(ValueError, match=r"^codec.convention=published but the network decodes "
                                         r"with 'cell_center': set codec.convention=cell_center "
                                         r"\(it feeds the network and the data\)$"):
        PINetCodec("crowdpose", convention="published").check_network(net)
    with pytest.raises(ValueError, match=r"^codec.convention=cell_center but the network "
                                         r"decodes with 'published': set "
                                         r"codec.convention=published "):
        ours.check_network(SimpleNamespace(convention=get_convention("published")))
