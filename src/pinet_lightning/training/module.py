"""``PINetModule``: the LightningModule that trains PINet and evaluates it with DDP gathering.

Gotchas (read before changing):

- Hyperparameters are plain python (dicts, lists, str): Hydra's DictConfig is converted in
  ``__init__``, so a checkpoint alone rebuilds the network (the Predictor relies on
  ``hyper_parameters["codec"|"network"|"decode"]`` and on ``state_dict`` keys ``net.*``).
  The optimizer and scheduler are Hydra nodes kept as such (``_target_`` strings and numbers)
  and instantiated in :meth:`configure_optimizers`.
  ``network.pretrained`` is written as ``None`` into checkpoints: the weights are in the
  state dict and the ImageNet file may not exist where the checkpoint is loaded.
- Divergence: each step ORs a "loss not finite" flag per loss term on the device and keeps
  the step losses' maximum there; every ``finite_check_every`` steps (default: every step on
  the CPU, 100 on an accelerator), at each epoch end and before validation the flags, a
  "weights not finite" flag (every parameter and batch-norm buffer) and a "loss exploded"
  flag (the maximum over ``explosion_factor`` times the mean loss of the run's first epoch)
  are read in one host sync, summed over DDP ranks, and a :class:`DivergenceError`
  (:class:`NonFiniteLossError` for the loss) stops the run naming the steps and the cause.
  The epoch-end check runs before ``last.ckpt`` is written (checkpoint callbacks run after
  the module's ``on_train_epoch_end``), so no checkpoint holds diverged weights.
- Training losses are logged twice: ``train/<name>`` on every step without a DDP sync, and
  ``train/<name>_epoch`` on the epoch with ``sync_dist=True``. Lightning's ``sync_dist``
  applies to step values too (one all-reduce per step), which is why there are two calls.
- Gradient clipping and bf16-mixed are the Trainer's (``gradient_clip_val``,
  ``precision="bf16-mixed"``): nothing to do here; the losses compute in float32 anyway.
- ``channels_last`` / ``compile`` ("auto", True, False) are applied in ``configure_model``
  where the trainer's device is known; "auto" means on CUDA only. ``compile`` compiles the
  backbone + heads forward used by ``training_step`` (static shapes; ``compile_options`` are
  ``torch.compile``'s keyword arguments, e.g. the CPU test's backend); evaluation runs the
  eager network because its image sizes vary (a compiled graph would recompile per size).
  The compiled callable is kept outside the module tree so checkpoint keys stay ``net.*``.
- Evaluation: every rank keeps ``{image_id: [COCO result dicts]}`` (an image with no pose
  keeps an empty list, so its padded duplicate is still recognised). At epoch end the
  stage's :class:`~pinet_lightning.evaluation.coco.KeypointEvaluator` gathers them, evaluates ONCE
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
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import Tensor

from pinet_lightning.codec.codec import PINetCodec
from pinet_lightning.core.config import to_plain as _plain
from pinet_lightning.evaluation.coco import (
    Evaluation,
    KeypointEvaluator,
    merge_gathered_results,
    to_coco_results,
)
from pinet_lightning.inference.decoding import DecodeConfig, predict_poses
from pinet_lightning.model.network import PINet
from pinet_lightning.training.losses import PINetLoss

__all__ = ["PINetModule", "DivergenceError", "NonFiniteLossError", "merge_gathered_results",
           "resolve_switch", "check_same_frame"]

log = logging.getLogger(__name__)


def _defaults(cls: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Keyword arguments and their defaults, read off a signature so the two never drift."""
    return {name: p.default for name, p in inspect.signature(cls).parameters.items()
            if name not in skip and p.default is not inspect.Parameter.empty}


NETWORK_DEFAULTS: dict[str, Any] = _defaults(PINet, skip=("layout",))
LOSS_DEFAULTS: dict[str, Any] = _defaults(PINetLoss)
DECODE_DEFAULTS: dict[str, Any] = DecodeConfig().to_dict()
# algorithm.md 4, 6: Adam, MultiStepLR stepped per epoch. Hydra nodes (``_partial_``): the
# optimizer is called with the parameters, the scheduler with the optimizer.
OPTIMIZER_DEFAULTS: dict[str, Any] = {"_target_": "torch.optim.Adam", "_partial_": True,
                                      "lr": 1e-3}
SCHEDULER_DEFAULTS: dict[str, Any] = {"_target_": "torch.optim.lr_scheduler.MultiStepLR",
                                      "_partial_": True, "milestones": [200, 260], "gamma": 0.1}


class DivergenceError(FloatingPointError):
    """Training diverged: the loss or the weights (parameters, batch-norm statistics) became
    NaN or infinite, or the loss exploded (the message says which, where and what to do)."""


class NonFiniteLossError(DivergenceError):
    """The training loss became NaN or infinite: the run diverged (the message says where)."""


_DIVERGED_FIX = ("Lower model.optimizer.lr, set trainer.gradient_clip_val (e.g. 1.0), or check "
                 "the data; checkpoints/last.ckpt, if an epoch finished, keeps the weights of "
                 "the last epoch that ended finite (it is not overwritten with these)")


def _merge(name: str, defaults: Mapping[str, Any], given: Any, strict: bool = True
           ) -> dict[str, Any]:
    """Defaults updated by the given mapping; unknown keys are an error when ``strict``. A
    Hydra node naming another ``_target_`` than the default's replaces it whole."""
    given = _plain(given) if given is not None else {}
    if not isinstance(given, Mapping):
        raise TypeError(f"PINetModule({name}=...) must be a mapping, "
                        f"not {type(given).__name__}")
    if "_target_" in given and given["_target_"] != defaults.get("_target_"):
        return dict(given)
    unknown = sorted(set(given) - set(defaults))
    if strict and unknown:
        moved = (" (the learning-rate schedule's milestones and gamma are model.scheduler's)"
                 if name == "optimizer" and {"milestones", "gamma"} & set(unknown) else "")
        raise ValueError(f"unknown PINetModule {name} keys {unknown}; "
                         f"known: {sorted(defaults)} (fix the {name} section of the config)"
                         + moved)
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


def check_same_frame(data: PINetCodec, model: PINetCodec) -> None:
    """Raise when the data module's codec and the module's differ; the message names the
    setting. (One ``codec`` config node feeds both, so only API users can split them.)"""
    if data == model:
        return
    diff = sorted(k for k, v in data.to_dict().items() if model.to_dict()[k] != v)
    raise ValueError(f"the data module's codec differs from the model's in {diff}: "
                     f"data {[data.to_dict()[k] for k in diff]}, model "
                     f"{[model.to_dict()[k] for k in diff]}; build both from one PINetCodec "
                     "(the Hydra config interpolates ${codec} into data and model)")


class PINetModule(pl.LightningModule):
    """PINet training (algorithm.md 4, 6) and evaluation (algorithm.md 5, 7) in Lightning.

    Args:
        codec: the frame and the targets (:class:`~pinet_lightning.codec.codec.PINetCodec` or
            a mapping of its fields): the layout, input size and convention the network is
            trained and evaluated in; stored in checkpoints as plain data.
        network: ``PINet`` keyword arguments (backbone, pretrained, refine_layers).
        loss: ``PINetLoss`` keyword arguments (algorithm.md 4 weights, beta, proposals per part).
        optimizer: a Hydra node of the optimizer, called with the parameters (default Adam,
            ``lr`` 1e-3); a mapping without ``_target_`` updates the default's fields.
        scheduler: a Hydra node of the learning-rate scheduler, called with the optimizer and
            stepped per epoch (default MultiStepLR, ``milestones`` [200, 260] in epochs,
            ``gamma`` 0.1); null: a constant learning rate.
        decode: ``DecodeConfig`` fields used by validation / test / predict.
        channels_last, compile: "auto" (on CUDA only), True or False.
        compile_options: ``torch.compile`` keyword arguments (``mode``, ``backend``, ...);
            None: its defaults (the inductor backend).
        eval_protocol, val_annotation_file, test_annotation_file: overrides of the
            datamodule's ``protocol`` / annotation files for evaluation.
        finite_check_every: steps between checks that the training loss and the weights
            are finite and the loss has not exploded (a :class:`DivergenceError` stops the
            run); None: every step on the CPU, every 100 steps on an accelerator, where a
            check is a host-device sync (the flags stay on the device in between). Also
            checked at each epoch end.
        explosion_factor: the run stops when a training loss exceeds this times the mean
            loss of the run's first epoch (checked from the second epoch on; None: never).
            A loss a million times its start has diverged even while it is finite.
        net: an already built :class:`PINet` to use (e.g. a loaded checkpoint's); its config
            then replaces ``network`` (the codec must have its layout and convention).
    """

    def __init__(
        self,
        codec: PINetCodec | Mapping[str, Any] | None = None,
        network: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = SCHEDULER_DEFAULTS,
        decode: Mapping[str, Any] | None = None,
        channels_last: bool | str = "auto",
        compile: bool | str = "auto",
        compile_options: Mapping[str, Any] | None = None,
        eval_protocol: str | None = None,
        val_annotation_file: str | None = None,
        test_annotation_file: str | None = None,
        finite_check_every: int | None = None,
        explosion_factor: float | None = 1e6,
        net: PINet | None = None,
    ) -> None:
        super().__init__()
        self.codec = PINetCodec.from_any(codec)
        if net is not None:  # an already built network (pinet-eval): its own config
            network = net.config
        given = _plain(network) if network is not None else {}
        network = _merge("network", NETWORK_DEFAULTS, network, strict=False)
        network.pop("layout", None)  # the codec's
        if "convention" not in given:  # the codec's too, unless the network states its own
            network["convention"] = self.codec.convention
        loss = _merge("loss", LOSS_DEFAULTS, loss)
        optimizer = _merge("optimizer", OPTIMIZER_DEFAULTS, optimizer)
        if scheduler is not None:
            scheduler = _merge("scheduler", SCHEDULER_DEFAULTS, scheduler)
        decode = _merge("decode", DECODE_DEFAULTS, decode, strict=False)
        self.save_hyperparameters({
            "codec": self.codec.to_dict(), "network": network, "loss": loss,
            "optimizer": optimizer, "scheduler": scheduler, "decode": decode,
            "channels_last": _plain(channels_last), "compile": _plain(compile),
            "compile_options": _plain(compile_options) if compile_options else None,
            "eval_protocol": eval_protocol,
            "val_annotation_file": None if val_annotation_file is None
            else str(val_annotation_file),
            "test_annotation_file": None if test_annotation_file is None
            else str(test_annotation_file),
        })
        self.layout = self.codec.layout
        self.net = net if net is not None else PINet(self.layout, **network)
        self.codec.check_network(self.net)
        if self.net.layout.num_keypoints != self.layout.num_keypoints:
            raise ValueError(f"the network has {self.net.layout.num_keypoints} keypoints but the "
                             f"codec's layout '{self.layout.name}' has "
                             f"{self.layout.num_keypoints}: set layout= to the network's")
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
        if explosion_factor is not None and not float(explosion_factor) > 1:
            raise ValueError(f"explosion_factor must be > 1 or null, got {explosion_factor}")
        self.explosion_factor = None if explosion_factor is None else float(explosion_factor)
        self._nonfinite: Tensor | None = None  # per loss term: seen non-finite since the check
        self._peak: Tensor | None = None  # the largest step loss since the check (device)
        self._unchecked_from: int | None = None  # first step not yet checked
        self._last_step: int | None = None  # the last step trained
        self._updated_since_check = False  # an optimizer step since the weights were checked
        self._loss_keys: list[str] = []
        # the mean loss of the run's first epoch (the explosion rule's reference): summed on
        # the device during that epoch, read once at its end, carried in the checkpoints
        self._first_epoch_sum: Tensor | None = None
        self._first_epoch_steps = 0
        self.loss_reference: float | None = None

    # ------------------------------------------------------------------ setup
    def _target_device(self) -> torch.device:
        trainer = self._trainer
        if trainer is not None:
            return trainer.strategy.root_device
        return self.device

    def setup(self, stage: str) -> None:
        """The data must be encoded in the frame the network decodes in: a data module with
        another codec would train or evaluate at shifted or rescaled targets."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        theirs = getattr(datamodule, "codec", None)
        if isinstance(theirs, PINetCodec):
            check_same_frame(theirs, self.codec)

    def configure_model(self) -> None:
        """Apply the speed switches once the trainer's device is known."""
        device = self._target_device()
        if not self._channels_last and resolve_switch(self.hparams.channels_last, device,
                                                      "channels_last"):
            self.net.to(memory_format=torch.channels_last)
            self._channels_last = True
        if not self._compiled and resolve_switch(self.hparams.compile, device, "compile"):
            # Kept off the module tree (object.__setattr__): state dict keys stay "net.*".
            options = dict(self.hparams.get("compile_options") or {})
            object.__setattr__(self, "_train_forward", torch.compile(self.net, **options))
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
        """Accumulate an on-device "non-finite" flag per loss term and the largest loss;
        check them every :meth:`_check_interval` steps (at the last, before that step's
        optimizer update)."""
        self._loss_keys = list(losses)
        flags = torch.stack([~torch.isfinite(v.detach()).all() for v in losses.values()])
        self._nonfinite = flags if self._nonfinite is None else self._nonfinite | flags
        loss = losses["loss"].detach().float()
        self._peak = loss if self._peak is None else torch.maximum(self._peak, loss)
        if self.loss_reference is None:  # the first epoch: its mean becomes the reference
            self._first_epoch_sum = (loss if self._first_epoch_sum is None
                                     else self._first_epoch_sum + loss)
            self._first_epoch_steps += 1
        self._last_step = int(self.global_step)
        if self._unchecked_from is None:
            self._unchecked_from = int(self.global_step)
        if int(self.global_step) + 1 - self._unchecked_from >= self._check_interval():
            self._check_finite()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # this step's optimizer update came after its check: the next check covers it
        self._updated_since_check = True

    def _weights_not_finite(self) -> Tensor:
        """On the device: whether a parameter or floating buffer (batch-norm statistics)
        holds a NaN or an infinity (no host sync)."""
        flags = [~torch.isfinite(t).all() for t in (*self.net.parameters(), *self.net.buffers())
                 if t.is_floating_point()]
        return torch.stack(flags).any() if flags else torch.zeros((), dtype=torch.bool)

    def _exploded_by(self, peak: Tensor | None, device: torch.device) -> Tensor:
        """On the device, (1,): whether ``peak``, the largest loss since the check, exceeds
        ``explosion_factor`` x the first epoch's mean."""
        if self.explosion_factor is None or self.loss_reference is None or peak is None:
            return torch.zeros(1, dtype=torch.bool, device=device)
        return (peak > self.explosion_factor * self.loss_reference).reshape(1).to(device)

    def check_divergence(self) -> None:
        """Raise :class:`DivergenceError` when, since the last check, a training loss was NaN
        or infinite (:class:`NonFiniteLossError`), a weight or batch-norm statistic became NaN
        or infinite, or a loss exceeded ``explosion_factor`` x the first epoch's mean. One
        host sync; the flags are summed over DDP ranks, so every rank raises alike. Nothing
        to do (no sync) when no step was trained since the last check."""
        self._check_finite()

    def _check_finite(self) -> None:
        if self._nonfinite is None and not self._updated_since_check:
            return
        weights = self._weights_not_finite()
        loss_flags, first, peak = self._nonfinite, self._unchecked_from, self._peak
        if loss_flags is None:  # only the weights changed since the last check
            loss_flags = torch.zeros(len(self._loss_keys), dtype=torch.bool,
                                     device=weights.device)
        self._nonfinite, self._unchecked_from, self._peak = None, None, None
        self._updated_since_check = False
        device = loss_flags.device
        flags = torch.cat([loss_flags, weights.to(device)[None], self._exploded_by(peak, device)])
        trainer = self._trainer  # None: a step run by hand (scripts/bench_train.py)
        if trainer is not None and trainer.world_size > 1:
            flags = trainer.strategy.reduce(flags.float(), reduce_op="sum")
        bad = flags.detach().cpu().numpy() > 0  # the one host sync of the window
        if not bad.any():
            return
        last = int(self.global_step) if self._last_step is None else self._last_step
        where = (f"after step {last}" if first is None else f"at step {last}" if first == last
                 else f"between steps {first} and {last}") + f" (epoch {self.current_epoch})"
        terms = [n for n, b in zip(self._loss_keys, bad[:-2], strict=True) if b]
        if terms:
            raise NonFiniteLossError(
                f"the training loss became NaN or infinite ({', '.join(terms)}) {where}: "
                f"training diverged and was stopped. {_DIVERGED_FIX}")
        if bad[-2]:
            names = [name for name, t in (*self.net.named_parameters(),
                                          *self.net.named_buffers())
                     if t.is_floating_point() and not bool(torch.isfinite(t).all())]
            shown = ", ".join(f"net.{n}" for n in names[:3]) or "on another rank"
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise DivergenceError(
                f"the weights became NaN or infinite {where} ({shown}{more}) while the loss "
                f"stayed finite: training diverged and was stopped. {_DIVERGED_FIX}")
        top = float(peak.max()) if peak is not None else float("nan")
        raise DivergenceError(
            f"the training loss exploded {where}: it reached {top:.3g}, over "
            f"{self.explosion_factor:g} x the mean loss of the run's first epoch "
            f"({self.loss_reference:.3g}; model.explosion_factor sets the factor, null turns "
            f"the rule off): training diverged and was stopped. {_DIVERGED_FIX}")

    def on_train_epoch_end(self) -> None:
        if ((self._nonfinite is not None or self._updated_since_check)
                and self.trainer.world_size > 1):
            # rank 0's progress bar has already reduced the epoch metrics (lazily, on first
            # read); read them on every rank first so that the collectives pair up
            _ = self.trainer.callback_metrics
        self._check_finite()  # before the epoch's last.ckpt is written
        if self.loss_reference is None and self._first_epoch_steps:
            mean = float(self._first_epoch_sum) / self._first_epoch_steps  # once a run
            if math.isfinite(mean) and mean > 0:
                self.loss_reference = mean
            self._first_epoch_sum, self._first_epoch_steps = None, 0

    def on_validation_epoch_start(self) -> None:
        self._check_finite()  # during fit: do not evaluate diverged weights
        self._eval_results = {}

    def configure_optimizers(self) -> dict[str, Any]:
        """The optimizer and scheduler nodes (default Adam + MultiStepLR, algorithm.md 4, 6),
        the scheduler stepped per epoch; clipping: Trainer.gradient_clip_val."""
        optimizer = instantiate(self.hparams.optimizer, _convert_="all")(self.parameters())
        if self.hparams.scheduler is None:
            return {"optimizer": optimizer}
        scheduler = instantiate(self.hparams.scheduler, _convert_="all")(optimizer)
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
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        reference = checkpoint.get("loss_reference")  # a resumed run keeps its explosion rule
        if reference is not None:
            self.loss_reference = float(reference)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["loss_reference"] = self.loss_reference
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
