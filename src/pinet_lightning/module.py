"""``PINetModule``: the LightningModule that trains PINet and evaluates it with DDP gathering.

Gotchas (read before changing):

- Hyperparameters are plain python (dicts, lists, str): Hydra's DictConfig is converted in
  ``__init__``, so a checkpoint alone rebuilds the network (the Predictor relies on
  ``hyper_parameters["layout"|"network"|"decode"]`` and on ``state_dict`` keys ``net.*``).
  ``network.pretrained`` is written as ``None`` into checkpoints: the weights are in the
  state dict and the ImageNet file may not exist where the checkpoint is loaded.
- Divergence: each step ORs a "loss not finite" flag per loss term on the device; the flag is
  read (one host sync) every ``finite_check_every`` steps (default: every step on the CPU,
  100 on an accelerator), at each epoch end and before validation, summed over DDP ranks,
  and a :class:`NonFiniteLossError` stops the run naming the steps and loss terms.
- Training losses are logged twice: ``train/<name>`` on every step without a DDP sync, and
  ``train/<name>_epoch`` on the epoch with ``sync_dist=True``. Lightning's ``sync_dist``
  applies to step values too (one all-reduce per step), which is why there are two calls.
- Gradient clipping and bf16-mixed are the Trainer's (``gradient_clip_val``,
  ``precision="bf16-mixed"``): nothing to do here; the losses compute in float32 anyway.
- ``channels_last`` / ``compile`` ("auto", True, False) are applied in ``configure_model``
  where the trainer's device is known; "auto" means on CUDA only. ``compile`` compiles the
  backbone + heads forward used by ``training_step`` (static shapes); evaluation runs the
  eager network because its image sizes vary (a compiled graph would recompile per size).
  The compiled callable is kept outside the module tree so checkpoint keys stay ``net.*``.
- Evaluation: every rank keeps ``{image_id: [COCO result dicts]}`` (an image with no pose
  keeps an empty list, so its padded duplicate is still recognised). At epoch end the
  stage's :class:`~pinet_lightning.evaluation.KeypointEvaluator` gathers them, evaluates ONCE
  on rank 0 and broadcasts the metrics, so every rank logs identical values (logged with a
  "max" sync, exact for equal values, which silences Lightning's "use sync_dist" warning).
  Besides the protocol's metrics, ``<stage>/images`` (unique images evaluated) and
  ``<stage>/poses`` are logged; ``self.evaluations[stage]`` keeps the metrics and the
  results file of the stage's last evaluation.
- Subclasses may override ``_predict_batch(batch) -> {image_id: [COCO result dicts]}`` (the
  tests do, with an oracle) to evaluate other predictions through the same gather path.
- Sanity check: evaluation RUNS during ``trainer.sanity_checking`` on the few sanity batches
  (results written to ``results/val_sanity.json``): it proves gather + evaluator work before
  hours of training. Lightning discards the values it logs then. The metrics are computed
  over every image of the ground truth, so partial validation (``limit_val_batches``, the
  sanity check) gives low AP: only full passes are comparable.
- The evaluator is the data module's (``datamodule.evaluator(stage)``: annotation file,
  protocol, layout sigmas) unless this module was given ``val_annotation_file`` /
  ``test_annotation_file`` (then ``eval_protocol``, else the data module's ``protocol``, else
  ``crowdpose`` for the CrowdPose layout and ``coco`` otherwise): see :meth:`evaluator`.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from pinet_lightning.config import to_plain as _plain
from pinet_lightning.conventions import get_convention
from pinet_lightning.decoding import DecodeConfig, predict_poses
from pinet_lightning.evaluation import (
    Evaluation,
    KeypointEvaluator,
    merge_gathered_results,
    to_coco_results,
)
from pinet_lightning.layouts import Layout, get_layout
from pinet_lightning.losses import PINetLoss
from pinet_lightning.network import PINet

__all__ = ["PINetModule", "NonFiniteLossError", "merge_gathered_results", "resolve_switch",
           "check_data_matches_network"]

log = logging.getLogger(__name__)


def _defaults(cls: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Keyword arguments and their defaults, read off a signature so the two never drift."""
    return {name: p.default for name, p in inspect.signature(cls).parameters.items()
            if name not in skip and p.default is not inspect.Parameter.empty}


NETWORK_DEFAULTS: dict[str, Any] = _defaults(PINet, skip=("layout",))
LOSS_DEFAULTS: dict[str, Any] = _defaults(PINetLoss)
DECODE_DEFAULTS: dict[str, Any] = DecodeConfig().to_dict()
OPTIMIZER_DEFAULTS: dict[str, Any] = {"lr": 1e-3, "milestones": [200, 260], "gamma": 0.1}


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite: the run diverged (the message says where)."""


def _merge(name: str, defaults: Mapping[str, Any], given: Any, strict: bool = True
           ) -> dict[str, Any]:
    """Defaults updated by the given mapping; unknown keys are an error when ``strict``."""
    given = _plain(given) if given is not None else {}
    if not isinstance(given, Mapping):
        raise TypeError(f"PINetModule({name}=...) must be a mapping, "
                        f"not {type(given).__name__}")
    unknown = sorted(set(given) - set(defaults))
    if strict and unknown:
        raise ValueError(f"unknown PINetModule {name} keys {unknown}; "
                         f"known: {sorted(defaults)} (fix the {name} section of the config)")
    return {**copy.deepcopy(dict(defaults)), **given}


def resolve_switch(value: bool | str, device: torch.device, name: str) -> bool:
    """``"auto"`` -> on when ``device`` is CUDA; booleans (or "true"/"false") pass through."""
    if isinstance(value, str):
        lowered = value.lower()
        if lowered == "auto":
            return device.type == "cuda"
        if lowered in ("true", "false"):
            return lowered == "true"
        raise ValueError(f"{name} must be 'auto', true or false, not '{value}'")
    return bool(value)


def check_data_matches_network(datamodule: Any, net: Any) -> None:
    """Raise when ``datamodule`` (its ``output_stride`` / ``convention``, when it has them)
    disagrees with the network's; the message names the setting to change."""
    if datamodule is None:
        return
    stride = getattr(datamodule, "output_stride", None)
    if stride is not None and int(stride) != int(net.output_stride):
        raise ValueError(f"data.output_stride={stride} but the network's output maps are "
                         f"input/{net.output_stride}: set data.output_stride="
                         f"{net.output_stride}")
    convention = getattr(datamodule, "convention", None)
    if convention is not None and get_convention(convention).name != net.convention.name:
        raise ValueError(f"data.convention={get_convention(convention).name} but the network "
                         f"decodes with '{net.convention.name}': set the top-level "
                         f"convention={net.convention.name} (it feeds both)")


class PINetModule(pl.LightningModule):
    """PINet training (algorithm.md 4, 6) and evaluation (algorithm.md 5, 7) in Lightning.

    Args:
        layout: layout name or mapping (stored as given; see :func:`get_layout`).
        network: ``PINet`` keyword arguments (backbone, pretrained, refine_layers).
        loss: ``PINetLoss`` keyword arguments (algorithm.md 4 weights, beta, proposals per part).
        optimizer: Adam ``lr``, MultiStepLR ``milestones`` (in epochs) and ``gamma``.
        decode: ``DecodeConfig`` fields used by validation / test / predict.
        channels_last, compile: "auto" (on CUDA only), True or False.
        eval_protocol, val_annotation_file, test_annotation_file: overrides of the
            datamodule's ``protocol`` / annotation files for evaluation.
        finite_check_every: steps between checks that the training loss is finite (a
            :class:`NonFiniteLossError` stops the run); None: every step on the CPU, every
            100 steps on an accelerator, where a check is a host-device sync (the flag
            stays on the device in between). Also checked at each epoch end.
        net: an already built :class:`PINet` to use (e.g. a loaded checkpoint's); its layout
            and config then replace ``layout`` and ``network``.
    """

    def __init__(
        self,
        layout: str | Mapping[str, Any] | Layout = "crowdpose",
        network: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        decode: Mapping[str, Any] | None = None,
        channels_last: bool | str = "auto",
        compile: bool | str = "auto",
        eval_protocol: str | None = None,
        val_annotation_file: str | None = None,
        test_annotation_file: str | None = None,
        finite_check_every: int | None = None,
        net: PINet | None = None,
    ) -> None:
        super().__init__()
        if net is not None:  # an already built network (pinet-eval): its own layout and config
            layout, network = net.layout, net.config
        layout = _plain(layout)
        network = _merge("network", NETWORK_DEFAULTS, network, strict=False)
        loss = _merge("loss", LOSS_DEFAULTS, loss)
        optimizer = _merge("optimizer", OPTIMIZER_DEFAULTS, optimizer)
        decode = _merge("decode", DECODE_DEFAULTS, decode, strict=False)
        self.save_hyperparameters({
            "layout": layout, "network": network, "loss": loss, "optimizer": optimizer,
            "decode": decode, "channels_last": _plain(channels_last), "compile": _plain(compile),
            "eval_protocol": eval_protocol,
            "val_annotation_file": None if val_annotation_file is None
            else str(val_annotation_file),
            "test_annotation_file": None if test_annotation_file is None
            else str(test_annotation_file),
        })
        self.layout = get_layout(layout)
        self.net = net if net is not None else PINet(self.layout, **network)
        if net is None and network.get("pretrained") is None:
            # the backbone logs the weights it loads; say so when there are none
            log.info("backbone %s: %s", self.net.backbone_name,
                     self.net.backbone.weights_source)
        self.criterion = PINetLoss(**loss)
        self.decode_cfg = DecodeConfig.from_any(decode)  # unknown fields: a ValueError
        self._channels_last = False
        self._compiled = False
        self._eval_results: dict[int, list[dict]] = {}
        self.evaluations: dict[str, Evaluation] = {}  # the last evaluation of each stage
        if finite_check_every is not None and int(finite_check_every) < 1:
            raise ValueError(f"finite_check_every must be >= 1 or null, got "
                             f"{finite_check_every}")
        self.finite_check_every = None if finite_check_every is None else int(finite_check_every)
        self._nonfinite: Tensor | None = None  # per loss term: seen non-finite since the check
        self._unchecked_from: int | None = None  # first step not yet checked
        self._loss_keys: list[str] = []

    # ------------------------------------------------------------------ setup
    def _target_device(self) -> torch.device:
        trainer = self._trainer
        if trainer is not None:
            return trainer.strategy.root_device
        return self.device

    def setup(self, stage: str) -> None:
        """The data must be encoded the way the network decodes: the network owns the
        output stride and the cell/pixel convention; a data module that states another one
        would train or evaluate at shifted or rescaled targets."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        check_data_matches_network(datamodule, self.net)

    def configure_model(self) -> None:
        """Apply the speed switches once the trainer's device is known."""
        device = self._target_device()
        if not self._channels_last and resolve_switch(self.hparams.channels_last, device,
                                                      "channels_last"):
            self.net.to(memory_format=torch.channels_last)
            self._channels_last = True
        if not self._compiled and resolve_switch(self.hparams.compile, device, "compile"):
            # Kept off the module tree (object.__setattr__): state dict keys stay "net.*".
            object.__setattr__(self, "_train_forward", torch.compile(self.net))
            self._compiled = True

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.net(self._prepare(images))

    def _prepare(self, images: Tensor) -> Tensor:
        if self._channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    # --------------------------------------------------------------- training
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        images = self._prepare(batch["image"])
        forward = self.__dict__.get("_train_forward", self.net)
        outputs = forward(images)
        losses = self.criterion(outputs, batch, self.net)
        batch_size = images.shape[0]
        # The progress bar reads its metrics as Python floats at every refresh: a host-device
        # sync per step on a GPU, so the loss shows in the bar on the CPU only.
        in_bar = images.device.type == "cpu"
        for name, value in losses.items():
            # Step values unsynced (no collective per step); epoch means synced once.
            self.log(f"train/{name}", value, on_step=True, on_epoch=False,
                     prog_bar=in_bar and name == "loss", batch_size=batch_size)
            self.log(f"train/{name}_epoch", value, on_step=False, on_epoch=True,
                     sync_dist=True, batch_size=batch_size)
        self._track_finite(losses)
        return losses["loss"]

    # ------------------------------------------------------- divergence guard
    def _check_interval(self) -> int:
        if self.finite_check_every is not None:
            return self.finite_check_every
        return 1 if self.device.type == "cpu" else 100

    def _track_finite(self, losses: Mapping[str, Tensor]) -> None:
        """Accumulate an on-device "non-finite" flag per loss term; check it every
        :meth:`_check_interval` steps (at the last, before that step's optimizer update)."""
        self._loss_keys = list(losses)
        flags = torch.stack([~torch.isfinite(v.detach()).all() for v in losses.values()])
        self._nonfinite = flags if self._nonfinite is None else self._nonfinite | flags
        if self._unchecked_from is None:
            self._unchecked_from = int(self.global_step)
        if int(self.global_step) + 1 - self._unchecked_from >= self._check_interval():
            self._check_finite()

    def _check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` when a step since the last check had a
        non-finite loss (on every rank: the flags are summed over ranks)."""
        if self._nonfinite is None:
            return
        flags, first = self._nonfinite, self._unchecked_from
        self._nonfinite, self._unchecked_from = None, None
        trainer = self._trainer  # None: a step run by hand (scripts/bench_train.py)
        if trainer is not None and trainer.world_size > 1:
            flags = trainer.strategy.reduce(flags.float(), reduce_op="sum")
        bad = flags.detach().cpu().numpy() > 0  # the one host sync of the window
        if not bad.any():
            return
        terms = ", ".join(n for n, b in zip(self._loss_keys, bad, strict=True) if b)
        last = int(self.global_step)
        where = f"at step {last}" if first == last else f"between steps {first} and {last}"
        raise NonFiniteLossError(
            f"the training loss became NaN or infinite ({terms}) {where} (epoch "
            f"{self.current_epoch}): training diverged and was stopped. Lower "
            "model.optimizer.lr, set trainer.gradient_clip_val (e.g. 1.0), or check the data; "
            "checkpoints/last.ckpt, if an epoch finished, keeps its weights (it is not "
            "overwritten with these)"
        )

    def on_train_epoch_end(self) -> None:
        if self._nonfinite is not None and self.trainer.world_size > 1:
            # rank 0's progress bar has already reduced the epoch metrics (lazily, on first
            # read); read them on every rank first so that the collectives pair up
            _ = self.trainer.callback_metrics
        self._check_finite()  # before the epoch's last.ckpt is written

    def on_validation_epoch_start(self) -> None:
        self._check_finite()  # during fit: do not evaluate diverged weights
        self._eval_results = {}

    def configure_optimizers(self) -> dict[str, Any]:
        """Adam + MultiStepLR stepped per epoch (algorithm.md 4, 6); clipping:
        Trainer.gradient_clip_val."""
        cfg = self.hparams.optimizer
        optimizer = torch.optim.Adam(self.parameters(), lr=float(cfg["lr"]))
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=[int(m) for m in cfg["milestones"]], gamma=float(cfg["gamma"])
        )
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "frequency": 1}}

    # ------------------------------------------------------------- evaluation
    def _predict_batch(self, batch: Mapping[str, Any]) -> dict[int, list[dict]]:
        """Poses of an evaluation batch as ``{image_id: [COCO result dicts]}``."""
        image_ids = [int(i) for i in _as_list(batch["image_id"])]
        per_image = predict_poses(self.net, self._prepare(batch["image"]), self.layout,
                                  batch["back_transform"], self.decode_cfg)
        out: dict[int, list[dict]] = {}
        for image_id, (poses, scores) in zip(image_ids, per_image, strict=True):
            out[image_id] = to_coco_results([image_id], [poses], [scores])
        return out

    def on_test_epoch_start(self) -> None:
        self._eval_results = {}

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_results.update(self._predict_batch(batch))

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_results.update(self._predict_batch(batch))

    def on_validation_epoch_end(self) -> None:
        name = "val_sanity" if self.trainer.sanity_checking else f"val_epoch{self.current_epoch}"
        self._evaluate_epoch("val", name)

    def on_test_epoch_end(self) -> None:
        self._evaluate_epoch("test", f"test_epoch{self.current_epoch}")

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int,
                     dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Per image: ``image_id``, ``poses`` (F, K, 3) in original pixels, ``scores`` (F,)."""
        per_image = predict_poses(self.net, self._prepare(batch["image"]), self.layout,
                                  batch["back_transform"], self.decode_cfg)
        ids = _as_list(batch.get("image_id", list(range(len(per_image)))))
        return [{"image_id": int(i), "poses": p.detach().float().cpu(),
                 "scores": s.detach().float().cpu()}
                for i, (p, s) in zip(ids, per_image, strict=True)]

    def evaluator(self, stage: str) -> KeypointEvaluator:
        """The evaluator of ``stage`` ("val" / "test"): the data module's
        (``datamodule.evaluator(stage)``: its annotation file, protocol and layout), unless
        this module was given ``<stage>_annotation_file`` (then with ``eval_protocol``, else
        the data module's protocol, else ``crowdpose`` for the CrowdPose layout and ``coco``
        otherwise)."""
        key = f"{stage}_annotation_file"
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        given = self.hparams.get(key)
        if given is None and hasattr(dm, "evaluator"):
            return dm.evaluator(stage)
        if given is None:
            raise ValueError(
                f"{stage} evaluation needs the ground-truth json: use a data module "
                f"with an evaluator(stage) (PINetDataModule) or pass PINetModule({key}=...)"
            )
        protocol = (self.hparams.get("eval_protocol") or getattr(dm, "protocol", None)
                    or ("crowdpose" if self.layout.name == "crowdpose" else "coco"))
        return KeypointEvaluator(str(given), str(protocol), tuple(self.layout.sigmas),
                                 skip_invalid=bool(getattr(dm, "skip_invalid", False)))

    def _results_dir(self) -> Path:
        # trainer.log_dir is a collective (it broadcasts): call it on every rank.
        root = self.trainer.log_dir or self.trainer.default_root_dir
        return Path(root) / "results"

    def _evaluate_epoch(self, stage: str, file_stem: str) -> None:
        evaluator = self.evaluator(stage)
        local, self._eval_results = self._eval_results, {}
        evaluation = evaluator.gather_and_evaluate(
            local, self.trainer.strategy, self._results_dir() / f"{file_stem}.json")
        self.evaluations[stage] = evaluation
        # Every rank holds the same broadcast values. sync_dist=False would do, but Lightning
        # then warns on every epoch-level metric under DDP; a "max" reduction of identical
        # values is exact and costs one tiny all-reduce per metric per epoch.
        for key, value in evaluation.metrics.items():
            self.log(f"{stage}/{key}", value, sync_dist=True, reduce_fx="max",
                     prog_bar=key == "AP")

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The weights travel in the state dict: do not require the ImageNet file on reload.
        hparams = checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY)
        if isinstance(hparams, Mapping) and isinstance(hparams.get("network"), Mapping):
            hparams = dict(hparams)
            hparams["network"] = {**hparams["network"], "pretrained": None}
            checkpoint[self.CHECKPOINT_HYPER_PARAMS_KEY] = hparams


def _as_list(value: Any) -> list:
    if isinstance(value, Tensor):
        return value.reshape(-1).tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]
