"""The top-level API: every exported name resolves, importing stays light, and the
documented no-Hydra flow (build -> save -> load -> predict) works from `pinet_lightning`."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import pinet_lightning
from pinet_lightning import PINet, Predictor, get_layout, load_model, save_model


def test_every_exported_name_resolves():
    for name in pinet_lightning.__all__:
        obj = getattr(pinet_lightning, name)
        assert obj is not None, name
        if name != "__version__":
            assert obj.__module__.startswith("pinet_lightning."), (name, obj.__module__)
    assert set(pinet_lightning.__all__) <= set(dir(pinet_lightning))


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'NotAThing'"):
        pinet_lightning.NotAThing  # noqa: B018


def test_import_does_not_load_torch():
    code = "import sys, pinet_lightning; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_build_save_load_predict_without_hydra(tmp_path):
    layout = get_layout("crowdpose")
    net = PINet(layout, backbone="hrnet_w18_small")
    path = tmp_path / "model.pt"
    save_model(path, net, extra={"decode": {"flip_test": False}})
    reloaded = load_model(path)
    for (ka, va), (kb, vb) in zip(net.state_dict().items(), reloaded.state_dict().items(),
                                  strict=True):
        assert ka == kb and np.array_equal(va.numpy(), vb.numpy()), ka

    predictor = Predictor.from_checkpoint(path, device="cpu", input_size=128)
    assert predictor.decode_cfg.flip_test is False
    image = np.random.default_rng(0).integers(0, 255, (100, 140, 3), dtype=np.uint8)
    single = predictor(image)
    batch = predictor([image, image])
    assert isinstance(single, list) and len(batch) == 2
    for person in single:
        assert person.keypoints.shape == (layout.num_keypoints, 3)
    # the same image decodes the same, alone or in a batch
    assert len(batch[0]) == len(single) == len(batch[1])
    for a, b in zip(single, batch[0], strict=True):
        np.testing.assert_allclose(a.keypoints, b.keypoints, atol=1e-3)


def test_all_lists_exactly_the_lazy_exports():
    assert set(pinet_lightning.__all__) == {"__version__", *pinet_lightning._EXPORTS}
