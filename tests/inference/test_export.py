"""ONNX export with the decoding (pinet-export) and onnxruntime inference: the same people as
PyTorch, for our convention and the published one, batch 1 and 4, through the Predictor and
pinet-predict; errors that name the option."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import Tensor, nn

onnxruntime = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from pinet_lightning.cli.config import config_dir  # noqa: E402
from pinet_lightning.cli.export import main as export_main  # noqa: E402
from pinet_lightning.cli.predict import graph_decode_overrides, predict  # noqa: E402
from pinet_lightning.codec.codec import PINetCodec  # noqa: E402
from pinet_lightning.inference.decoding import DecodeConfig, decode_images, predict_poses  # noqa: E402
from pinet_lightning.inference.export import ExportError, export_network, export_onnx  # noqa: E402
from pinet_lightning.inference.onnx_model import OnnxPINet, onnx_providers  # noqa: E402
from pinet_lightning.inference.predictor import Person, Predictor  # noqa: E402
from pinet_lightning.model.checkpoints import save_model  # noqa: E402
from pinet_lightning.model.network import PINet  # noqa: E402

SMALL = 128  # the main job's input size


class Planted(nn.Module):
    """A random PINet whose part heatmaps get ``per_part`` isolated peaks per part (0.3..0.9,
    the same cells mirrored in the mirrored half of a flip-test batch), so that every image
    has P * per_part proposals, decoded with the network's own offsets and features."""

    def __init__(self, net: PINet, input_size: int, per_part: int = 30, spacing: int = 3
                 ) -> None:
        super().__init__()
        self.net = net
        self.layout, self.convention, self.output_stride = net.layout, net.convention, 4
        h = w = input_size // 4
        rng = np.random.default_rng(0)
        ys, xs = np.mgrid[2:h - 2:spacing, 2:w - 2:spacing]
        cells = np.stack([ys.ravel(), xs.ravel()], 1)
        planted = torch.zeros(net.layout.num_parts, h, w)
        for part in range(net.layout.num_parts):
            y, x = cells[rng.permutation(len(cells))[:per_part]].T
            planted[part, y, x] = torch.linspace(0.3, 0.9, per_part)
        self.register_buffer("planted", planted)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        out = dict(self.net(images))
        n = images.shape[0]
        half = n // 2  # the flip test's batch: the images, then their mirrors
        maps = torch.cat([self.planted.expand(half, -1, -1, -1),
                          self.planted.flip(-1).expand(n - half, -1, -1, -1)])
        out["part_heatmaps"] = torch.maximum(out["part_heatmaps"], maps)
        return out

    def refine(self, features, poses, cells, batch_index):
        return self.net.refine(features, poses, cells, batch_index)


def _network(convention: str, backbone: str = "hrnet_w18_small", seed: int = 0,
             size: int = SMALL, part_bias: float = 0.0) -> PINet:
    """A random PINet whose outputs are well conditioned for comparing two backends: batch
    norm statistics of random images (a random HRNet-W32's features reach 1e9 otherwise),
    keypoint heatmaps around 0.5 (keypoint scores not ~0) and
    offsets that spread every proposal's keypoints on a circle of 6 cells (random heads alone
    put all K keypoints on the peak: poses of zero area, whose OKS in pose fusion jumps with
    1e-4 px)."""
    torch.manual_seed(seed)
    net = PINet("crowdpose", backbone=backbone, convention=convention)
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.momentum = 1.0  # the running statistics become those of this batch
    with torch.no_grad():
        net.train()(torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8))
    for norm in norms:
        norm.momentum = 0.1
    net.eval()
    k, p = net.layout.num_keypoints, net.layout.num_parts
    angle = torch.arange(k) * (2 * torch.pi / k)
    circle = 6 * torch.stack([angle.cos(), angle.sin()], -1)  # (K, 2) keypoint - peak, cells
    with torch.no_grad():
        net.heads.heatmap.bias.fill_(0.5)
        net.heads.part_heatmap.bias.fill_(part_bias)
        net.heads.offset.bias.copy_((-circle).repeat(p, 1).reshape(-1))  # keypoint = cell - offset
    return net


def _images(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Planted, OnnxPINet]:
    """The main job's kind of network (HRNet-W18-small at 128, our convention; planted peaks)
    and its graph (flip test)."""
    model = Planted(_network("cell_center"), SMALL).eval()
    path = tmp_path_factory.mktemp("onnx") / "small.onnx"
    return model, OnnxPINet(export_network(model, path, SMALL, DecodeConfig()), device="cpu")


def _compare_candidates(model: nn.Module, graph: OnnxPINet, images: np.ndarray,
                        cfg: DecodeConfig) -> dict[str, float]:
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    with torch.inference_mode():
        poses, scores, valid = decode_images(model, batch, model.layout, cfg)
    got_poses, got_scores, got_valid = graph.candidates(batch)
    assert got_poses.shape == poses.shape and got_valid.dtype == torch.bool
    assert torch.equal(got_valid, valid)
    assert valid.sum() == valid.numel()  # every planted peak is a proposal
    errors = {
        "xy_px": float((got_poses[..., :2] - poses[..., :2]).abs().max()),
        "pose_score_rel": float(((got_scores - scores).abs() / scores.abs()).max()),
        # keypoint scores cross 0 (random heatmaps): errors relative to the largest score
        "keypoint_score_rel": float((got_poses[..., 2] - poses[..., 2]).abs().max()
                                    / poses[..., 2].abs().max()),
    }
    assert errors["xy_px"] < 0.01, errors
    assert errors["pose_score_rel"] < 1e-4, errors
    assert errors["keypoint_score_rel"] < 1e-4, errors
    return errors


def _same_people(got: list[Person], want: list[Person]) -> str:
    """The same people: a one-to-one match, keypoints within 0.01 px, scores within 1e-4
    (keypoint scores: of the largest); the figures as a line."""
    assert len(got) == len(want) > 0
    a = np.stack([p.keypoints for p in got])
    b = np.stack([p.keypoints for p in want])
    dist = np.abs(a[:, None, :, :2] - b[None, :, :, :2]).max(-1).max(-1)  # (F, F) max px
    match = dist.argmin(1)
    assert sorted(match.tolist()) == list(range(len(want)))
    assert dist[np.arange(len(got)), match].max() < 0.01
    np.testing.assert_allclose(a[..., 2], b[match][..., 2], rtol=0,
                               atol=1e-4 * np.abs(b[..., 2]).max())
    scores, wanted = np.array([p.score for p in got]), np.array([want[i].score for i in match])
    np.testing.assert_allclose(scores, wanted, rtol=1e-4)
    return (f"{len(got)} people, keypoints within {dist[np.arange(len(got)), match].max():.1e}"
            f" px, scores within {np.max(np.abs(scores - wanted) / np.abs(wanted)):.1e}")


def test_graph_checks_and_records_what_the_runtime_needs(exported):
    _, graph = exported
    onnx.checker.check_model(str(graph.path), full_check=True)
    model = onnx.load(str(graph.path))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["convention"] == "cell_center" and props["input_size"] == str(SMALL)
    assert props["pinet_lightning.format"] == "pinet_lightning.onnx"
    assert props["layout"] == "crowdpose"
    codec = PINetCodec.from_dict(json.loads(props["codec"]))  # the frame a runtime reads back
    assert codec == PINetCodec("crowdpose", input_size=SMALL) and graph.codec == codec
    assert json.loads(props["decode"]) == DecodeConfig().to_dict()
    (image_input,) = model.graph.input
    dims = image_input.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, SMALL, SMALL]
    assert image_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in model.graph.output] == ["candidates", "scores", "valid"]
    assert graph.layout.name == "crowdpose" and graph.convention.name == "cell_center"
    assert graph.input_size == SMALL and graph.decode == DecodeConfig()


@pytest.mark.parametrize("batch", [1, 4])
def test_candidates_match_pytorch_with_a_dynamic_batch(exported, batch):
    model, graph = exported
    errors = _compare_candidates(model, graph, _images(batch, SMALL, seed=batch), DecodeConfig())
    print(f"pinet_small 128 cell_center batch {batch}: {errors}")


def test_predictor_gives_the_same_people_as_pytorch(exported):
    model, graph = exported
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for s in (128, 200, 97)]
    torch_predictor = Predictor(model, input_size=SMALL, device="cpu", batch_size=2)
    onnx_predictor = Predictor(graph, batch_size=2)
    assert onnx_predictor.input_size == SMALL and onnx_predictor.device.type == "cpu"
    for got, want in zip(onnx_predictor(images), torch_predictor(images), strict=True):
        print("pinet_small 128 cell_center Predictor:", _same_people(got, want))


def test_non_square_images_are_fitted_into_the_graph_input(exported):
    model, graph = exported
    image = np.random.default_rng(7).integers(0, 256, (90, 160, 3), dtype=np.uint8)
    fitted, back = graph.resize(image)
    assert fitted.shape == (SMALL, SMALL, 3)
    # long side 160 -> 128: scale 0.8, content top-left (72 rows), zeros below
    assert np.allclose(back[:, :2], np.diag([160 / 128, 90 / 72]))
    assert not fitted[72:].any() and fitted[:72].any()
    batch = torch.from_numpy(fitted).permute(2, 0, 1)[None].contiguous()
    (poses, scores), = predict_poses(model, batch, None, back[None], DecodeConfig())
    want = [Person(p.numpy(), float(s)) for p, s in zip(poses, scores, strict=True)]
    _same_people(Predictor(graph)(image), want)


@pytest.fixture(scope="module")
def checkpoint_and_graph(tmp_path_factory):
    """A small network of the published convention saved as a model.pt (as pinet-convert
    writes one; its decoding keeps the 5 best peaks of each part, whatever their score), and
    the graph ``pinet-export`` makes of it without the flip test."""
    folder = tmp_path_factory.mktemp("ckpt")
    ckpt = folder / "model.pt"
    codec = PINetCodec("crowdpose", input_size=SMALL, convention="published")
    save_model(ckpt, _network("published", seed=1, part_bias=0.3),
               extra={"codec": codec.to_dict(),
                      "decode": {"top_k": 5, "score_threshold": -1.0}})
    out = folder / "model.onnx"
    export_main([str(ckpt), str(out), "--no-flip"])
    return ckpt, out


def test_pinet_export_of_a_checkpoint_keeps_its_settings(checkpoint_and_graph):
    ckpt, out = checkpoint_and_graph
    graph = OnnxPINet(out, device="cpu")
    assert graph.input_size == SMALL and graph.convention.name == "published"
    assert graph.decode.flip_test is False and graph.decode.top_k == 5
    assert json.loads(graph.metadata["source"])["checkpoint"] == "model.pt"
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for s in (128, 150)]
    want = Predictor.from_checkpoint(ckpt, device="cpu", flip_test=False)(images)
    onnx_predictor = Predictor.from_checkpoint(out)
    assert onnx_predictor.decode_cfg == graph.decode and onnx_predictor.input_size == SMALL
    for got, expected in zip(onnx_predictor(images), want, strict=True):
        print("pinet_small 128 published, no flip, pinet-export:", _same_people(got, expected))
    # pose fusion's settings apply at run time
    fewer = Predictor.from_checkpoint(out, max_people=2, oks_threshold=0.5)(images[0])
    assert len(fewer) == 2


def test_onnx_settings_fixed_in_the_graph_are_errors(checkpoint_and_graph):
    _, out = checkpoint_and_graph
    with pytest.raises(ValueError, match=r"flip_test=True \(the graph: False\).*Re-export"):
        Predictor.from_checkpoint(out, flip_test=True)
    with pytest.raises(ValueError, match="top_k=30"):
        Predictor.from_checkpoint(out, top_k=30)
    with pytest.raises(ValueError, match="input_size=256 needs a graph exported with "
                                         "--input-size 256"):
        Predictor.from_checkpoint(out, input_size=256)
    graph = OnnxPINet(out, device="cpu")
    with pytest.raises(ValueError, match=r"takes uint8 images \(B, 3, 128, 128\)"):
        graph.candidates(np.zeros((1, 3, 64, 64), np.uint8))


def test_pinet_predict_runs_the_graph_on_images_and_video(checkpoint_and_graph, tmp_path):
    ckpt, out = checkpoint_and_graph
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(4)
    for i in range(2):
        cv2.imwrite(str(folder / f"img{i}.png"), rng.integers(0, 256, (128, 128, 3), np.uint8))
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5, (160, 96))
    for _ in range(3):
        writer.write(rng.integers(0, 256, (96, 160, 3), np.uint8))
    writer.release()

    def run(ckpt_path, source, name, *extra):
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose("predict", overrides=[
                f"ckpt_path={ckpt_path}", f"input={source}", f"output_dir={tmp_path / name}",
                f"paths.output_dir={tmp_path / name}",
                "device=cpu", "draw=false", *extra])
        predict(cfg)
        return json.loads((tmp_path / name / "results.json").read_text())

    from_graph = run(out, folder, "onnx")  # decode defaults: the graph keeps its own
    # pinet-predict hands every decode.* setting to a checkpoint: the graph's, restated
    from_torch = run(ckpt, folder, "torch", "decode.flip_test=false", "decode.top_k=5",
                     "decode.score_threshold=-1")
    assert len(from_graph) == len(from_torch) > 0
    for a, b in zip(sorted(from_graph, key=lambda r: (r["image_id"], -r["score"])),
                    sorted(from_torch, key=lambda r: (r["image_id"], -r["score"])), strict=True):
        assert a["image_id"] == b["image_id"]
        assert np.allclose(a["keypoints"], b["keypoints"], atol=0.01)
        assert a["score"] == pytest.approx(b["score"], rel=1e-4)
    frames = run(out, video, "video")
    ids = json.loads((tmp_path / "video" / "image_ids.json").read_text())
    assert [i["file_name"] for i in ids] == [f"frame_{i:06d}.jpg" for i in range(3)]
    assert {r["image_id"] for r in frames} == {1, 2, 3}
    xy = np.array([r["keypoints"] for r in frames]).reshape(-1, 3)
    assert np.isfinite(xy).all()
    with pytest.raises(ValueError, match=r"top_k=7 \(the graph: 5\)"):
        run(out, folder, "bad", "decode.top_k=7")


def test_pinet_predict_passes_a_graph_the_decode_settings_given():
    decode = DecodeConfig(top_k=7).to_dict()
    # on the command line: exactly the decode.* keys named there, defaults included
    named = graph_decode_overrides(decode, ["input=x", "decode.flip_test=true", "+decode.top_k=7"])
    assert named == {"flip_test": True, "top_k": 7}
    assert graph_decode_overrides(decode, ["ckpt_path=m.onnx"]) == {}
    assert graph_decode_overrides(decode, None) == {"top_k": 7}  # composed: the changed ones


def test_what_cannot_be_exported_is_named(checkpoint_and_graph, tmp_path, capsys):
    ckpt, _ = checkpoint_and_graph
    with pytest.raises(ExportError, match=r"multi-scale test \(decode scales=\[1.0, 2.0\]\)"):
        export_onnx(ckpt, tmp_path / "x.onnx", scales=(1.0, 2.0))
    with pytest.raises(ExportError, match="multiple of 64.*--input-size 128"):
        export_onnx(ckpt, tmp_path / "x.onnx", input_size=100)
    with pytest.raises(SystemExit):
        export_main([str(ckpt), str(tmp_path / "x.onnx"), "--scales", "0.5", "1.0"])
    assert "scales=[0.5, 1.0]" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(FileNotFoundError, match="no such file"):
        OnnxPINet(tmp_path / "missing.onnx")
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(nn.Linear(2, 2).eval(), (torch.zeros(1, 2),), str(plain), dynamo=True,
                      verbose=False)
    with pytest.raises(ValueError, match="without pinet-lightning's metadata"):
        OnnxPINet(plain)


def test_cuda_without_onnxruntime_gpu_is_a_clear_error():
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    with pytest.raises(ValueError, match="pip install onnxruntime-gpu"):
        onnx_providers("cuda")
    assert onnx_providers("auto")[1].type == "cpu"


@pytest.mark.slow
def test_w32_at_512_with_crowded_peaks_published_convention(tmp_path):
    """A random HRNet-W32 network of the converted published weights' kind (published
    convention) at 512, 90 planted proposals an image: the same candidates and people."""
    net = _network("published", backbone="hrnet_w32", size=512)
    model = Planted(net, 512, spacing=5).eval()
    graph = OnnxPINet(export_network(model, tmp_path / "w32.onnx", 512, DecodeConfig()),
                      device="cpu")
    errors = _compare_candidates(model, graph, _images(1, 512, seed=9), DecodeConfig())
    print(f"w32 512 published batch 1: {errors}")
    image = np.random.default_rng(10).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    print("w32 512 published Predictor:", _same_people(
        Predictor(graph)(image), Predictor(model, input_size=512, device="cpu")(image)))
