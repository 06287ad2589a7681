"""Training proposal sampling (algorithm.md 4) on hand-built batches."""

from __future__ import annotations

import torch

from pinet_lightning.training.proposals import gather_at_cells, proposal_scores, sample_proposals

K, P, H, W = 2, 2, 6, 8


def _targets(cells_per_image: list[list[tuple[int, int, float]]], part: int = 0):
    """Part heatmaps and offset weights with the given (x, y, score) cells for ``part``."""
    b = len(cells_per_image)
    part_heatmaps = torch.zeros(b, P, H, W)
    weights = torch.zeros(b, P * K * 2, H, W)
    for i, cells in enumerate(cells_per_image):
        for x, y, s in cells:
            part_heatmaps[i, part, y, x] = s
            # Weight on one channel of that part only: the score takes the max over them.
            weights[i, (part * K + 1) * 2 + 1, y, x] = 0.5
    return part_heatmaps, weights


def _valid_cells(props, image: int, part: int) -> set[tuple[int, int]]:
    sel = props.valid & (props.batch_index == image) & (props.part_index == part)
    return {tuple(c) for c in props.cells[sel].tolist()}


def test_scores_are_heatmap_times_max_weight():
    ph, w = _targets([[(1, 2, 0.8)]])
    w[0, 0, 2, 1] = 0.25  # smaller than the 0.5 already there: max stays 0.5
    w[0, 0, 3, 3] = 1.0  # weight without heatmap: score 0
    score = proposal_scores(ph, w, K)
    assert score.shape == (1, P, H, W)
    assert torch.isclose(score[0, 0, 2, 1], torch.tensor(0.4))
    assert score[0, 0, 3, 3] == 0
    assert (score > 0).sum() == 1


def _block_valid(props, image: int, part: int):
    """Validity of the (image, part) block's proposals in rank order."""
    return props.valid[(props.batch_index == image) & (props.part_index == part)]


def test_top_m_with_fewest_positives_rule():
    # Image 0 has 3 positive cells for part 0, image 1 has 5: m = 3 for part 0.
    img0 = [(0, 0, 0.9), (3, 1, 0.7), (5, 4, 0.5)]
    img1 = [(1, 1, 0.95), (2, 2, 0.85), (4, 3, 0.75), (6, 5, 0.3), (7, 0, 0.2)]
    ph, w = _targets([img0, img1])
    props = sample_proposals(ph, w, K, max_per_part=40)
    k = min(40, H * W)
    assert len(props) == 2 * P * k
    assert props.cells.shape == (2 * P * k, 2) and props.cells.dtype == torch.long
    assert _valid_cells(props, 0, 0) == {(0, 0), (3, 1), (5, 4)}
    assert _valid_cells(props, 1, 0) == {(1, 1), (2, 2), (4, 3)}  # the 3 best of image 1
    # Part 1 has no positives anywhere: m = 40 for every image, zero-score cells included.
    assert int(_block_valid(props, 0, 1).sum()) == 40 == int(_block_valid(props, 1, 1).sum())
    assert int(props.valid.sum()) == 6 + 80
    # The first proposal of each (image, part) block is the best cell.
    assert tuple(props.cells[0].tolist()) == (0, 0)
    assert tuple(props.cells[P * k].tolist()) == (1, 1)


def test_cap_at_max_per_part():
    img0 = [(x, 0, 0.1 * (x + 1)) for x in range(7)]  # 7 positives
    img1 = [(x, 2, 0.1 * (x + 1)) for x in range(6)]  # 6 positives
    ph, w = _targets([img0, img1])
    props = sample_proposals(ph, w, K, max_per_part=4)
    assert len(props) == 2 * P * 4
    assert _valid_cells(props, 0, 0) == {(3, 0), (4, 0), (5, 0), (6, 0)}
    assert _valid_cells(props, 1, 0) == {(2, 2), (3, 2), (4, 2), (5, 2)}


def test_image_without_part_gives_the_cap_to_every_image():
    # The published trainer: image 1 has no cell for part 0, so the fewest positives is 0
    # and every image refines the cap (40) of them, its 2 positives first, then empty cells.
    ph, w = _targets([[(1, 1, 0.9), (2, 2, 0.8)], []])
    props = sample_proposals(ph, w, K, max_per_part=40)
    for image in (0, 1):
        valid = _block_valid(props, image, 0)
        assert valid.shape == (40,) and bool(valid.all())
    first = (props.batch_index == 0) & (props.part_index == 0)
    assert [tuple(c) for c in props.cells[first][:2].tolist()] == [(1, 1), (2, 2)]
    rest = props.cells[first][2:]
    assert proposal_scores(ph, w, K)[0, 0, rest[:, 1], rest[:, 0]].eq(0).all()
    # The other choice counts only positive cells: image 0 keeps 2, image 1 none.
    props = sample_proposals(ph, w, K, max_per_part=40, empty_cells=False)
    assert _valid_cells(props, 0, 0) == {(1, 1), (2, 2)}
    assert int(_block_valid(props, 1, 0).sum()) == 0


def test_cap_larger_than_the_map():
    ph, w = _targets([[(1, 1, 0.9)], []])
    props = sample_proposals(ph, w, K, max_per_part=1000)  # h * w = 48 cells a map
    assert len(props) == 2 * P * H * W and bool(props.valid.all())


def test_gather_at_cells_reads_the_part_channels():
    b = 2
    maps = torch.arange(b * P * K * 2 * H * W, dtype=torch.float32).view(b, P * K * 2, H, W)
    cells = torch.tensor([[3, 1], [7, 5]])
    batch_index = torch.tensor([1, 0])
    part_index = torch.tensor([0, 1])
    out = gather_at_cells(maps, cells, batch_index, part_index, K)
    assert out.shape == (2, K, 2)
    for n in range(2):
        x, y = cells[n].tolist()
        for k in range(K):
            for c in range(2):
                ch = (int(part_index[n]) * K + k) * 2 + c
                assert out[n, k, c] == maps[batch_index[n], ch, y, x]
    # Channels-last maps give the same values.
    out_cl = gather_at_cells(maps.to(memory_format=torch.channels_last), cells, batch_index,
                             part_index, K)
    assert torch.equal(out, out_cl)
