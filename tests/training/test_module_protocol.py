"""Which ground truth and protocol PINetModule evaluates with (``PINetModule.evaluator``):
the data module's evaluator, unless the module was given an annotation file; then the
module's protocol, else the data module's, else crowdpose for the CrowdPose layout and coco
for any other. ``evaluator`` reads only ``hparams``, ``_trainer`` and ``layout``: it runs
here on stand-ins, without building a network."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pinet_lightning.codec.codec import PINetCodec
from pinet_lightning.core.layouts import get_layout
from pinet_lightning.training.module import (
    PINetModule,
    check_same_frame,
)


def _evaluator(layout: str, stage: str = "val", datamodule=None, **hparams):
    module = SimpleNamespace(
        hparams={"eval_protocol": None, "val_annotation_file": "gt.json",
                 "test_annotation_file": None, **hparams},
        _trainer=None if datamodule is None else SimpleNamespace(datamodule=datamodule),
        layout=get_layout(layout))
    return PINetModule.evaluator(module, stage)


def _source(*args, **kwargs) -> tuple[str, str]:
    ev = _evaluator(*args, **kwargs)
    return ev.annotation_file, ev.protocol


@pytest.mark.parametrize(("layout", "protocol"),
                         [("crowdpose", "crowdpose"), ("coco", "coco"), ("ochuman", "coco")])
def test_protocol_falls_back_to_the_layout(layout, protocol):
    assert _source(layout) == ("gt.json", protocol)
    # A data module that names no protocol (and has no evaluator) changes nothing.
    assert _source(layout, datamodule=SimpleNamespace()) == ("gt.json", protocol)
    assert _evaluator(layout).sigmas == tuple(get_layout(layout).sigmas)


def test_protocol_from_the_datamodule_then_the_module():
    dm = SimpleNamespace(protocol="coco", skip_invalid=True)
    assert _source("crowdpose", datamodule=dm) == ("gt.json", "coco")
    assert _evaluator("crowdpose", datamodule=dm).skip_invalid is True
    # The module's own settings win over the data module's.
    assert _source("coco", "test", datamodule=dm, eval_protocol="crowdpose",
                   test_annotation_file="mine.json") == ("mine.json", "crowdpose")
    # Without an annotation file of its own the module asks the data module's evaluator.
    own = SimpleNamespace(evaluator=lambda stage: ("from the data module", stage))
    assert _evaluator("coco", "test", datamodule=own) == ("from the data module", "test")


def test_missing_ground_truth_names_the_setting():
    with pytest.raises(ValueError, match="test_annotation_file"):
        _source("coco", "test")


def test_data_and_model_codecs_must_match():
    """The codec owns the output stride, the convention and the input size: a data module
    built with another codec is refused at setup, naming the setting (not a silent shift).
    A codec the network does not fit: tests/codec/test_codec.py (``check_network``)."""

    ours = PINetCodec("crowdpose", input_size=128)
    check_same_frame(ours, PINetCodec("crowdpose", input_size=128))
    with pytest.raises(ValueError, match=r"differs from the model's in \['input_size'\]"):
        check_same_frame(PINetCodec("crowdpose", input_size=256), ours)
    with pytest.raises(ValueError, match=r"\['convention'\].*'published'"):
        check_same_frame(PINetCodec("crowdpose", input_size=128, convention="published"), ours)
