"""Sparse training targets (issue 12): Gaussian windows and Omega from the encoder through
``train_collate`` to the losses and the training proposals, against the dense maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pinet_lightning.codec.batch import OmegaBatch, heatmap_targets, render_windows, train_collate
from pinet_lightning.codec.codec import PINetCodec
from pinet_lightning.codec.targets import TARGET_KEYS, encode_targets
from pinet_lightning.data.datamodule import PINetDataModule
from pinet_lightning.training.losses import PINetLoss
from pinet_lightning.training.proposals import proposal_scores

K, P = 14, 3  # CrowdPose
SPARSE = {"offsets_format": "omega", "heatmaps_format": "windows"}


def _crowd(rng: np.random.Generator, people: int, height: int, width: int) -> np.ndarray:
    """(N, K, 3) keypoints clustered around random person centres, some off the map, some
    unlabelled, a few on integer cells."""
    centre = rng.uniform([-2, -2], [width + 2, height + 2], (people, 1, 2))
    xy = centre + rng.normal(0, 0.12 * min(height, width), (people, K, 2))
    on_cell = rng.random((people, K)) < 0.1
    xy[on_cell] = np.round(xy[on_cell])
    v = rng.choice([0, 1, 2], (people, K), p=[0.15, 0.25, 0.6])
    return np.concatenate([xy, v[..., None]], -1)


def _samples(seed: int = 0, height: int = 24, width: int = 28, sizes=(9, 4, 0, 12),
             **kw) -> tuple[list[dict], list[dict]]:
    """The same people encoded dense and sparse, as the dataset hands them over (tensors).
    The image with no people makes every image refine 40 proposals of each part, most of
    them on cells without an Omega entry (the published rule's zero-score cells)."""
    rng = np.random.default_rng(seed)
    dense, sparse = [], []
    for i, n in enumerate(sizes):
        kp = _crowd(rng, n, height, width)
        areas = rng.choice([40.0, 300.0, 900.0, 2500.0], n)  # equal areas: ties on a cell
        mask = (rng.random((height, width)) > 0.15).astype(np.float32) if i % 2 else None
        args = (kp, areas, "crowdpose", (height, width))
        d = encode_targets(*args, ignore_mask=mask, **kw)
        s = encode_targets(*args, ignore_mask=mask, **SPARSE, **kw)
        image = torch.from_numpy(rng.integers(0, 256, (3, 4 * height, 4 * width), np.uint8))
        dense.append({"image": image, **{k: torch.from_numpy(v) for k, v in d.items()}})
        sparse.append({"image": image, **{k: torch.from_numpy(v) for k, v in s.items()}})
    return dense, sparse


class PoseRefineNet(torch.nn.Module):
    """A stand-in refinement whose correction depends on the poses, cells and features."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.3))

    def refine(self, features, poses, cells, batch_index, valid=None):
        level = features.mean(dim=(1, 2, 3))[batch_index][:, None, None]
        return self.scale * torch.tanh(0.1 * poses) + 0.01 * cells[:, None, :] + level


def _outputs(dense_batch: dict, seed: int = 1) -> dict[str, torch.Tensor]:
    """Network outputs near the targets (both smooth-L1 regimes occur)."""
    g = torch.Generator().manual_seed(seed)
    b, _, h, w = dense_batch["heatmaps"].shape

    def near(t: torch.Tensor, spread: float) -> torch.Tensor:
        return (t + spread * torch.randn(t.shape, generator=g)).requires_grad_()

    return {"features": torch.randn(b, 8, h, w, generator=g),
            "heatmaps": near(dense_batch["heatmaps"], 0.1),
            "part_heatmaps": near(dense_batch["part_heatmaps"], 0.1),
            "offsets": near(dense_batch["offsets"], 0.3)}


def test_windows_render_the_dense_heatmaps_bit_for_bit():
    for seed, kw in enumerate([{}, {"sigma": 1.0, "window_sigmas": 2.0, "window_margin": 0.0},
                               {"sigma": 3.0, "bg_weight": 0.0}, {"window_margin": 0.5}]):
        dense, sparse = _samples(seed, **kw)
        want = train_collate(dense)
        got = heatmap_targets(train_collate(sparse))
        for key in TARGET_KEYS[:4]:
            assert got[key].dtype == torch.float32
            assert torch.equal(got[key], want[key]), (seed, key)
        assert (want["heatmaps"] > 0).any() and (want["heatmap_mask"] == 0).any()
    # a dense batch passes through untouched
    assert heatmap_targets(want)["heatmaps"] is want["heatmaps"]


def test_render_windows_one_window_by_hand():
    gauss = torch.tensor([[[0.5, 1.0, 0.0], [0.25, 2.0, 0.0]]])  # x factors, y factors
    heat, window = render_windows(torch.tensor([1]), torch.tensor([[2, 0]]),
                                  torch.tensor([[2, 1]]), gauss, (2, 3, 5))
    assert heat[0].abs().sum() == 0 and window[0].sum() == 0
    assert heat[1, 0, 2] == 0.125 and heat[1, 0, 3] == 0.25  # y factor 0.25 x (0.5, 1.0)
    assert window[1].sum() == 2 and heat[1].sum() == 0.375  # one row (length 1), two columns


def test_windows_refuse_a_soft_ignore_mask():
    kp = np.array([[[5.0, 6.0, 2.0]] * K])
    soft = np.full((12, 12), 0.5, np.float32)
    dense = encode_targets(kp, [100.0], "crowdpose", (12, 12), ignore_mask=soft)
    assert dense["heatmap_mask"].max() == 0.5  # the dense maps keep any weight
    with pytest.raises(ValueError, match="0/1"):
        encode_targets(kp, [100.0], "crowdpose", (12, 12), ignore_mask=soft, **SPARSE)


def test_collate_concatenates_with_batch_offsets():
    dense, sparse = _samples(3)
    batch = train_collate(sparse)
    block = P * K * 24 * 28
    assert batch["target_shape"] == (K, P, 24, 28)
    assert batch["omega_index"].dtype == torch.int32
    counts = [len(s["omega_index"]) for s in sparse]
    assert counts[2] == 0 and len(batch["omega_index"]) == sum(counts)
    start = counts[0] + counts[1] + counts[2]
    assert torch.equal(batch["omega_index"][start:].long(), sparse[3]["omega_index"] + 3 * block)
    assert bool((batch["omega_index"][1:] > batch["omega_index"][:-1]).all())
    assert torch.equal(batch["window_channel"][-len(sparse[3]["window_channel"]):],
                       sparse[3]["window_channel"] + 3 * (K + P))
    assert batch["ignore_mask"].dtype == torch.uint8 and batch["bg_weight"].shape == (4,)
    # Omega holds what the dense maps hold, entry by entry
    omega = OmegaBatch.from_batch(batch, 4)
    dense_batch = train_collate(dense)
    np.testing.assert_array_equal(omega.at_entries(dense_batch["offsets"]), omega.offsets)
    assert torch.equal(omega.at_entries(dense_batch["offset_weights"]),
                       omega.weights[:, None].expand(-1, 2))
    assert int((dense_batch["offset_weights"] > 0).sum()) == 2 * len(omega.index)
    # bad input is refused with the reason
    shuffled = [dict(s) for s in sparse]
    shuffled[1]["omega_index"] = shuffled[1]["omega_index"].flip(0)
    with pytest.raises(ValueError, match="sample 1 .*ascending"):
        train_collate(shuffled)
    other = dict(sparse[0], target_shape=torch.tensor([K, P, 24, 30]))
    with pytest.raises(ValueError, match="different target shapes"):
        train_collate([sparse[1], other])


@pytest.mark.parametrize("empty_cells", [True, False])
def test_sparse_losses_and_proposals_equal_dense(empty_cells):
    dense, sparse = _samples(7)
    dense_batch, sparse_batch = train_collate(dense), train_collate(sparse)
    assert not set(TARGET_KEYS) & set(sparse_batch)
    criterion = PINetLoss(proposals_at_empty_cells=empty_cells)
    net = PoseRefineNet()
    results = {}
    for name, batch in (("dense", dense_batch), ("sparse", sparse_batch)):
        outputs = _outputs(dense_batch)
        losses = criterion(outputs, batch, net)
        losses["loss"].backward()
        results[name] = (losses, criterion.training_proposals(outputs, batch),
                         outputs["offsets"].grad, outputs["heatmaps"].grad)
    (d_loss, d_props, d_grad, d_hgrad), (s_loss, s_props, s_grad, s_hgrad) = results.values()
    for key in ("loss", "heatmap", "offset", "refine"):
        assert d_loss[key] > 0
        torch.testing.assert_close(s_loss[key], d_loss[key], rtol=1e-6, atol=0)
    assert torch.equal(s_loss["heatmap"], d_loss["heatmap"])
    assert torch.equal(s_loss["refine"], d_loss["refine"])
    for attr in ("cells", "batch_index", "part_index", "valid"):
        assert torch.equal(getattr(s_props["proposals"], attr),
                           getattr(d_props["proposals"], attr)), attr
    for key in ("coarse", "target", "weights"):
        assert torch.equal(s_props[key], d_props[key]), key
    torch.testing.assert_close(s_grad, d_grad, rtol=1e-6, atol=1e-12)
    assert torch.equal(s_hgrad, d_hgrad)
    # the case is not vacuous: weighted and unweighted proposals, valid and not
    props, weights = d_props["proposals"], d_props["weights"]
    assert (weights > 0).any() and (weights[props.valid] == 0).any()
    if not empty_cells:  # only positive-score cells are valid then
        score = proposal_scores(dense_batch["part_heatmaps"], dense_batch["offset_weights"], K)
        cells = props.cells[props.valid]
        at = score[props.batch_index[props.valid], props.part_index[props.valid], cells[:, 1],
                   cells[:, 0]]
        assert (~props.valid).any() and (at > 0).all()


def test_dataset_pipeline_dense_and_sparse_give_the_same_losses(tmp_path):
    """The data module's two settings of codec.sparse on the same augmented samples."""
    synthetic = {"root": str(tmp_path), "num_train": 4, "num_val": 1, "image_size": 128,
                 "min_people": 4, "max_people": 6, "overlap": 0.7, "seed": 3}
    batches = {}
    for sparse in (False, True):
        dm = PINetDataModule(codec=PINetCodec(input_size=128, sparse=sparse), synthetic=synthetic,
                             batch_size=4, num_workers=0, pin_memory=False)
        dm.prepare_data()
        dm.setup("fit")
        ds = dm.train_dataset
        batches[sparse] = train_collate([ds[i] for i in range(4)])  # same seed: same crops
    dense_batch, sparse_batch = batches[False], batches[True]
    assert torch.equal(dense_batch["image"], sparse_batch["image"])
    criterion, net = PINetLoss(), PoseRefineNet()
    dense_loss = criterion(_outputs(dense_batch), dense_batch, net)
    sparse_loss = criterion(_outputs(dense_batch), sparse_batch, net)
    for key in ("loss", "heatmap", "offset", "refine"):
        torch.testing.assert_close(sparse_loss[key], dense_loss[key], rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="the batch format is codec.sparse"):
        PINetDataModule(codec=PINetCodec(targets={"offsets_format": "dense"}), synthetic=synthetic)


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@pytest.mark.parametrize("sparse", [True, False])
def test_loss_and_proposals_need_no_tensor_values_on_the_host(sparse):
    """No host sync and no data-dependent shape in the loss and proposal path: it runs on
    the meta device (shapes only), where every op that reads values on the host fails as a
    GPU would sync: ``.item()``, ``bool()``, ``.tolist()``, ``nonzero()``, boolean-mask
    indexing. (torch.cuda.set_sync_debug_mode needs a GPU.) The harness itself refuses one."""
    dense, samples = _samples(11)
    dense_batch = train_collate(dense)
    batch = _to(train_collate(samples if sparse else dense), "meta")
    outputs = {k: v.detach().to("meta").requires_grad_(v.requires_grad)
               for k, v in _outputs(dense_batch).items()}  # leaves on the meta device
    net = PoseRefineNet().to("meta")
    losses = PINetLoss()(outputs, batch, net)
    assert all(v.device.type == "meta" and v.shape == () for v in losses.values())
    losses["loss"].backward()
    assert outputs["offsets"].grad.shape == dense_batch["offsets"].shape
    sampled = PINetLoss().training_proposals(outputs, batch)
    assert sampled["target"].shape == (4 * P * 40, K, 2)
    with pytest.raises((RuntimeError, NotImplementedError)):
        heatmap_targets(batch)["heatmaps"].sum().item()
    with pytest.raises((RuntimeError, NotImplementedError)):
        outputs["heatmaps"][outputs["heatmaps"] > 0]
