"""Decoding: peaks, offsets, round trips through encoded targets, flip test, multi-scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pinet_lightning.codec.conventions import get_convention
from pinet_lightning.codec.targets import encode_targets
from pinet_lightning.core.layouts import get_layout
from pinet_lightning.inference.decoding import (
    DecodeConfig,
    decode_outputs,
    find_peaks,
    gather_offsets,
    nms_kernel_size,
    predict_poses,
    sample_maps,
)
from pinet_lightning.model.refinement import sample_features

LAYOUT = get_layout("crowdpose")
K = LAYOUT.num_keypoints
STRIDE, CELL_OFFSET = 4, 1.5

# A standing person in a unit box (CrowdPose order), x to the image's right.
_TEMPLATE = np.array([
    [0.65, 0.25], [0.35, 0.25], [0.75, 0.40], [0.25, 0.40], [0.80, 0.55], [0.20, 0.55],
    [0.60, 0.55], [0.40, 0.55], [0.62, 0.75], [0.38, 0.75], [0.63, 0.95], [0.37, 0.95],
    [0.50, 0.05], [0.50, 0.17],
])


def _person(x0: float, y0: float, w: float, h: float, lean: float = 0.0) -> np.ndarray:
    xy = _TEMPLATE * [w, h] + [x0, y0]
    xy[:, 0] += lean * (1 - _TEMPLATE[:, 1]) * w  # shear: poses differ, not just shifted
    return np.concatenate([xy, np.full((K, 1), 2.0)], 1)


def _crowd() -> np.ndarray:
    """Four people in network-input pixels of a 256 x 256 input, boxes overlapping."""
    return np.stack([
        _person(20, 30, 80, 190),
        _person(70, 50, 90, 180, lean=0.3),  # overlaps the first person's box by ~40 %
        _person(150, 20, 70, 150, lean=-0.2),
        _person(160, 120, 60, 120),  # overlaps the third
    ])


def _to_cells(xy: np.ndarray) -> np.ndarray:
    return (xy - CELL_OFFSET) / STRIDE


def _mirror_input(people: np.ndarray, width: int) -> np.ndarray:
    """Mirror people in input pixels: x -> W - 1 - x and left/right swapped."""
    m = people[:, list(LAYOUT.flip_index)].copy()
    m[..., 0] = width - 1 - m[..., 0]
    return m


class OracleNet(nn.Module):
    """A stand-in network whose outputs are the encoded targets of known people (one image,
    or an image and its mirror), at whatever input size it is run; refine returns a fixed
    correction and records its calls."""

    def __init__(self, people: np.ndarray, base_size: tuple[int, int],
                 correction: float = 0.0, convention: str = "cell_center") -> None:
        super().__init__()
        self.people = people  # (N, K, 3) in base input pixels
        self.base_h, self.base_w = base_size
        self.correction = correction
        self.refine_calls: list[tuple] = []
        self.layout = LAYOUT
        self.drawn_with = self.convention = get_convention(convention)  # decoding reads
        self.output_stride = STRIDE                                       # .convention

    def _targets(self, people: np.ndarray, h: int, w: int) -> dict[str, np.ndarray]:
        cells = people.copy()
        cells[..., :2] = self.drawn_with.input_to_cell(cells[..., :2], STRIDE)
        ext = people[..., :2].max(1) - people[..., :2].min(1)
        return encode_targets(cells, ext[:, 0] * ext[:, 1], LAYOUT, (h // STRIDE, w // STRIDE))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        n, _, h, w = images.shape
        sx, sy = w / self.base_w, h / self.base_h
        people = self.people.copy()  # base input px -> this input's px, centers aligned
        people[..., 0] = (people[..., 0] + 0.5) * sx - 0.5
        people[..., 1] = (people[..., 1] + 0.5) * sy - 0.5
        maps = [self._targets(people, h, w)]
        if n == 2:  # the published mirror is shifted stride - 1 px left
            shift = STRIDE - 1 if self.drawn_with.name == "published" else 0
            maps.append(self._targets(_mirror_input(people, w - shift), h, w))
        out = {key: torch.from_numpy(np.stack([m[key] for m in maps]))
               for key in ("heatmaps", "part_heatmaps", "offsets")}
        out["features"] = torch.zeros(n, 2, h // STRIDE, w // STRIDE)
        return out

    def refine(self, features, poses, cells, batch_index):
        self.refine_calls.append((features.shape, poses.shape, cells.clone(),
                                  batch_index.clone()))
        return torch.full_like(poses, self.correction)


def test_nms_kernel_size_thresholds():
    assert nms_kernel_size(128, 128) == 3
    assert nms_kernel_size(200, 202) == 5
    assert nms_kernel_size(300, 300) == 5
    assert nms_kernel_size(300, 302) == 7
    assert nms_kernel_size(128, 128, DecodeConfig(nms_medium_size=100)) == 5
    custom = DecodeConfig(nms_kernels=(9, 7, 1))
    assert [nms_kernel_size(s, s, custom) for s in (128, 256, 512)] == [1, 7, 9]
    with pytest.raises(ValueError, match="three odd"):
        DecodeConfig(nms_kernels=(7, 4, 3))


def test_find_peaks_local_maxima_topk_and_threshold():
    maps = torch.zeros(1, 2, 10, 12)
    maps[0, 0, 2, 3] = 0.9
    maps[0, 0, 2, 4] = 0.5  # neighbour of a higher peak: suppressed by the 3x3 max-pool
    maps[0, 0, 7, 9] = 0.7
    maps[0, 0, 5, 0] = 0.005  # below the threshold
    maps[0, 1, 9, 11] = 0.3
    scores, index, valid = find_peaks(maps, top_k=4, score_threshold=0.01, kernel=3)
    assert scores.shape == index.shape == valid.shape == (1, 2, 4)
    assert torch.allclose(scores[0, 0, :3], torch.tensor([0.9, 0.7, 0.005]))
    assert index[0, 0, :2].tolist() == [2 * 12 + 3, 7 * 12 + 9]
    assert valid[0, 0].tolist() == [True, True, False, False]
    assert index[0, 1, 0].item() == 9 * 12 + 11 and valid[0, 1].sum() == 1
    # A kernel of 7 merges peaks 3 cells apart.
    maps[0, 0, 2, 6] = 0.8
    assert find_peaks(maps, 4, 0.01, 3)[2][0, 0].sum() == 3
    assert find_peaks(maps, 4, 0.01, 7)[2][0, 0].sum() == 2


def test_gather_offsets_channel_order():
    p, h, w = LAYOUT.num_parts, 5, 6
    offsets = torch.zeros(1, p * K * 2, h, w)
    for part in range(p):
        for k in range(K):
            for c in range(2):
                offsets[0, (part * K + k) * 2 + c] = 1000 * part + 10 * k + c
    offsets[0, :, 3, 4] += 0.5  # mark the cell (x=4, y=3)
    index = torch.full((1, p, 1), 3 * w + 4)
    got = gather_offsets(offsets, index, K)
    assert got.shape == (1, p, 1, K, 2)
    want = (1000 * torch.arange(p)[:, None, None] + 10 * torch.arange(K)[None, :, None]
            + torch.arange(2)[None, None, :] + 0.5)
    assert torch.equal(got[0, :, 0], want.float())


def test_sample_maps_bilinear_per_channel():
    maps = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4)
    pts = torch.tensor([[[1.5, 0.5], [3.0, 2.0], [-1.0, 0.0], [0.25, 1.0]]])
    got = sample_maps(maps, pts, torch.tensor([0, 1, 0, 1]))
    want = [(1 + 2 + 5 + 6) / 4, 12 + 11, 0.0, 12 + 4 + 0.25]
    assert torch.allclose(got[0], torch.tensor(want))
    # Half outside: the outside corners count 0, like grid_sample's zero padding.
    assert torch.allclose(sample_maps(maps, torch.tensor([[[3.5, 0.0]]]), torch.tensor([0])),
                          torch.tensor([[1.5]]))


def _match(found: np.ndarray, people: np.ndarray) -> np.ndarray:
    """For each found pose, the max keypoint distance to its nearest person."""
    d = np.linalg.norm(found[:, None, :, :2] - people[None, :, :, :2], axis=-1).max(-1)
    return d.min(1), d.argmin(1)


def test_round_trip_targets_decode_back_to_the_poses():
    people = _crowd()
    net = OracleNet(people, (256, 256))
    outputs = net(torch.zeros(1, 3, 256, 256))
    cfg = DecodeConfig(flip_test=False)
    out = decode_outputs(outputs, LAYOUT, cfg)  # no refine_fn: coarse poses
    n = LAYOUT.num_parts * cfg.top_k
    assert out["poses"].shape == (1, n, K, 3) and out["valid"].shape == (1, n)
    valid = out["valid"][0].numpy()
    found = out["poses"][0].numpy()[valid]
    assert len(found) == LAYOUT.num_parts * len(people)  # one peak per part and person
    gt_cells = _to_cells(people[..., :2])
    dist, who = _match(found, gt_cells)
    assert dist.max() < 1e-3  # exact up to float32 (the SPEC asks for 0.5 output px)
    assert sorted(np.bincount(who, minlength=len(people)).tolist()) == [3] * len(people)
    # Pose score = part heatmap at the peak, keypoint score = pose score x heatmap there.
    scores = out["scores"][0].numpy()[valid]
    assert np.all(scores > 0.9) and np.all(scores <= 1.0)
    kpt = found[..., 2]
    assert np.all(kpt <= scores[:, None] + 1e-6) and np.all(kpt > 0.5 * scores[:, None])


@pytest.mark.parametrize("flip_test", [False, True])
def test_predict_poses_round_trip_in_original_pixels(flip_test):
    people = _crowd()
    net = OracleNet(people, (256, 256))
    # network input px -> original px: scale 2.5, shifted
    back = torch.tensor([[[2.5, 0.0, 7.0], [0.0, 2.5, -3.0]]])
    cfg = DecodeConfig(flip_test=flip_test)
    (poses, scores), = predict_poses(net, torch.zeros(1, 3, 256, 256, dtype=torch.uint8),
                                     LAYOUT, back, cfg)
    assert poses.shape == (len(people), K, 3) and scores.shape == (len(people),)
    gt = people[..., :2] * 2.5 + [7.0, -3.0]
    dist, who = _match(poses.numpy(), gt)
    assert sorted(who.tolist()) == list(range(len(people)))  # every person found once
    # Exact with the 1.5 cell offset; mirroring with x_in = 4 x would be 0.75 cell off.
    assert dist.max() < 1e-2
    assert torch.all(scores > 0.5)
    # One refine call for all proposals of both halves.
    assert len(net.refine_calls) == 1
    _, pose_shape, cells, batch_index = net.refine_calls[0]
    n = LAYOUT.num_parts * cfg.top_k
    assert pose_shape == ((2 if flip_test else 1) * n, K, 2)
    assert batch_index.tolist() == [0] * n + ([1] * n if flip_test else [])
    if flip_test:  # the mirrored branch refines the mirrored cells
        assert torch.equal(cells[n:, 0], 63 - cells[:n, 0])
        assert torch.equal(cells[n:, 1], cells[:n, 1])


def test_published_convention_round_trip():
    """Targets drawn with the published mapping (input px = 4 x cell, mirror shifted 3 px)
    decode back to the people exactly with the published convention, and 1.5 px off with
    ours."""
    people = _crowd()
    back = torch.tensor([[[2.0, 0.0, 3.0], [0.0, 2.0, -1.0]]])
    gt = people[..., :2] * 2.0 + [3.0, -1.0]
    published = OracleNet(people, (256, 256), convention="published")
    (poses, _), = predict_poses(published, torch.zeros(1, 3, 256, 256), LAYOUT, back)
    dist, who = _match(poses.numpy(), gt)
    assert sorted(who.tolist()) == list(range(len(people)))
    assert dist.max() < 1e-2
    published.convention = get_convention("cell_center")  # decoded with the wrong convention
    (wrong, _), = predict_poses(published, torch.zeros(1, 3, 256, 256), LAYOUT, back)
    dist, _ = _match(wrong.numpy(), gt)
    assert dist.min() > 2.0  # 1.5 input px = 3 original px off, at least


def test_refined_pose_is_coarse_minus_correction_and_mirrored_back():
    people = _crowd()
    base = OracleNet(people, (256, 256))
    shifted = OracleNet(people, (256, 256), correction=0.25)
    back = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    for flip_test, dx in ((False, -1.0), (True, 0.0)):
        cfg = DecodeConfig(flip_test=flip_test)
        p0, _ = predict_poses(base, torch.zeros(1, 3, 256, 256), LAYOUT, back, cfg)[0]
        p1, _ = predict_poses(shifted, torch.zeros(1, 3, 256, 256), LAYOUT, back, cfg)[0]
        # fusion orders people by their mean keypoint score, which the shift changes: pair
        # each shifted person with its unshifted one first
        _, who = _match(p1.numpy(), p0.numpy())
        assert sorted(who.tolist()) == list(range(len(p0)))
        p0 = p0[torch.from_numpy(who)]
        # correction 0.25 cell = 1 input px subtracted; the mirrored branch's x correction
        # flips sign when mirrored back, so with flip test the x shifts cancel.
        assert torch.allclose(p1[..., 0] - p0[..., 0], torch.tensor(dx), atol=1e-4)
        assert torch.allclose(p1[..., 1] - p0[..., 1], torch.tensor(-1.0), atol=1e-4)
    cfg = DecodeConfig(flip_test=False, refine=False)
    p2, _ = predict_poses(shifted, torch.zeros(1, 3, 256, 256), LAYOUT, back, cfg)[0]
    _, who = _match(p2.numpy(), p0.numpy())
    assert torch.allclose(p2, p0[torch.from_numpy(who)], atol=1e-5)


def test_multi_scale_round_trip():
    people = _crowd()
    net = OracleNet(people, (256, 256))
    back = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 2.0, 5.0]]])
    cfg = DecodeConfig(scales=(1.0, 1.5), flip_test=True)
    (poses, scores), = predict_poses(net, torch.zeros(1, 3, 256, 256), LAYOUT, back, cfg)
    gt = people[..., :2] * 2.0 + [1.0, 5.0]
    dist, who = _match(poses.numpy(), gt)
    assert sorted(who.tolist()) == list(range(len(people)))
    assert dist.max() < 0.05


class TinyNet(nn.Module):
    """Random, non-symmetric convolutions at stride 4 with a feature-dependent refine."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layout = LAYOUT
        p = LAYOUT.num_parts
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 8, 4, stride=4), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1))
        self.heads = nn.Conv2d(8, K + p + p * K * 2, 1)

    def forward(self, images):
        f = self.stem(images.float() / 255)
        y = self.heads(f)
        p = LAYOUT.num_parts
        return {"features": f, "heatmaps": y[:, :K].sigmoid(),
                "part_heatmaps": y[:, K:K + p].sigmoid(), "offsets": 4 * y[:, K + p:]}

    def refine(self, features, poses, cells, batch_index):
        return 0.3 * torch.tanh(sample_features(features, poses, batch_index)[..., :2])


def test_flip_test_of_a_symmetric_input_gives_symmetric_poses():
    torch.manual_seed(1)
    half = torch.randint(0, 256, (1, 3, 64, 32), dtype=torch.uint8)
    image = torch.cat([half, half.flip(-1)], -1)  # mirror-symmetric 64 x 64 image
    net = TinyNet().eval()
    cfg = DecodeConfig(top_k=256, score_threshold=0.3)
    with torch.inference_mode():
        outputs = net(torch.cat([image, image.flip(-1)]))
        out = decode_outputs(outputs, LAYOUT, cfg, refine_fn=net.refine)
    valid = out["valid"][0]
    poses, cells, part = out["poses"][0][valid], out["cells"][0][valid], out["part"][0][valid]
    scores = out["scores"][0][valid]
    assert len(poses) > 10
    w = out["part_heatmaps"].shape[-1]
    # Every proposal has a partner at the mirrored cell whose pose is its mirror image.
    pairs = list(zip(cells.tolist(), part.tolist(), strict=True))
    key = {(int(c[0]), int(c[1]), p): i for i, (c, p) in enumerate(pairs)}
    checked = 0
    for i, (c, p) in enumerate(pairs):
        j = key.get((w - 1 - int(c[0]), int(c[1]), int(p)))
        assert j is not None, "a peak without its mirrored peak"
        mirrored = poses[j][list(LAYOUT.flip_index)].clone()
        mirrored[:, 0] = w - 1 - mirrored[:, 0]
        assert torch.allclose(poses[i], mirrored, atol=1e-4)
        assert torch.isclose(scores[i], scores[j], atol=1e-6)
        checked += 1
    assert checked == len(poses)
    # The refine really moved the poses (else the check above would be weaker).
    with torch.inference_mode():
        coarse = decode_outputs(outputs, LAYOUT, cfg)["poses"][0][valid]
    assert (coarse[..., :2] - poses[..., :2]).abs().max() > 1e-3


def test_decode_config_from_mapping_and_errors():
    cfg = DecodeConfig.from_any({"scales": [1.0, 0.5], "top_k": 10}, flip_test=False)
    assert cfg.scales == (1.0, 0.5) and cfg.top_k == 10 and not cfg.flip_test
    assert DecodeConfig.from_any(cfg).to_dict() == cfg.to_dict()
    with pytest.raises(ValueError, match="unknown fields"):
        DecodeConfig.from_any({"topk": 3})
    with pytest.raises(ValueError, match="scales"):
        DecodeConfig(scales=())
    net = OracleNet(_crowd(), (256, 256))
    with pytest.raises(ValueError, match="back_transforms"):
        predict_poses(net, torch.zeros(1, 3, 256, 256), LAYOUT, torch.zeros(2, 2, 3))


def test_batch_of_two_images_and_empty_image():
    people = _crowd()

    class TwoImages(OracleNet):
        def forward(self, images):  # image 0: the crowd, image 1: nobody
            n = images.shape[0]
            single = super().forward(images[:1] if n == 2 else images[[0, 2]])
            out = {}
            for key, value in single.items():
                empty = torch.zeros_like(value[:1])
                parts = [value[:1], empty] + ([value[1:], empty] if n == 4 else [])
                out[key] = torch.cat(parts)
            return out

    net = TwoImages(people, (256, 256))
    back = torch.eye(2, 3)[None].repeat(2, 1, 1)
    results = predict_poses(net, torch.zeros(2, 3, 256, 256), LAYOUT, back, DecodeConfig())
    assert len(results) == 2
    assert results[0][0].shape == (len(people), K, 3)
    assert results[1][0].shape == (0, K, 3) and results[1][1].shape == (0,)


def test_decoding_stays_float32_under_bf16_autocast():
    people = _crowd()
    net = OracleNet(people, (256, 256))
    back = torch.tensor([[[2.5, 0.0, 7.0], [0.0, 2.5, -3.0]]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (poses, _), = predict_poses(net, torch.zeros(1, 3, 256, 256), LAYOUT, back)
    dist, _ = _match(poses.numpy(), people[..., :2] * 2.5 + [7.0, -3.0])
    assert dist.max() < 1e-2  # bf16 would round x ~ 500 px to steps of 2-4 px
