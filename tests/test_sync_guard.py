"""The sync guard: no host-device sync in a training step + backward, nor in the decoding up
to pose fusion (issue 23), counted on the CPU by :class:`SyncCounter` (a failure names each
op and the Python line that made it)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from pinet_lightning.codec.codec import PINetCodec
from pinet_lightning.core.sync_debug import SyncCounter
from pinet_lightning.data.datamodule import PINetDataModule
from pinet_lightning.inference import decoding
from pinet_lightning.inference.predictor import Predictor
from pinet_lightning.training.module import PINetModule

SMALL = {"backbone": "hrnet_w18_small", "pretrained": None, "refine_layers": 1}
INPUT = 128


def _line() -> int:
    return inspect.currentframe().f_back.f_lineno


def test_sync_counter_names_each_sync_and_its_line():
    x = torch.arange(6.0, requires_grad=True)
    mask = x > 2
    expected = []  # (op, line)
    with SyncCounter() as syncs:
        x.sum().item()
        expected.append(("item", _line() - 1))
        bool(x[0] > 1)
        expected.append(("__bool__", _line() - 1))
        torch.equal(x, x)
        expected.append(("aten.equal", _line() - 1))
        with torch.inference_mode():  # where CPU .item() skips the aten level
            int(x.detach().max())
            expected.append(("__int__", _line() - 1))
        x.detach().nonzero()
        expected.append(("aten.nonzero", _line() - 1))
        x[mask]
        expected.append(("aten.index.Tensor", _line() - 1))
        torch.masked_select(x, mask)
        expected.append(("aten.masked_select", _line() - 1))
        torch.unique(x.detach())
        expected.append(("unique", _line() - 1))
        x.detach().repeat_interleave(torch.ones(6, dtype=torch.long))
        expected.append(("aten.repeat_interleave.Tensor", _line() - 1))
        x.detach().tolist()
        expected.append(("tolist", _line() - 1))
        x.detach().cpu()
        expected.append(("cpu", _line() - 1))
        torch.as_tensor([1, 2], device=x.device)
        expected.append(("as_tensor", _line() - 1))
        x.new_tensor([1.0])
        expected.append(("new_tensor", _line() - 1))
        # no sync: fixed shapes, no value read on the host
        y = torch.where(mask, x, torch.zeros((), dtype=x.dtype)).topk(3).values
        x.detach().repeat_interleave(2)
        x.detach().repeat_interleave(torch.full((6,), 2), output_size=12)
        x[torch.tensor([0, 2])]  # a long index (made on the host: no device given)
        torch.zeros(4)[torch.arange(2)] = 1.0
        (y * x[:3]).sum().backward()
    got = [(e.op, int(e.where.split(":")[1].split()[0])) for e in syncs.events]
    assert len(got) == len(expected), syncs.report()
    for (op, line), (want_op, want_line) in zip(got, expected, strict=True):
        assert want_op in op and line == want_line, syncs.report()
    assert all("test_sync_guard.py" in e.where for e in syncs.events)
    # in backward: the autograd node is named (a boolean mask in a custom backward)
    class MaskedGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * (grad[grad > 0].sum() > 0)

    with SyncCounter() as syncs:
        MaskedGrad.apply(x).sum().backward()
    assert syncs.events and all(e.backward for e in syncs.events), syncs.report()
    assert "index.Tensor" in syncs.report() and "backward" in syncs.report()
    # on a GPU (cpu_is_device=False) host-side .cpu() / .tolist() of CPU tensors are free
    with SyncCounter(cpu_is_device=False) as syncs:
        x.detach().cpu().tolist()
    assert not syncs.events


class CountSyncs(pl.Callback):
    """Counts the syncs of each training step, from the batch on the device through
    ``training_step`` (the loss, training proposals, Pose Refinement, the refine loss, the
    logging, the divergence flag) to the end of backward."""

    def __init__(self) -> None:
        self.steps: list[SyncCounter] = []
        self._open: SyncCounter | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._open = SyncCounter().__enter__()

    def on_after_backward(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close()

    def _close(self) -> None:
        if self._open is not None:
            self._open.__exit__(None, None, None)
            self.steps.append(self._open)
            self._open = None


@pytest.mark.parametrize("sparse,gpu_config", [(True, True), (False, False)],
                         ids=["sparse-bf16-channels_last", "dense-fp32"])
def test_training_step_and_backward_make_no_host_sync(synthetic_crowd, tmp_path, sparse,
                                                      gpu_config):
    """Training steps under the Trainer: 0 syncs, in the GPU configuration (sparse targets,
    bf16-mixed, channels_last; compile: test_gpu_config.py) and with dense targets in fp32.
    The divergence check reads its flag every ``finite_check_every`` steps (100 on a GPU):
    not here."""
    images, ann = synthetic_crowd
    split = {"images": str(images), "annotations": str(ann)}
    dm = PINetDataModule(codec=PINetCodec("crowdpose", input_size=INPUT, sparse=sparse),
                         protocol="crowdpose", train=split, val=split, batch_size=2, num_workers=0,
                         pin_memory=False, persistent_workers=False)
    torch.manual_seed(0)
    module = PINetModule(codec=dm.codec, network=SMALL, finite_check_every=100,
                         channels_last=gpu_config)
    counted = CountSyncs()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, limit_val_batches=0,
                         num_sanity_val_steps=0, precision="bf16-mixed" if gpu_config else
                         "32-true", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path), callbacks=[counted])
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2 and len(counted.steps) == 2
    for syncs in counted.steps:
        assert len(syncs.events) == 0, syncs.report()
    assert module._channels_last == gpu_config


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_decoding_up_to_pose_fusion_makes_no_host_sync(monkeypatch, bf16):
    """``Predictor.predict`` (resize, flip test, peaks, coarse poses, one refine call, flip
    averaging, scores, back to image pixels) up to pose fusion: 0 syncs; fusion then takes
    the proposals to the host once."""
    torch.manual_seed(0)
    module = PINetModule(codec=PINetCodec("crowdpose", input_size=INPUT), network=SMALL)
    reached = {}

    def fusion(poses, valid, sigmas, cfg=None):  # where the counted region ends
        reached.update(poses=poses, valid=valid)
        return [(torch.zeros(0, poses.shape[2], 3), torch.zeros(0))] * len(poses)

    monkeypatch.setattr(decoding, "fuse_batch", fusion)
    # threshold -1: every peak a valid proposal, so the refinement sees all of them
    predictor = Predictor(module.net, input_size=INPUT, device="cpu", bf16=bf16,
                          decode_cfg={"top_k": 10, "score_threshold": -1.0})
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (100, 150, 3), dtype=np.uint8) for _ in range(2)]
    with SyncCounter() as syncs:
        predictor.predict(images)
    assert len(syncs.events) == 0, syncs.report()
    assert reached["valid"].shape == (2, 3 * 10) and bool(reached["valid"].all())
    assert torch.isfinite(reached["poses"]).all()
