"""Which ground truth and protocol PINetModule evaluates with (module docstring): the
module's own settings, else the data module's, else crowdpose for the CrowdPose layout and
coco for any other. ``_eval_source`` reads only ``hparams``, ``_trainer`` and ``layout``:
it runs here on stand-ins, without building a network."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("pytorch_lightning")

from pinet_lightning.layouts import get_layout  # noqa: E402
from pinet_lightning.module import PINetModule  # noqa: E402


def _source(layout: str, stage: str = "val", datamodule=None, **hparams) -> tuple[str, str]:
    module = SimpleNamespace(
        hparams={"eval_protocol": None, "val_annotation_file": "gt.json",
                 "test_annotation_file": None, **hparams},
        _trainer=None if datamodule is None else SimpleNamespace(datamodule=datamodule),
        layout=get_layout(layout))
    return PINetModule._eval_source(module, stage)


@pytest.mark.parametrize(("layout", "protocol"),
                         [("crowdpose", "crowdpose"), ("coco", "coco"), ("ochuman", "coco")])
def test_protocol_falls_back_to_the_layout(layout, protocol):
    assert _source(layout) == ("gt.json", protocol)
    # A data module that names no protocol changes nothing.
    assert _source(layout, datamodule=SimpleNamespace()) == ("gt.json", protocol)


def test_protocol_from_the_datamodule_then_the_module():
    dm = SimpleNamespace(protocol="coco", test_annotation_file="dm_test.json")
    assert _source("crowdpose", datamodule=dm) == ("gt.json", "coco")
    assert _source("crowdpose", "test", datamodule=dm) == ("dm_test.json", "coco")
    # The module's own settings win over the data module's.
    assert _source("coco", "test", datamodule=dm, eval_protocol="crowdpose",
                   test_annotation_file="mine.json") == ("mine.json", "crowdpose")


def test_missing_ground_truth_names_the_setting():
    with pytest.raises(ValueError, match="test_annotation_file"):
        _source("coco", "test")
