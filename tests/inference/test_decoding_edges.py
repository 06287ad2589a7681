"""Decoding at its edges: peaks exactly at the score threshold, kernel sizes exactly at the
map-size limits, the defaults of algorithm.md 5, multi-scale scoring on known ramps, the
settings that reach each step (config, the network's layout, stride and convention, the
caller's autocast) and the error messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_decoding import LAYOUT, OracleNet, _crowd

from pinet_lightning.codec.conventions import get_convention
from pinet_lightning.core.layouts import get_layout
from pinet_lightning.core.sampling import sample_maps
from pinet_lightning.inference.decoding import (
    DecodeConfig,
    ScaleDecoding,
    _resize_input,
    decode_images,
    decode_outputs,
    find_peaks,
    fuse_batch,
    gather_offsets,
    nms_kernel_size,
    predict_poses,
    score_scales,
)


def test_decode_config_defaults_are_the_spec():
    cfg = DecodeConfig()
    assert cfg.flip_test is True and cfg.refine is True
    assert cfg.top_k == 30 and cfg.score_threshold == 0.01 and cfg.oks_threshold == 0.7
    assert cfg.scales == (1.0,) and cfg.nms_kernels == (7, 5, 3)
    assert cfg.nms_large_size == 300.0 and cfg.nms_medium_size == 200.0
    assert cfg.scale_multiple == 64 and cfg.max_people is None


def test_kernel_size_exactly_at_the_limits():
    """Over 300 -> 7, over 200 -> 5, else 3 (algorithm.md 5.3: strictly over)."""
    assert nms_kernel_size(200, 200) == 3
    assert nms_kernel_size(200, 201) == 5  # mean 200.5
    assert nms_kernel_size(300, 300) == 5
    assert nms_kernel_size(300, 301) == 7


@pytest.mark.parametrize("threshold", [0.25, 0.01])
def test_peak_exactly_at_the_threshold_is_dropped(threshold):
    maps = torch.zeros(1, 1, 9, 9)
    at = torch.tensor(threshold, dtype=torch.float32)
    maps[0, 0, 1, 1] = at  # scores <= threshold are dropped (algorithm.md 5.3)
    maps[0, 0, 5, 5] = torch.nextafter(at, torch.tensor(1.0))
    maps[0, 0, 7, 2] = 0.9
    scores, index, valid = find_peaks(maps, top_k=3, score_threshold=threshold)
    assert index[0, 0].tolist() == [7 * 9 + 2, 5 * 9 + 5, 1 * 9 + 1]
    assert valid[0, 0].tolist() == [True, True, False]


def test_find_peaks_defaults():
    """top_k 30, threshold 0.01 and a 3 x 3 kernel by default."""
    maps = torch.zeros(1, 1, 12, 12)
    maps[0, 0, ::2, ::2] = torch.linspace(0.02, 0.9, 36).view(6, 6)  # 36 peaks 2 apart
    maps[0, 0, 11, 11] = 0.01
    scores, index, valid = find_peaks(maps)
    assert scores.shape == (1, 1, 30) and valid.all()
    assert scores[0, 0, -1] == pytest.approx(0.02 + 6 * 0.88 / 35)


# ---------------------------------------------------------------- multi-scale scoring
K, P = LAYOUT.num_keypoints, LAYOUT.num_parts
OURS = get_convention("cell_center")


def _ramp_maps(h: int, w: int, factor: float, fx, fy) -> torch.Tensor:
    """(1, C, h, w) maps whose value is fx * X + fy * Y of the base input pixel (X, Y) of
    each cell, for an input ``factor`` times smaller than the base."""
    xs = (OURS.cell_to_input(torch.arange(w).float(), 4) + 0.5) * factor - 0.5
    ys = (OURS.cell_to_input(torch.arange(h).float(), 4) + 0.5) * factor - 0.5
    fx, fy = torch.as_tensor(fx).float(), torch.as_tensor(fy).float()
    return (fx[:, None, None] * xs[None, None, :] + fy[:, None, None] * ys[None, :, None])[None]


def _scale(h, w, factor, fx_parts, fx_kpts, cells, poses, valid=True) -> ScaleDecoding:
    n = len(cells)
    return ScaleDecoding(
        heatmaps=_ramp_maps(h, w, factor, fx_kpts, [0.001] * K),
        part_heatmaps=_ramp_maps(h, w, factor, fx_parts, [0.002] * P),
        poses=torch.tensor(poses, dtype=torch.float32).view(1, n, 1, 2).expand(1, n, K, 2),
        cells=torch.tensor(cells, dtype=torch.float32).view(1, n, 2),
        part=torch.zeros(1, n, dtype=torch.long),
        valid=torch.full((1, n), valid), input_scale=(factor, factor))


def test_multi_scale_scores_read_the_averaged_maps_where_the_proposal_is():
    """Two scales (base 64 x 64 input and half of it): each scale's maps are a different
    linear ramp of the base input pixel; a proposal of either scale is scored on the mean of
    both ramps at its own base pixel."""
    fa, fb = [0.004] * P, [0.008] * P  # part ramps of scale A (base) and B (half)
    ka, kb = [0.002] * K, [0.006] * K
    half = _scale(8, 8, 2.0, fb, kb, cells=[[3.0, 2.0]], poses=[[1.0, 5.0]])
    base = _scale(16, 16, 1.0, fa, ka, cells=[[6.0, 9.0]], poses=[[10.0, 3.0]])

    def base_px(xy, factor):  # a cell of a scale -> base input pixels
        return (OURS.cell_to_input(torch.tensor(xy), 4) + 0.5) * factor - 0.5

    def mean_ramp(px, fxa, fxb, fy):
        return float((fxa + fxb) / 2 * px[0] + fy * px[1])

    for order in ([half, base], [base, half]):  # whichever comes first, base is the largest
        scored = score_scales(order, OURS, 4, score_threshold=0.01)
        for sc, (poses, pose_scores, valid) in zip(order, scored, strict=True):
            f = sc.input_scale[0]
            cell_px = base_px(sc.cells[0, 0].tolist(), f)
            pose_score = mean_ramp(cell_px, fa[0], fb[0], 0.002)
            assert float(pose_scores[0, 0]) == pytest.approx(pose_score, rel=1e-5)
            kpt_px = base_px(sc.poses[0, 0, 0].tolist(), f)
            kpt = mean_ramp(kpt_px, ka[0], kb[0], 0.001)
            assert float(poses[0, 0, 0, 2]) == pytest.approx(pose_score * kpt, rel=1e-5)
            assert torch.equal(poses[..., :2], sc.poses)
            assert valid.tolist() == [[True]]


def test_score_threshold_and_validity_of_scored_proposals():
    sc = _scale(16, 16, 1.0, [0.0] * P, [0.0] * K, cells=[[3.0, 4.0], [5.0, 6.0]],
                poses=[[1.0, 1.0], [2.0, 2.0]])
    sc.part_heatmaps = torch.full((1, P, 16, 16), 0.25)
    sc.valid = torch.tensor([[True, False]])
    (_, scores, valid), = score_scales([sc], OURS, 4, score_threshold=0.25)
    assert valid.tolist() == [[False, False]]  # score == threshold: dropped
    (_, scores, valid), = score_scales([sc], OURS, 4, score_threshold=0.2)
    assert valid.tolist() == [[True, False]]  # an invalid peak stays invalid


def test_resize_input_sizes_and_values():
    ramp = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 3, 8, 8)
    out = _resize_input(ramp, 2.0, 4)
    assert out.shape == (1, 3, 16, 16)
    # pixel-centre aligned (align_corners=False): output x samples input (x + 0.5) / 2 - 0.5
    assert out[0, 0, 0, 5] == pytest.approx(2.25)
    assert _resize_input(ramp, 1.0, 4) is ramp
    assert _resize_input(ramp, 0.3, 4).shape[-2:] == (4, 4)  # never under one multiple
    # 96 * 1.5 / 32 = 4.5 rounds (to even) to 4
    assert _resize_input(torch.zeros(1, 3, 64, 96), 1.5, 32).shape[-2:] == (96, 128)


class _Stub(torch.nn.Module):
    """Oracle outputs of the crowd, with a chosen layout attribute, output stride and
    convention, and a refine that records the autocast state it runs under."""

    def __init__(self, **attrs) -> None:
        super().__init__()
        self.oracle = OracleNet(_crowd(), (256, 256))
        self.sizes: list[tuple[int, int]] = []
        self.autocast: list[tuple[bool, torch.dtype]] = []
        for key, value in attrs.items():
            setattr(self, key, value)

    def forward(self, images):
        self.sizes.append(tuple(images.shape[-2:]))
        return self.oracle(images)

    def refine(self, features, poses, cells, batch_index):
        self.autocast.append((torch.is_autocast_enabled("cpu"),
                              torch.get_autocast_dtype("cpu")))
        assert batch_index.dtype == torch.long
        return torch.zeros_like(poses)


def _predict(net, layout=LAYOUT, back=None, **cfg):
    back = np.eye(2, 3)[None] if back is None else back
    return predict_poses(net, torch.zeros(1, 3, 256, 256), layout, back, cfg)


def test_predict_poses_reads_the_network_and_the_config():
    net = _Stub(layout=get_layout("coco"))
    people = _predict(net, max_people=2)[0][0]  # numpy back transform, explicit layout
    assert people.shape == (2, K, 3)  # max_people reaches fusion
    with pytest.raises(IndexError):
        _predict(net, layout=None)  # the net's layout (coco, K = 17) does not fit the maps
    assert len(_predict(_Stub(layout=LAYOUT), layout=None)[0][0]) == 4
    net = _Stub()
    _predict(net, scales=(1.0, 0.5), flip_test=False)
    assert net.sizes == [(256, 256), (128, 128)]
    bare = _Stub()
    del bare.oracle.convention  # the oracle still draws; the stub has no convention ...
    assert not hasattr(bare, "convention") and not hasattr(bare, "output_stride")
    assert len(_predict(bare, flip_test=False)[0][0]) == 4  # ... cell_center, stride 4


def test_predict_poses_stride_from_the_network():
    """With the published convention the stride decides where cells are in the input."""
    net = _Stub(convention=get_convention("published"), output_stride=4)
    net.oracle.drawn_with = get_convention("published")
    ref = _predict(net, flip_test=False)[0][0]
    other = _Stub(convention=get_convention("published"), output_stride=2)
    other.oracle.drawn_with = get_convention("published")
    half = _predict(other, flip_test=False)[0][0]
    order = lambda p: p[np.lexsort((p[:, 0, 1], p[:, 0, 0]))]  # noqa: E731
    assert torch.allclose(order(half)[..., :2], order(ref)[..., :2] / 2, atol=1e-4)


def test_predict_poses_errors_name_the_shape():
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\), got \(1, 4, 8, 8\)"):
        predict_poses(_Stub(), torch.zeros(1, 4, 8, 8), LAYOUT, torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match=r"back_transforms must be \(B, 2, 3\) = \(2, 2, 3\), "
                                         r"got \(1, 2, 3\)"):
        predict_poses(_Stub(), torch.zeros(2, 3, 8, 8), LAYOUT, torch.zeros(1, 2, 3))


def test_refinement_keeps_the_callers_autocast():
    net = _Stub()
    _predict(net)
    assert net.autocast == [(False, net.autocast[0][1])]
    with torch.autocast("cpu", dtype=torch.float16):
        _predict(net)
    assert net.autocast[-1] == (True, torch.float16)


def test_decode_outputs_settings():
    oracle = OracleNet(_crowd(), (256, 256))
    outputs = oracle(torch.zeros(2, 3, 256, 256))  # the image and its mirror
    single = {k: v[:1] for k, v in outputs.items()}
    got = decode_outputs(single, LAYOUT, DecodeConfig(flip_test=True), flip=False)
    assert set(got) == {"poses", "scores", "valid", "cells", "part", "heatmaps",
                        "part_heatmaps"}
    assert got["valid"].sum() >= 4
    with pytest.raises(ValueError, match=r"flip test needs 2B outputs \(the batch, then its "
                                         r"mirror\)"):
        decode_outputs(single, LAYOUT, DecodeConfig(flip_test=True))
    # Published convention: the default stride is 4.
    pub = decode_outputs(single, LAYOUT, flip=False, convention="published")
    pub4 = decode_outputs(single, LAYOUT, flip=False, convention="published", stride=4)
    ours = decode_outputs(single, LAYOUT, flip=False)
    assert torch.equal(pub["poses"], pub4["poses"])
    assert not torch.equal(pub["poses"][..., 2], ours["poses"][..., 2])
    # The config's kernels reach peak finding: a kernel wider than the map keeps only the
    # map's maxima (people tie at 1.0), not a peak per person.
    wide = decode_outputs(single, LAYOUT, DecodeConfig(nms_kernels=(129, 129, 129)), flip=False)
    assert (wide["valid"].view(P, -1).sum(1) <= 2).all()
    assert (ours["valid"].view(P, -1).sum(1) >= 4).all()
    # Two images with the flip test: every refine batch index is a long image index.
    pair = {k: torch.cat([v[:1], v[:1], v[1:], v[1:]]) for k, v in outputs.items()}
    seen = []

    def refine(features, poses, cells, batch_index):
        seen.append(batch_index)
        return torch.zeros_like(poses)

    decode_outputs(pair, LAYOUT, DecodeConfig(), refine_fn=refine)
    t = DecodeConfig().top_k
    assert seen[0].dtype == torch.long and seen[0].tolist() == sum(
        ([i] * (P * t) for i in range(4)), [])


def test_fuse_batch_validity_threshold_and_max_people():
    base = torch.tensor(_crowd()[:, :, :2], dtype=torch.float32)  # 4 people
    scores = torch.tensor([0.9, 0.6, 0.8, 0.7])[:, None, None].expand(4, K, 1)
    poses = torch.cat([base, scores], -1)[None]
    valid = torch.tensor([[True, True, True, False]])
    (fused, fused_scores), = fuse_batch(poses, valid, LAYOUT.sigmas)  # default config
    assert fused_scores.tolist() == pytest.approx([0.9, 0.8, 0.6])  # the invalid one dropped
    (_, best2), = fuse_batch(poses, valid, LAYOUT.sigmas, DecodeConfig(max_people=2))
    assert best2.tolist() == pytest.approx([0.9, 0.8])
    # Two near-copies: merged at the default 0.7, kept apart at 0.999.
    near = poses.clone()
    near[0, 1, :, :2] = near[0, 0, :, :2] + 1.0
    assert len(fuse_batch(near, valid, LAYOUT.sigmas)[0][1]) == 2
    assert len(fuse_batch(near, valid, LAYOUT.sigmas, DecodeConfig(oks_threshold=0.999))[0][1]) \
        == 3


def test_legacy_decode_fields():
    cfg = DecodeConfig.from_any({"output_stride": 4, "cell_offset": 1.5, "top_k": 5})
    assert cfg.top_k == 5
    with pytest.raises(ValueError, match=r"'output_stride' is no longer a decoding setting; "
                                         r"the network's convention decides it "
                                         r"\(PINet\(convention=\.\.\.\)\)"):
        DecodeConfig.from_any({"output_stride": 2})


def test_gather_offsets_names_the_expected_channels():
    with pytest.raises(ValueError, match=r"offsets have 10 channels, expected P\*K\*2 = 84"):
        gather_offsets(torch.zeros(1, 10, 4, 4), torch.zeros(1, P, 2, dtype=torch.long), K)


def test_multi_scale_scores_on_random_maps_against_the_largest_scale():
    """Random maps at three scales (input factors 0.5, 1 and 2 of the base): every proposal
    is scored on the mean of all maps resized (bilinear, pixel-centre aligned) to the largest
    map, at its own point converted to the largest scale's cells."""

    torch.manual_seed(0)
    sizes = {0.5: 32, 1.0: 16, 2.0: 8}  # input factor -> map side
    scales = []
    for f, side in sizes.items():
        sc = _scale(side, side, f, [0.0] * P, [0.0] * K, cells=[[side / 3, side / 4]],
                    poses=[[side / 5, side / 2]])
        sc.heatmaps = torch.rand(1, K, side, side)
        sc.part_heatmaps = torch.rand(1, P, side, side)
        scales.append(sc)
    for order in (scales, scales[::-1]):
        scored = score_scales(order, OURS, 4, score_threshold=0.0)
        mean_parts = torch.stack([F.interpolate(sc.part_heatmaps, size=(32, 32),
                                                mode="bilinear", align_corners=False)
                                  for sc in order]).mean(0)
        mean_kpts = torch.stack([F.interpolate(sc.heatmaps, size=(32, 32), mode="bilinear",
                                               align_corners=False) for sc in order]).mean(0)
        for sc, (poses, pose_scores, _) in zip(order, scored, strict=True):
            def to_largest(xy, f=sc.input_scale[0]):
                px = (OURS.cell_to_input(xy, 4) + 0.5) * f - 0.5  # base input pixels
                return OURS.input_to_cell((px + 0.5) / 0.5 - 0.5, 4)

            at = to_largest(sc.cells[0])
            want = sample_maps(mean_parts, at[None], torch.zeros(1, dtype=torch.long))
            assert float(pose_scores[0, 0]) == pytest.approx(float(want[0, 0]), rel=1e-5)
            kp = to_largest(sc.poses[0, 0])
            kpt = sample_maps(mean_kpts, kp[None], torch.arange(K))
            assert torch.allclose(poses[0, 0, :, 2], want[0, 0] * kpt[0], rtol=1e-5)


def test_decode_config_limits_and_messages():
    assert DecodeConfig(top_k=1).top_k == 1
    for kwargs, match in [({"scales": (1.0, 0.0)}, r"scales must be positive numbers, got "
                                                     r"\(1\.0, 0\.0\)"),
                          ({"top_k": 0}, r"^DecodeConfig.top_k must be >= 1, got 0$"),
                          ({"nms_kernels": (7, 5)}, r"^DecodeConfig.nms_kernels must be three "
                                                    r"odd sizes \(large, medium, small map\)")]:
        with pytest.raises(ValueError, match=match):
            DecodeConfig(**kwargs)
    oracle = OracleNet(_crowd(), (256, 256))
    single = {k: v[:1] for k, v in oracle(torch.zeros(2, 3, 256, 256)).items()}
    with pytest.raises(ValueError, match=r"^decoding: flip test needs 2B outputs"):
        decode_outputs(single, LAYOUT, DecodeConfig(flip_test=True))


class _NoRefine(torch.nn.Module):
    """Oracle outputs only: no refine, no convention, no output stride attributes."""

    def __init__(self, base=(256, 256)) -> None:
        super().__init__()
        self.oracle = OracleNet(_crowd(), base)

    def forward(self, images):
        return self.oracle(images)


def _sorted(poses: torch.Tensor) -> torch.Tensor:
    return poses[np.lexsort((poses[:, 0, 1].numpy(), poses[:, 0, 0].numpy()))]


def test_network_without_refine_or_stride_and_non_square_multi_scale():
    """A network with no refine, convention or stride runs as cell_center at stride 4 (the
    poses land where a full network's do); on a non-square input each scale maps back with
    its own x and y factors."""
    bare = _predict(_NoRefine(), flip_test=False)[0][0]
    truth = torch.as_tensor(_crowd(), dtype=torch.float32)  # input pixels = image pixels here
    assert torch.allclose(_sorted(bare)[..., :2], _sorted(truth)[..., :2], atol=0.1)
    net = _NoRefine(base=(256, 320))
    images = torch.zeros(1, 3, 256, 320)
    one = predict_poses(net, images, LAYOUT, np.eye(2, 3)[None], {"flip_test": False})[0][0]
    two = predict_poses(net, images, LAYOUT, np.eye(2, 3)[None],
                        {"flip_test": False, "scales": (1.0, 0.5)})[0][0]
    assert len(two) == len(one) == 4
    assert torch.allclose(_sorted(two)[..., :2], _sorted(one)[..., :2], atol=0.5)


def test_decode_images_returns_the_candidates_of_every_scale():
    """The candidates of each scale side by side: (B, S * P * top_k) poses, pose scores and
    validity; at scale 1 the network sees the input as given, even with sides that are not
    multiples of ``scale_multiple`` (224 here; only the other scales are rounded)."""
    cfg = DecodeConfig(scales=(1.0, 0.5), flip_test=False)
    n = LAYOUT.num_parts * cfg.top_k
    poses, scores, valid = decode_images(_Stub(), torch.zeros(1, 3, 256, 256), LAYOUT, cfg)
    assert poses.shape == (1, 2 * n, K, 3) and scores.shape == valid.shape == (1, 2 * n)
    # each scale finds the 4 people's 3 parts, with part heatmap peaks near 1
    assert int(valid[0, :n].sum()) == int(valid[0, n:].sum()) == 4 * LAYOUT.num_parts
    assert float(scores[valid].min()) > 0.8 and bool((scores[~valid] <= 0.8).all())
    # keypoint score = pose score x keypoint heatmap (at most 1)
    assert bool((poses[..., 2] <= scores[..., None] + 1e-6).all())
    net = _Stub()
    decode_images(net, torch.zeros(1, 3, 256, 224), LAYOUT, DecodeConfig(flip_test=False))
    decode_images(net, torch.zeros(1, 3, 256, 224), LAYOUT,
                  DecodeConfig(flip_test=False, scales=(2.0,)))
    assert net.sizes == [(256, 224), (512, 448)]


def test_a_network_without_refine_under_autocast():
    """The refinement step is skipped, not called, for a network without ``refine``, also
    under the caller's autocast (which wraps the refine it runs)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        poses, _, valid = decode_images(_NoRefine(), torch.zeros(1, 3, 256, 256), LAYOUT,
                                        DecodeConfig(flip_test=False))
    assert int(valid.sum()) == 4 * LAYOUT.num_parts and poses.dtype == torch.float32
