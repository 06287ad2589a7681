"""``pinet-eval``: evaluate a checkpoint on a split (``conf/eval.yaml``).

    pinet-eval ckpt_path=outputs/synthetic/runs/<time>/checkpoints/last.ckpt
    pinet-eval ckpt_path=w32.ckpt data=crowdpose split=test paths.data_dir=/datasets

The network and its codec (layout, input size, cell/pixel convention) come from the
checkpoint (a Lightning ``.ckpt``, a ``model.pt`` or the published weights, read by
:func:`~pinet_lightning.model.checkpoints.load_network`; ``input_size=`` evaluates at another
size); the data from ``data=...`` or, by default, from the data settings the checkpoint
carries (its training run's). Prints the metric table and writes ``metrics.json`` and
``results.json`` (COCO keypoint results) into the run directory. ``trainer=ddp`` evaluates on
several devices.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from pinet_lightning.cli.config import check_trainer_settings, run_hydra
from pinet_lightning.cli.ddp import ddp_job_scope, install_launcher, register_job
from pinet_lightning.cli.run import start_run, stopped_runs_fail, write_metrics
from pinet_lightning.cli.tables import format_metrics, print_metric_table
from pinet_lightning.codec.codec import PINetCodec
from pinet_lightning.core.annotations import KeypointCountError
from pinet_lightning.core.atomic import copy_file
from pinet_lightning.core.config import to_plain
from pinet_lightning.data.datamodule import PINetDataModule
from pinet_lightning.model.checkpoints import LoadedNetwork, load_network
from pinet_lightning.training.module import PINetModule

__all__ = ["main", "evaluate"]

log = logging.getLogger("pinet_lightning.eval")


def _datamodule(cfg: DictConfig, codec: PINetCodec, loaded: LoadedNetwork) -> PINetDataModule:
    """The data: ``data=...`` when given, else the training run's data settings the
    checkpoint carries; either way in the checkpoint's frame (``codec``)."""
    if cfg.get("data") is not None:
        return instantiate(cfg.data, codec=codec.to_dict(), _convert_="all")
    if not loaded.data:
        raise ValueError(
            f"pinet-eval: no data=... given and {cfg.ckpt_path} carries no data settings (a "
            "checkpoint of an older version, or the published weights): pass data=<synthetic "
            "| crowdpose | coco | ochuman | custom> (and its paths)")
    log.info("data settings of the training run, from %s", cfg.ckpt_path)
    return PINetDataModule(**{**loaded.data, "codec": codec})


# the data option of each built-in layout's dataset
_LAYOUT_DATA = {"crowdpose": "crowdpose", "coco": "coco", "ochuman": "ochuman"}


def _layout_mismatch(cfg: DictConfig, loaded: Any, err: KeypointCountError) -> ValueError:
    """pinet-eval's own fix for data of another keypoint count: the layout is the
    checkpoint's, so the data must change (``layout=...`` cannot help, unlike in training)."""
    layout = loaded.net.layout
    if loaded.data and cfg.get("data") is not None:
        fix = (f"drop data=... to evaluate on the data the checkpoint was trained on (its "
               f"settings are in {cfg.ckpt_path}), or give data of that layout")
    elif layout.name in _LAYOUT_DATA:
        fix = (f"evaluate it on {layout.name} data (data={_LAYOUT_DATA[layout.name]} and "
               "its paths, or data=custom with annotations of that layout)")
    else:
        fix = "evaluate it on annotations of that layout (data=custom and their paths)"
    return ValueError(
        f"pinet-eval: {err.source} has {err.found} keypoints, but the checkpoint "
        f"{cfg.ckpt_path} is a network for the layout '{layout.name}' ({err.expected} "
        f"keypoints), and pinet-eval takes the layout from the checkpoint (layout=... does "
        f"not change it): {fix}; or evaluate a checkpoint trained on {err.found}-keypoint data")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.split``; returns the metrics."""
    with ddp_job_scope():
        return _evaluate(cfg)


def _evaluate(cfg: DictConfig) -> dict[str, Any]:
    split = str(cfg.get("split", "test"))
    if split not in ("test", "val"):
        raise ValueError(f"pinet-eval: split must be 'test' or 'val', got '{split}'")
    check_trainer_settings(cfg.trainer)
    out_dir = start_run(cfg)

    loaded = load_network(Path(str(cfg.ckpt_path)).expanduser(),
                          trust_checkpoint=bool(cfg.get("trust_checkpoint", False)))
    codec = loaded.codec
    if cfg.get("input_size") is not None:
        codec = PINetCodec.from_any(codec, input_size=int(cfg.input_size))
    model = PINetModule(codec=codec, net=loaded.net, decode=to_plain(cfg.decode))
    datamodule = _datamodule(cfg, codec, loaded)
    callbacks = [pl.callbacks.RichProgressBar()]
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=False, callbacks=callbacks,
                                      _convert_="all")
    install_launcher(trainer)
    register_job("pinet_lightning.cli.eval:evaluate", out_dir / "config.yaml")
    run = trainer.test if split == "test" else trainer.validate
    try:
        with stopped_runs_fail("pinet-eval"):
            results = run(model, datamodule=datamodule)
    except KeypointCountError as err:  # raised when the split's file is read
        raise _layout_mismatch(cfg, loaded, err) from err
    metrics: dict[str, Any] = {}
    for res in results:
        metrics.update(format_metrics(res))
    if not trainer.is_global_zero:
        return metrics
    evaluation = model.evaluations.get(split)
    if evaluation is not None and evaluation.results_path is not None:
        copy_file(evaluation.results_path, out_dir / "results.json")
        metrics["results_json"] = str(out_dir / "results.json")
    metrics.update({"checkpoint": str(Path(str(cfg.ckpt_path)).resolve()), "split": split,
                    "protocol": datamodule.protocol, "convention": codec.convention,
                    "input_size": codec.input_size,
                    "run_dir": str(out_dir)})
    write_metrics(out_dir / "metrics.json", metrics)
    print_metric_table(metrics, title=f"PINet eval ({split}): {cfg.ckpt_path}")
    return metrics


def main() -> None:
    """Console entry point ``pinet-eval``."""
    run_hydra("eval", evaluate)


if __name__ == "__main__":
    main()
