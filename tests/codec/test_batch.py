"""``train_collate`` by hand, on small hand-made samples: the dense keys stacked, a batch of
one, the Omega index dtype at its int32 / int64 boundary, the per-sample index checks and the
messages of a batch the readers cannot use. The sparse batch against the dense maps, end to
end: tests/codec/test_sparse.py."""

from __future__ import annotations

import re

import pytest
import torch

from pinet_lightning.codec.batch import OmegaBatch, heatmap_targets, train_collate


def _omega(shape: tuple[int, int, int, int], index: list[int]) -> dict[str, torch.Tensor]:
    """A sparse sample with only Omega's keys: ``index`` into (P*K, H, W) of ``shape``
    (K, P, H, W). The size of the maps never matters, only the indices are held."""
    n = len(index)
    return {"omega_index": torch.tensor(index, dtype=torch.int64),
            "omega_offsets": torch.arange(2.0 * n).view(n, 2),
            "omega_weights": torch.full((n,), 0.5), "target_shape": torch.tensor(shape)}


def test_dense_samples_are_stacked():
    stacked = train_collate([{"x": torch.ones(2)}, {"x": torch.zeros(2)}])
    assert stacked.keys() == {"x"} and stacked["x"].tolist() == [[1.0, 1.0], [0.0, 0.0]]


def test_a_batch_of_one_sample():
    sample = {"image": torch.ones(3, 2, 2, dtype=torch.uint8), **_omega((2, 1, 2, 4), [1, 6])}
    batch = train_collate([sample])
    assert batch["target_shape"] == (2, 1, 2, 4) and isinstance(batch["target_shape"], tuple)
    assert batch["image"].shape == (1, 3, 2, 2)
    assert batch["omega_index"].tolist() == [1, 6] and batch["omega_index"].dtype == torch.int32
    assert torch.equal(batch["omega_offsets"], sample["omega_offsets"])


@pytest.mark.parametrize(("shape", "batch_size", "dtype"), [
    ((1, 1, 1, 2**31 - 1), 1, torch.int32),  # B * P*K*H*W = 2**31 - 1: the last int32
    ((1, 1, 2**15, 2**15), 2, torch.int64),  # exactly 2**31 positions: int64
    ((1, 1, 1, 2**31), 1, torch.int64),
    ((14, 3, 2**14, 2**14), 1, torch.int64),  # 42 * 2**28 > 2**31 (and < 2**32)
])
def test_omega_index_is_int32_while_every_position_fits(shape, batch_size, dtype):
    """int32 halves the bytes that cross the worker boundary; a batch with 2**31 positions or
    more needs int64 (the last position, 2**31 - 1 + ..., would wrap)."""
    k, p, h, w = shape
    block = k * p * h * w
    samples = [_omega(shape, [0, block - 1]) for _ in range(batch_size)]
    index = train_collate(samples)["omega_index"]
    assert index.dtype == dtype
    want = [b * block + i for b in range(batch_size) for i in (0, block - 1)]
    assert index.tolist() == want


@pytest.mark.parametrize("index", [
    [-1, 3],  # the first below 0 (the last in range)
    [0, 1, 8],  # the last at P*K*H*W (the one before in range)
    [0, 9],
    [2, 2],  # not unique
    [1, 5, 3],  # not ascending (though every entry is above the first)
])
def test_omega_indices_must_be_ascending_unique_and_in_range(index):
    good = _omega((2, 1, 1, 4), [0, 7])  # P*K*H*W = 8
    assert train_collate([good, _omega((2, 1, 1, 4), [])])["omega_index"].tolist() == [0, 7]
    message = ("train_collate: sample 1 of the batch has Omega indices that are not "
               "ascending, unique and in [0, 8) (P*K*H*W for target_shape (2, 1, 1, 4)); "
               "build them with encode_targets(offsets_format='omega')")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        train_collate([good, _omega((2, 1, 1, 4), index)])


def test_batches_the_readers_cannot_use_name_the_fix():
    sample = _omega((2, 1, 1, 4), [0])
    del sample["target_shape"]
    message = ("train_collate: sparse samples (keys ['omega_index', 'omega_offsets', "
               "'omega_weights']) need 'target_shape' (K, P, H, W); build them with "
               "encode_targets")
    with pytest.raises(KeyError, match=re.escape(message)):
        train_collate([sample])
    with pytest.raises(KeyError, match=re.escape(
            "the batch has neither the dense heatmap targets ['heatmaps', 'heatmap_mask', "
            "'part_heatmaps', 'part_mask'] nor the Gaussian windows (lacks ['window_channel'")):
        heatmap_targets({})
    with pytest.raises(KeyError, match=re.escape(
            "lacks ['omega_index', 'omega_offsets', 'omega_weights', 'target_shape']); build it "
            "with encode_targets and codec.batch.train_collate")):
        OmegaBatch.from_batch({}, 1)
    with pytest.raises(KeyError) as err:
        heatmap_targets({"target_shape": (2, 1, 1, 4)})
    assert err.value.args[0].endswith("; build it with encode_targets and "
                                      "codec.batch.train_collate")
