"""``pinet-eval``: evaluate a checkpoint on a split (``conf/eval.yaml``).

    pinet-eval ckpt_path=outputs/synthetic/runs/<time>/checkpoints/last.ckpt
    pinet-eval ckpt_path=w32.ckpt data=crowdpose split=test paths.data_dir=/datasets

The network and its layout come from the checkpoint (a Lightning ``.ckpt`` or a
``model.pt``); the data from ``data=...`` or, by default, from the training run's own
``config.yaml``. Prints the metric table and writes ``metrics.json`` and ``results.json``
(COCO keypoint results) into the run directory. ``trainer=ddp`` evaluates on several devices.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig

from pinet_lightning.cli.common import (
    format_metrics,
    load_inference_net,
    print_metric_table,
    run_config_for,
    run_hydra,
    start_run,
    to_plain,
    write_metrics,
)
from pinet_lightning.cli.ddp import ddp_job_scope, install_launcher, register_job

__all__ = ["main", "evaluate"]

log = logging.getLogger("pinet_lightning.eval")


def _data_config(cfg: DictConfig) -> DictConfig:
    if cfg.get("data") is not None:
        return cfg.data
    run_cfg = run_config_for(cfg.ckpt_path)
    if run_cfg is None or run_cfg.get("data") is None:
        raise ValueError(
            f"pinet-eval: no data=... given and no training-run config.yaml next to "
            f"{cfg.ckpt_path} (expected <run>/config.yaml): pass data=<synthetic | crowdpose | "
            "coco | ochuman | custom> (and its paths)"
        )
    log.info("data config of the training run %s", Path(str(cfg.ckpt_path)).resolve())
    return run_cfg.data


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.split``; returns the metrics."""
    with ddp_job_scope():
        return _evaluate(cfg)


def _evaluate(cfg: DictConfig) -> dict[str, Any]:
    from hydra.utils import instantiate

    from pinet_lightning.module import PINetModule

    split = str(cfg.get("split", "test"))
    if split not in ("test", "val"):
        raise ValueError(f"pinet-eval: split must be 'test' or 'val', got '{split}'")
    out_dir = start_run(cfg)

    predictor = load_inference_net(cfg.ckpt_path,
                                   trust_checkpoint=bool(cfg.get("trust_checkpoint", False)))
    net_config = {k: v for k, v in predictor.net.config.items() if k != "layout"}
    layout = predictor.layout.to_dict()
    model = PINetModule(layout=layout, network=net_config, decode=to_plain(cfg.decode))
    model.net.load_state_dict(predictor.net.state_dict())
    # the data follow the network: its layout and its cell/pixel convention (input resizing)
    datamodule = instantiate(_data_config(cfg), layout=layout,
                             convention=predictor.net.convention.name, _convert_="all")
    if datamodule.layout.num_keypoints != model.layout.num_keypoints:
        raise ValueError(f"pinet-eval: the checkpoint's layout has {model.layout.num_keypoints}"
                         f" keypoints but the data has {datamodule.layout.num_keypoints}")
    callbacks = [pl.callbacks.RichProgressBar()]
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=False, callbacks=callbacks,
                                      _convert_="all")
    install_launcher(trainer)
    register_job("pinet_lightning.cli.eval:evaluate", out_dir / "config.yaml")
    run = trainer.test if split == "test" else trainer.validate
    results = run(model, datamodule=datamodule)
    metrics: dict[str, Any] = {}
    for res in results:
        metrics.update(format_metrics(res))
    if not trainer.is_global_zero:
        return metrics
    written = sorted((out_dir / "results").glob(f"{split}_*.json"),
                     key=lambda p: p.stat().st_mtime)
    written = [p for p in written if not p.stem.endswith("_metrics")]
    if written:
        shutil.copyfile(written[-1], out_dir / "results.json")
        metrics["results_json"] = str(out_dir / "results.json")
    metrics.update({"checkpoint": str(Path(str(cfg.ckpt_path)).resolve()), "split": split,
                    "protocol": datamodule.protocol, "convention": datamodule.convention,
                    "run_dir": str(out_dir)})
    write_metrics(out_dir / "metrics.json", metrics)
    print_metric_table(metrics, title=f"PINet eval ({split}): {cfg.ckpt_path}")
    return metrics


def main() -> None:
    """Console entry point ``pinet-eval``."""
    run_hydra("eval", evaluate)


if __name__ == "__main__":
    main()
