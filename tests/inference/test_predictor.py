"""Predictor: inputs (array, path, list), checkpoints (save_model file, Lightning), errors."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from test_decoding import OracleNet, _crowd, _match

import pinet_lightning.inference.predictor as predictor_module
from pinet_lightning.data.augmentation import inference_resize
from pinet_lightning.inference.decoding import DecodeConfig
from pinet_lightning.inference.predictor import Person, Predictor
from pinet_lightning.model.checkpoints import save_model
from pinet_lightning.model.network import PINet

# Keep every proposal (random weights give near-zero part heatmaps) so results are non-empty.
KEEP_ALL = {"score_threshold": -1.0, "top_k": 5}


@pytest.fixture(scope="module")
def small_net():
    pytest.importorskip("timm")

    torch.manual_seed(0)
    return PINet("crowdpose", backbone="hrnet_w18_small", refine_layers=1).eval()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(48, 80, 3), dtype=np.uint8)


def _same(a: list[Person], b: list[Person]) -> None:
    assert len(a) == len(b)
    for pa, pb in zip(a, b, strict=True):
        np.testing.assert_allclose(pa.keypoints, pb.keypoints, rtol=1e-5, atol=1e-4)
        assert pa.score == pytest.approx(pb.score, rel=1e-5)


def test_predictor_inputs_array_path_and_list(small_net, image, tmp_path):
    predictor = Predictor(small_net, decode_cfg=KEEP_ALL, input_size=64, device="cpu")
    people = predictor(image)
    assert isinstance(people, list) and len(people) > 0
    assert all(isinstance(p, Person) for p in people)
    assert people[0].keypoints.shape == (14, 3) and isinstance(people[0].score, float)
    # Keypoints come back in the original image's frame (80 x 48), not the 64-px input's.
    xy = np.stack([p.keypoints[:, :2] for p in people])
    assert np.isfinite(xy).all()
    path = tmp_path / "img.png"
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    batch = predictor([str(path), image[:, ::-1].copy()])  # a path and an array
    assert len(batch) == 2 and len(batch[1]) > 0
    _same(batch[0], people)
    stacked = predictor(np.stack([image[:, ::-1], image]))  # an (N, H, W, 3) array
    assert len(stacked) == 2
    _same(stacked[1], people)
    _same(stacked[0], batch[1])


def test_min_score_drops_weak_people_only(small_net, image, monkeypatch):
    scores = torch.tensor([0.9, 0.05, 0.3, 0.1])
    poses = torch.arange(4 * 14 * 3, dtype=torch.float32).reshape(4, 14, 3)

    def fake_predict_poses(net, images, layout, back, cfg):
        return [(poses, scores) for _ in range(images.shape[0])]

    monkeypatch.setattr(predictor_module, "predict_poses", fake_predict_poses)
    everyone = Predictor(small_net, input_size=64, device="cpu")(image)
    assert [p.score for p in everyone] == pytest.approx([0.9, 0.05, 0.3, 0.1])
    kept = Predictor(small_net, input_size=64, device="cpu", min_score=0.1)(image)
    assert [p.score for p in kept] == pytest.approx([0.9, 0.3, 0.1])
    np.testing.assert_array_equal(kept[1].keypoints, poses[2].numpy())


def test_from_checkpoint_save_model_file(small_net, image, tmp_path):
    path = tmp_path / "pinet.pt"
    save_model(path, small_net, extra={"decode": {"flip_test": False}})
    loaded = Predictor.from_checkpoint(path, device="cpu", input_size=64, **KEEP_ALL)
    assert loaded.decode_cfg.flip_test is False  # from the file's extra
    assert loaded.decode_cfg.top_k == 5  # from the overrides
    direct = Predictor(small_net, decode_cfg=DecodeConfig(flip_test=False, **KEEP_ALL),
                       input_size=64, device="cpu")
    _same(loaded(image), direct(image))


def test_from_checkpoint_lightning(small_net, image, tmp_path):
    layout = small_net.layout.to_dict()
    hparams = {"layout": layout,
               "network": {"backbone": "hrnet_w18_small", "pretrained": "/no/such/file.pth",
                           "refine_layers": 1, "feature_channels": None},
               "decode": {"flip_test": True, "top_k": 30, "score_threshold": 0.01,
                          "oks_threshold": 0.7, "scales": [1.0]}}
    state = {f"net.{k}": v for k, v in small_net.state_dict().items()}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": hparams, "epoch": 3}, path)
    loaded = Predictor.from_checkpoint(path, device="cpu", input_size=64, **KEEP_ALL)
    assert loaded.layout.name == small_net.layout.name and loaded.decode_cfg.flip_test
    direct = Predictor(small_net, decode_cfg=KEEP_ALL, input_size=64, device="cpu")
    _same(loaded(image), direct(image))


def test_from_checkpoint_uses_the_trained_input_size(small_net, tmp_path):
    path = tmp_path / "with_size.pt"
    save_model(path, small_net, extra={"input_size": 128})
    assert Predictor.from_checkpoint(path, device="cpu").input_size == 128
    assert Predictor.from_checkpoint(path, device="cpu", input_size=96).input_size == 96
    bare = tmp_path / "bare.pt"
    save_model(bare, small_net)
    assert Predictor.from_checkpoint(bare, device="cpu").input_size == 512
    # a Lightning checkpoint carries its data module's settings, input size included (no
    # config.yaml is read: a stray one beside the file changes nothing)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("data:\n  input_size: 999\n")
    hparams = {"layout": small_net.layout.to_dict(),
               "network": {"backbone": "hrnet_w18_small", "refine_layers": 1}}
    state = {f"net.{k}": v for k, v in small_net.state_dict().items()}
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": hparams,
                "datamodule_hyper_parameters": {"input_size": 256}}, ckpt)
    assert Predictor.from_checkpoint(ckpt, device="cpu").input_size == 256


def test_from_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ckpt': no such file"):
        Predictor.from_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(FileNotFoundError, match="a folder, not a file"):
        Predictor.from_checkpoint(tmp_path)
    bad = tmp_path / "bad.ckpt"
    torch.save({"weights": 1}, bad)
    with pytest.raises(ValueError, match="bad.ckpt' is neither a model.pt"):
        Predictor.from_checkpoint(bad)


def test_bad_images(small_net, tmp_path):
    predictor = Predictor(small_net, input_size=64, device="cpu")
    with pytest.raises(ValueError, match="RGB"):
        predictor(np.zeros((32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        predictor(np.zeros((32, 32, 3), dtype=np.float32))
    with pytest.raises(FileNotFoundError, match=r"none\.jpg does not exist"):
        predictor(tmp_path / "none.jpg")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    with pytest.raises(OSError, match=r"cannot decode image .*junk\.jpg"):
        predictor(junk)


def test_predictor_round_trip_through_inference_resize():
    """Known people in an original 300 x 200 image come back in its pixels, exactly."""

    image = np.zeros((300, 200, 3), dtype=np.uint8)
    resized, back = inference_resize(image, 256)
    people_in = _crowd()  # in the network input's pixels (256 wide)
    people_in[..., 1] *= resized.shape[0] / 256  # spread over the taller input
    inv = cv2.invertAffineTransform(back)
    assert resized.shape[:2] == (384, 256)
    people = people_in.copy()
    people[..., :2] = people_in[..., :2] @ back[:, :2].T + back[:, 2]
    assert np.allclose(people[..., :2] @ inv[:, :2].T + inv[:, 2], people_in[..., :2])
    predictor = Predictor(OracleNet(people_in, resized.shape[:2]), input_size=256, device="cpu")
    found = predictor(image)
    assert len(found) == len(people)
    dist, who = _match(np.stack([p.keypoints for p in found]), people[..., :2])
    assert sorted(who.tolist()) == list(range(len(people))) and dist.max() < 1e-2
