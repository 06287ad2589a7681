"""The run's learning curve (LearningCurve -> learning_curve.png) and the per-epoch progress
line (EpochProgress) on a toy LightningModule that logs PINet's metric names."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from pinet_lightning.inference.visualize import learning_curve_figure
from pinet_lightning.training.callbacks import (
    EpochProgress,
    LastCheckpoint,
    LearningCurve,
    progress_line,
)


class _Toy(pl.LightningModule):
    """Logs train/{loss,heatmap}(_epoch) like PINetModule, and val/AP = 0.1 x epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).square().mean()
        for name, value in (("loss", loss), ("heatmap", loss.detach() / 2)):
            self.log(f"train/{name}", value, on_step=True, on_epoch=False)
            self.log(f"train/{name}_epoch", value, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        self.log("val/AP", 0.1 * (self.current_epoch + 1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(n: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(n, 2)), batch_size=2)  # 4 steps an epoch


def _fit(callbacks, tmp_path, epochs: int = 3, ckpt_path=None, **kwargs) -> pl.Trainer:
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                         enable_checkpointing=any(isinstance(c, pl.callbacks.Checkpoint)
                                                  for c in callbacks),
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks, default_root_dir=tmp_path,
                         check_val_every_n_epoch=2, num_sanity_val_steps=1,
                         log_every_n_steps=2, **kwargs)
    trainer.fit(_Toy(), _loader(), _loader(2), ckpt_path=ckpt_path, weights_only=False)
    return trainer


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pinet_lightning.progress"]


def test_progress_line_format():
    line = progress_line(3, 18, 120, {"loss": 0.021432, "heatmap": 0.0192}, {"AP": 0.04712},
                         0.002, 102.4, 3725.0)
    assert line == ("epoch 3/18 step 120 loss 0.02143 heatmap 0.0192 val/AP 0.047 lr 0.002 "
                    "elapsed 1m42s eta 1h02m05s")
    assert progress_line(1, -1, 4, {}, {}, None, 5.0, None) == "epoch 1 step 4 elapsed 0m05s"


def test_one_progress_line_per_epoch_with_val_ap_after_validations(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pinet_lightning.progress")
    _fit([EpochProgress(when="always")], tmp_path, epochs=3)
    lines = _lines(caplog)
    assert len(lines) == 3
    assert lines[0].startswith("epoch 1/3 step 4 loss ")
    assert lines[2].startswith("epoch 3/3 step 12 loss ")
    # validation runs every 2nd epoch (and the sanity check shows nowhere): only epoch 2
    # carries val/AP, the value validated in that epoch
    assert ["val/AP" in line for line in lines] == [False, True, False]
    assert "val/AP 0.200" in lines[1]
    assert all(" heatmap " in line and " lr 0.01 " in line and " elapsed " in line
               and " eta " in line for line in lines)
    assert lines[2].endswith("eta 0m00s")


@pytest.mark.parametrize("isatty, expected", [(True, 0), (False, 2)])
def test_progress_auto_only_when_stdout_is_not_a_terminal(tmp_path, caplog, monkeypatch,
                                                          isatty, expected):
    caplog.set_level(logging.INFO, logger="pinet_lightning.progress")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: isatty, raising=False)
    _fit([EpochProgress()], tmp_path, epochs=2)
    assert len(_lines(caplog)) == expected


def test_progress_never_and_bad_value(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pinet_lightning.progress")
    _fit([EpochProgress(when="never")], tmp_path, epochs=1)
    assert _lines(caplog) == []
    with pytest.raises(ValueError, match="when must be one of"):
        EpochProgress(when="sometimes")


def test_learning_curve_collects_the_run_and_writes_the_picture(tmp_path):
    path = tmp_path / "run" / "learning_curve.png"
    curve = LearningCurve(path, losses=("loss", "heatmap"), metrics=("AP",))
    _fit([curve], tmp_path, epochs=4)
    steps, _ = curve.history["step"]["loss"]
    assert steps == [2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0]  # every log_every_n_steps
    assert curve.history["epoch"]["heatmap"][0] == [4.0, 8.0, 12.0, 16.0]
    # validations at epochs 2 and 4 (not the sanity check), at the step they ran
    assert curve.history["val"]["AP"] == [[8.0, 16.0], [pytest.approx(0.2), pytest.approx(0.4)]]
    # the heatmap value is half the loss, as logged
    loss, heat = (np.array(curve.history["epoch"][n][1]) for n in ("loss", "heatmap"))
    np.testing.assert_allclose(heat, loss / 2, rtol=1e-6)
    image = np.asarray(__import__("cv2").imread(str(path)))
    assert image.ndim == 3 and image.shape[0] > 300 and image.std() > 5


def test_learning_curve_survives_a_resume(tmp_path):
    # last.ckpt as the runs write it (LastCheckpoint, at each epoch end)
    first = LearningCurve(tmp_path / "a.png", losses=("loss",), metrics=("AP",))
    _fit([first, LastCheckpoint(tmp_path / "ckpt")], tmp_path, epochs=2)
    second = LearningCurve(tmp_path / "b.png", losses=("loss",), metrics=("AP",))
    _fit([second, LastCheckpoint(tmp_path / "ckpt")], tmp_path, epochs=4,
         ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    # the resumed callback holds the first run's values, then its own
    assert second.history["epoch"]["loss"][0] == [4.0, 8.0, 12.0, 16.0]
    assert second.history["epoch"]["loss"][1][:2] == first.history["epoch"]["loss"][1]
    assert second.history["val"]["AP"][0] == [8.0, 16.0]


def _row_of(image: np.ndarray, rgb: tuple[int, int, int], rows: slice) -> float:
    """Mean row of the pixels of exactly this colour inside the given rows, left of the
    legend."""
    part = image[rows, :700]
    hit = (part == np.array(rgb, np.uint8)).all(-1)
    assert hit.any(), f"no pixel of colour {rgb}"
    return float(np.nonzero(hit)[0].mean()) + (rows.start or 0)


def test_figure_puts_values_at_their_height():
    steps = [0.0, 50.0, 100.0]
    height = 680
    low = learning_curve_figure({"loss": (steps, [0.1] * 3)}, {"AP": (steps, [0.2] * 3)},
                                size=(900, height))
    high = learning_curve_figure({"loss": (steps, [0.1] * 3)}, {"AP": (steps, [0.8] * 3)},
                                 size=(900, height))
    blue = (31, 119, 180)  # the first series' colour
    lower_panel = slice(height // 2 + 40, height)
    row_low, row_high = _row_of(low, blue, lower_panel), _row_of(high, blue, lower_panel)
    assert row_high < row_low  # 0.8 is drawn above 0.2
    # linear axis: 0.2 and 0.8 are 0.6 of the axis apart; 0..1 spans the lower panel's
    # 236 plot rows (680 px figure: panel rows 414 to 650)
    assert row_low - row_high == pytest.approx(0.6 * 236, abs=4)
    assert row_low == pytest.approx(650 - 0.2 * 236, abs=3)
    # a falling loss is drawn going down: its first point is higher than its last
    falling = learning_curve_figure({"loss": (steps, [1.0, 0.1, 0.01])}, {},
                                    size=(900, height))
    upper = falling[40:height // 2 + 20]
    hit = (upper == np.array(blue, np.uint8)).all(-1)
    cols = np.nonzero(hit.any(0))[0]
    first_rows = np.nonzero(hit[:, cols[:5]].any(1))[0].mean()
    last_rows = np.nonzero(hit[:, cols[-5:]].any(1))[0].mean()
    assert first_rows < last_rows
