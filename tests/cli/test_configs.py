"""The Hydra config tree composes for every option, carries the defaults of docs/algorithm.md,
and its ``_target_`` nodes instantiate."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pinet_lightning.conf
import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tiny_run import compose_config

import pinet_lightning.cli
from pinet_lightning.cli import auto_precision
from pinet_lightning.cli.config import (
    check_trainer_settings,
    config_dir,
    instantiate_group,
    moved_settings,
)
from pinet_lightning.cli.ddp import ConfigScriptLauncher, HydraDDPStrategy, install_launcher
from pinet_lightning.core.layouts import get_layout
from pinet_lightning.data.datamodule import DATASET_DEFAULT
from pinet_lightning.inference.decoding import DecodeConfig
from pinet_lightning.training.callbacks import (
    LastCheckpoint,
    LearningCurve,
    ModelExport,
    PredictionFigure,
)
from pinet_lightning.training.module import OPTIMIZER_DEFAULTS, SCHEDULER_DEFAULTS

CONF = config_dir()


def _options(group: str) -> list[str]:
    """The selectable options of a config group (``_base``-style files are shared parts)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


def _compose(name: str, overrides: list[str], tmp_path: Path):
    cfg = compose_config(tmp_path, [f"paths.output_dir={tmp_path}", *overrides], name)
    OmegaConf.resolve(cfg)  # every interpolation must resolve
    return cfg


def test_config_dir_is_the_package_folder():
    assert CONF == Path(pinet_lightning.conf.__file__).resolve().parent
    for name in ("train.yaml", "eval.yaml", "predict.yaml"):
        assert (CONF / name).is_file()
    for group in ("data", "layout", "model", "trainer", "logger", "callbacks", "experiment",
                  "paths", "hydra", "decode"):
        assert _options(group), group


def test_default_train_config_is_the_synthetic_main_job(tmp_path):
    cfg = _compose("train", [], tmp_path)
    assert cfg.task_name == "synthetic"
    assert cfg.data.synthetic is not None
    assert cfg.data.synthetic.root == f"{tmp_path}/data/synthetic"
    assert cfg.model.network.backbone == "hrnet_w18_small"
    assert cfg.trainer.accelerator == "auto"
    assert cfg.callbacks.model_checkpoint.monitor == "val/AP"
    assert cfg.callbacks.model_checkpoint.mode == "max"
    assert cfg.callbacks.model_checkpoint.save_last is False  # last.ckpt: last_checkpoint
    assert cfg.callbacks.last_checkpoint.filename == "last"
    assert cfg.reported_checkpoint == "last"  # as published (issue 9 point 9)
    assert cfg.data.skip_invalid is False
    assert list(cfg.logger) == ["csv"]
    assert cfg.resume == "auto" and cfg.ckpt_path is None


def test_spec_defaults(tmp_path):
    """The constants of docs/algorithm.md are fields with its values (the w32 recipe, base data)."""
    cfg = _compose("train", ["experiment=crowdpose_w32_512"], tmp_path)
    t = cfg.codec.targets
    assert (t.sigma, t.radius, t.bg_weight, t.min_part_area) == (2.0, 2, 0.1, 0.0)
    assert (t.window_sigmas, t.part_center_in_map) == (3.0, False)
    a = cfg.data.augmentation
    assert (a.max_rotation, a.min_scale, a.max_scale, a.max_translate, a.flip_prob) == (
        30.0, 0.75, 1.5, 0.2, 0.5)
    assert a.ignore_padding is True
    assert (cfg.data.people.ignore_regions, cfg.data.people.min_image_keypoints) == (False, None)
    assert cfg.codec.input_size == 512 and cfg.codec.output_stride == 4
    assert cfg.codec.convention == "cell_center" and cfg.codec.sparse is True
    assert cfg.data.codec == cfg.model.codec == cfg.codec  # one node, interpolated
    loss = cfg.model.loss
    assert (loss.heatmap_weight, loss.offset_weight, loss.refine_weight) == (1.0, 0.03, 0.03)
    assert loss.beta == pytest.approx(1 / 9)
    assert loss.proposals_per_part == 40 and loss.proposals_at_empty_cells is True
    d = cfg.model.decode
    assert (d.top_k, d.score_threshold, d.oks_threshold, d.flip_test) == (30, 0.01, 0.7, True)
    assert (d.nms_large_size, d.nms_medium_size, list(d.scales)) == (300.0, 200.0, [1.0])
    assert list(d.nms_kernels) == [7, 5, 3]
    assert cfg.model.optimizer.lr == 0.001 and cfg.model.scheduler.gamma == 0.1
    assert cfg.model.optimizer._target_ == "torch.optim.Adam"
    assert cfg.model.scheduler._target_ == "torch.optim.lr_scheduler.MultiStepLR"
    assert cfg.model.network.backbone == "hrnet_w32"
    assert cfg.model.network.head_init_std == 0.001


@pytest.mark.parametrize("experiment,expected", [
    ("crowdpose_w32_512", dict(epochs=300, milestones=[200, 260], batch=20, refine=3,
                               min_part_area=0.0, layout="crowdpose", protocol="crowdpose",
                               ignore_regions=False, min_image_keypoints=None)),
    ("coco_w32_512", dict(epochs=140, milestones=[90, 120], batch=20, refine=2,
                          min_part_area=1024.0, layout="coco", protocol="coco",
                          ignore_regions=True, min_image_keypoints=10)),
    # the published experiments/ochuman.yaml: 3 refine layers, and the 32^2 part-area rule
    # of lib/dataset/dataset.py (every dataset but CrowdPose)
    ("ochuman_w32_512", dict(epochs=140, milestones=[90, 120], batch=10, refine=3,
                             min_part_area=1024.0, layout="ochuman", protocol="coco",
                             ignore_regions=False, min_image_keypoints=None)),
])
def test_recipes(tmp_path, experiment, expected, monkeypatch):

    # on a bf16 GPU (where the trainer group's default would pick bf16-mixed)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cfg = _compose("train", [f"experiment={experiment}"], tmp_path)
    assert cfg.trainer.max_epochs == expected["epochs"]
    assert list(cfg.model.scheduler.milestones) == expected["milestones"]
    assert cfg.data.batch_size == expected["batch"]
    assert cfg.trainer.devices == 2
    assert cfg.model.network.refine_layers == expected["refine"]
    assert cfg.codec.targets.min_part_area == expected["min_part_area"]
    assert cfg.data.people.ignore_regions == expected["ignore_regions"]
    assert cfg.data.people.min_image_keypoints == expected["min_image_keypoints"]
    assert cfg.layout.name == expected["layout"] and cfg.data.protocol == expected["protocol"]
    assert cfg.codec.input_size == 512 and cfg.model.optimizer.lr == 0.001
    assert cfg.trainer.strategy._target_ == "pinet_lightning.cli.ddp.HydraDDPStrategy"
    assert cfg.task_name == experiment
    # the published recipe: the ImageNet HRNet-W32, float32 training
    assert cfg.model.network.pretrained == "imagenet" and cfg.model.network.backbone == "hrnet_w32"
    assert cfg.trainer.precision == "32-true"
    bf16 = _compose("train", [f"experiment={experiment}", "trainer.precision=bf16-mixed",
                              "model.network.pretrained=/w/hrnet_w32.pth"], tmp_path)
    assert bf16.trainer.precision == "bf16-mixed"
    assert bf16.model.network.pretrained == "/w/hrnet_w32.pth"


@pytest.mark.parametrize("experiment", ["synthetic", "synthetic_long"])
def test_the_synthetic_model_starts_from_random_weights(tmp_path, experiment):
    cfg = _compose("train", [f"experiment={experiment}"], tmp_path)
    assert cfg.model.network.pretrained is None


def test_ochuman_trains_on_val_and_tests_on_test(tmp_path):
    cfg = _compose("train", ["experiment=ochuman_w32_512", "paths.data_dir=/d"], tmp_path)
    assert "_val_" in cfg.data.train.annotations
    assert "_test_" in cfg.data.val.annotations and "_test_" in cfg.data.test.annotations


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes(tmp_path, experiment):
    cfg = _compose("train", [f"experiment={experiment}"], tmp_path)
    assert cfg.data._target_ == "pinet_lightning.data.datamodule.PINetDataModule"
    assert cfg.model._target_ == "pinet_lightning.training.module.PINetModule"
    assert get_layout(cfg.layout).num_keypoints == len(cfg.layout.sigmas)


@pytest.mark.parametrize("name", _options("layout"))
def test_layouts_are_data(tmp_path, name):
    cfg = _compose("train", [f"layout={name}"], tmp_path)
    layout = get_layout(OmegaConf.to_container(cfg.layout))
    if name in ("coco", "crowdpose", "ochuman"):
        assert layout == get_layout(name)  # the yaml is the full built-in layout
    else:
        assert layout.num_keypoints == len(cfg.layout.names)
        assert layout.flip_index == tuple(cfg.layout.flip_index)
    # the codec holds it, and model and data receive the same codec
    assert cfg.codec.layout == cfg.layout
    assert cfg.model.codec == cfg.codec and cfg.data.codec == cfg.codec


@pytest.mark.parametrize("data", _options("data"))
def test_data_options_instantiate(tmp_path, data):
    layout = "coco" if data in ("coco", "ochuman") else "crowdpose"
    overrides = [f"data={data}", f"layout={layout}"]
    if data == "custom":
        overrides += ["data.train.images=/x", "data.train.annotations=/x/t.json",
                      "data.val.images=/x", "data.val.annotations=/x/v.json"]
    cfg = _compose("train", overrides, tmp_path)
    dm = instantiate(cfg.data, _convert_="all")
    assert dm.layout.name == layout
    assert dm.protocol == cfg.data.protocol
    assert dm.test_annotation_file is not None
    # data=coco / data=ochuman bring the 32^2 rule into the codec (CrowdPose: none)
    assert dm.codec.targets["min_part_area"] == (1024.0 if data in ("coco", "ochuman") else 0.0)
    coco = data == "coco"
    assert dm.people == {"ignore_regions": coco, "min_image_keypoints": 10 if coco else None}
    assert dm.augmentation["max_translate"] == 0.2 and dm.augmentation["ignore_padding"]


def test_custom_data_requires_paths(tmp_path):
    cfg = _compose("train", ["data=custom"], tmp_path)
    # test defaults to the val split, so it is missing exactly when val is
    assert OmegaConf.missing_keys(cfg.data) == {
        f"data.{split}.{key}" for split in ("train", "val", "test")
        for key in ("images", "annotations")}
    cfg = _compose("train", ["data=custom", "data.train.images=/i", "data.train.annotations=/t",
                             "data.val.images=/i", "data.val.annotations=/v",
                             "data.test.annotations=/w"], tmp_path)
    assert cfg.data.test.images == "/i" and cfg.data.test.annotations == "/w"
    assert OmegaConf.missing_keys(cfg.data) == set()


@pytest.mark.parametrize("model", _options("model"))
def test_model_options_instantiate(tmp_path, model):
    # without the experiment: the model options' own (SPEC) loss weights
    cfg = _compose("train", ["~experiment", f"model={model}", "model.network.refine_layers=1"],
                   tmp_path)
    module = instantiate(cfg.model, _convert_="all")
    assert module.net.backbone_name == cfg.model.network.backbone
    assert module.decode_cfg.top_k == 30
    assert module.hparams.loss["offset_weight"] == 0.03
    if model == "pinet_small":
        assert cfg.model.network.backbone == "hrnet_w18_small"


@pytest.mark.parametrize("trainer", _options("trainer"))
def test_trainer_options_compose(tmp_path, trainer):
    cfg = _compose("train", [f"trainer={trainer}"], tmp_path)
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
    check_trainer_settings(cfg.trainer)  # every value of the right type for Lightning
    assert cfg.trainer.default_root_dir == str(tmp_path)
    if trainer.startswith("ddp"):
        assert cfg.trainer.devices == 2


def test_ddp_cpu_trainer_uses_our_launcher(tmp_path):
    cfg = _compose("train", ["trainer=ddp_cpu"], tmp_path)
    trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, _convert_="all")
    assert isinstance(trainer.strategy, HydraDDPStrategy)
    assert type(trainer.strategy._launcher) is ConfigScriptLauncher
    assert trainer.strategy.process_group_backend == "gloo"
    assert trainer.num_devices == 2


def test_plain_ddp_strategy_gets_our_launcher(tmp_path):
    cfg = _compose("train", ["trainer=cpu", "trainer.devices=2", "trainer.strategy=ddp"],
                   tmp_path)
    trainer = instantiate(cfg.trainer, logger=False, _convert_="all")
    assert install_launcher(trainer) is True
    assert type(trainer.strategy._launcher) is ConfigScriptLauncher
    assert install_launcher(trainer) is False  # already ours


@pytest.mark.parametrize("logger", _options("logger"))
def test_logger_options_instantiate(tmp_path, logger):
    cfg = _compose("train", [f"logger={logger}"], tmp_path)
    (lg,) = instantiate_group(cfg.logger)
    assert type(lg).__name__.lower().startswith(logger[:3])
    if logger == "wandb":
        assert cfg.logger.wandb.offline is True


def test_several_loggers_at_once(tmp_path):
    cfg = _compose("train", ["logger=[csv,tensorboard,wandb]"], tmp_path)
    assert sorted(cfg.logger) == ["csv", "tensorboard", "wandb"]


def test_callbacks_instantiate(tmp_path):
    cfg = _compose("train", [], tmp_path)
    callbacks = instantiate_group(cfg.callbacks)
    types = {type(c) for c in callbacks}
    assert pl.callbacks.ModelCheckpoint in types
    assert pl.callbacks.LearningRateMonitor in types
    assert pl.callbacks.RichProgressBar in types and pl.callbacks.RichModelSummary in types
    ckpt = next(c for c in callbacks if isinstance(c, pl.callbacks.ModelCheckpoint))
    assert Path(ckpt.dirpath) == tmp_path / "checkpoints"

    last = next(c for c in callbacks if isinstance(c, LastCheckpoint))
    assert last.path == tmp_path / "checkpoints" / "last.ckpt"

    by_type = {type(c): c for c in callbacks}
    assert by_type[ModelExport].path == tmp_path / "checkpoints" / "model.pt"
    assert by_type[PredictionFigure].path == tmp_path / "predictions.png"
    assert by_type[PredictionFigure].num_images == 4
    assert by_type[LearningCurve].path == tmp_path / "learning_curve.png"
    assert instantiate_group(_compose("train", ["callbacks=none"], tmp_path).get("callbacks")) \
        == []


def test_decode_group_matches_decode_config(tmp_path):
    cfg = _compose("predict", ["ckpt_path=x.ckpt", "input=y"], tmp_path)
    decode = DecodeConfig.from_any(OmegaConf.to_container(cfg.decode))
    assert decode == DecodeConfig()  # the yaml holds exactly DecodeConfig's defaults


def test_eval_and_predict_configs(tmp_path):
    cfg = _compose("eval", ["ckpt_path=x.ckpt"], tmp_path)
    assert cfg.split == "test" and cfg.data is None and cfg.ckpt_path == "x.ckpt"
    cfg = _compose("eval", ["ckpt_path=x.ckpt", "data=crowdpose", "paths.data_dir=/d"],
                   tmp_path)
    assert cfg.data.test.annotations == "/d/crowdpose/json/crowdpose_test.json"
    cfg = _compose("predict", ["ckpt_path=x.ckpt", "input=y", "output_dir=/o"], tmp_path)
    assert cfg.output_dir == "/o" and cfg.input_size is None


def test_run_dir_resolver():
    cfg = OmegaConf.create({"run_dir": None, "d": "${pinet_or:${run_dir},fallback}"})
    assert cfg.d == "fallback"
    cfg.run_dir = "/runs/x"
    assert cfg.d == "/runs/x"


def test_precision_is_bf16_only_on_a_bf16_gpu(tmp_path, monkeypatch):
    cfg = _compose("train", ["trainer=cpu"], tmp_path)
    assert cfg.trainer.precision == "32-true"
    cfg = _compose("train", ["trainer.precision=16-mixed"], tmp_path)
    assert cfg.trainer.precision == "16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert auto_precision("auto") == auto_precision("gpu") == "bf16-mixed"
    assert auto_precision("cpu") == "32-true"
    assert _compose("train", ["trainer=gpu"], tmp_path).trainer.precision == "bf16-mixed"
    assert _compose("train", ["trainer=ddp_cpu"], tmp_path).trainer.precision == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. V100
    assert auto_precision("gpu") == "32-true"


def _signature_defaults(obj) -> dict:
    return {name: p.default for name, p in inspect.signature(obj).parameters.items()
            if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("group,owner", [
    ("model.loss", "pinet_lightning.training.losses:PINetLoss"),
    ("codec.targets", "pinet_lightning.codec.targets:PINetTargetCodec"),
    ("codec", "pinet_lightning.codec.codec:PINetCodec"),
    ("data.augmentation", "pinet_lightning.data.augmentation:TrainAugmentation"),
    ("data", "pinet_lightning.data.datamodule:PINetDataModule"),
])
def test_config_defaults_mirror_the_code_signatures(tmp_path, group, owner):
    """Each default is stated once in code (a signature) and mirrored by its Hydra field: the
    paper recipe's config (no experiment overrides) holds exactly the signature's values."""

    module, name = owner.split(":")
    defaults = _signature_defaults(getattr(importlib.import_module(module), name))
    cfg = _compose("train", ["experiment=crowdpose_w32_512"], tmp_path)
    node = OmegaConf.select(cfg, group)
    # data: the plain scalar fields (paths, nested groups and the recipe's choices aside)
    recipe = {"layout", "protocol", "train", "val", "test", "synthetic", "targets",
              "augmentation", "people", "codec", "dataset"} if group in ("data", "codec") else set()
    compared = 0
    for key, value in defaults.items():
        if key in recipe or key not in node:
            continue
        assert node[key] == pytest.approx(value) if isinstance(value, float) else \
            node[key] == value, f"{group}.{key}: config {node[key]!r}, code {value!r}"
        compared += 1
    assert compared >= 4


def test_optimizer_scheduler_and_dataset_nodes_mirror_the_code(tmp_path):
    """The optimizer, the scheduler and the dataset class are Hydra nodes (``_target_``,
    ``_partial_``) whose defaults are the code's; the module instantiates them, and a
    checkpoint stores them as plain data."""

    cfg = _compose("train", ["experiment=crowdpose_w32_512"], tmp_path)
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert plain["model"]["optimizer"] == OPTIMIZER_DEFAULTS
    assert plain["model"]["scheduler"] == SCHEDULER_DEFAULTS
    assert plain["data"]["dataset"] == DATASET_DEFAULT
    module = instantiate(_compose("train", ["model.network.backbone=hrnet_w18_small"],
                                  tmp_path).model, _convert_="all")
    setup = module.configure_optimizers()
    assert isinstance(setup["optimizer"], torch.optim.Adam)
    assert setup["optimizer"].param_groups[0]["lr"] == 0.002  # the main job's
    assert isinstance(setup["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.MultiStepLR)
    assert module.hparams.optimizer["_target_"] == "torch.optim.Adam"


def test_moved_settings_name_the_override_that_works(tmp_path):
    """An override of a setting that moved into the codec (or the scheduler) is answered with
    the new name, and that answer composes."""

    lines = moved_settings(["data.input_size=96", "+data.targets.sigma=1.5",
                            "model.optimizer.milestones=[3]", "data.layout=coco",
                            "convention=published", "data.batch_size=2"])
    fixes = [line.rsplit("pass ", 1)[1] for line in lines]
    assert fixes == ["codec.input_size=96", "codec.targets.sigma=1.5",
                     "model.scheduler.milestones=[3]", "layout=coco",
                     "codec.convention=published"]
    cfg = _compose("train", fixes, tmp_path)
    assert cfg.codec.input_size == 96 and cfg.codec.targets.sigma == 1.5
    assert cfg.data.codec.convention == "published" and cfg.codec.layout.name == "coco"
    assert list(cfg.model.scheduler.milestones) == [3]
