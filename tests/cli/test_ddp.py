"""2-process CPU DDP validation equals single-process validation (gather + dedup + broadcast).

The DDP run is a small script written into tmp_path and run with subprocess (Lightning's
``ddp`` strategy re-launches the running script, which must not be pytest). The validation
set has an odd number of images, so the DistributedSampler pads a duplicate that the module
must drop. Two models are validated in each run, from the same initial weights:

- an "oracle" module predicting jittered ground truth (deterministic per image): non-trivial
  AP, which duplicates would lower;
- the real network with its heads nudged so it proposes poses: the gathered results file
  must be identical.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pinet_lightning.training.module import PINetModule

SCRIPT = textwrap.dedent('''
    import json
    import sys

    import numpy as np
    import pytorch_lightning as pl
    import torch

    from pinet_lightning.data.datamodule import PINetDataModule
    from pinet_lightning.training.module import PINetModule

    torch.set_num_threads(1)
    images, ann, init, devices, out_dir = sys.argv[1:6]
    devices = int(devices)
    GT = json.load(open(ann))

    class Oracle(PINetModule):
        """Jittered ground truth plus a false positive, seeded by the image id."""

        def _predict_batch(self, batch):
            out = {}
            for image_id in batch["image_id"]:
                image_id = int(image_id)
                rng = np.random.default_rng(image_id)
                res = []
                for a in GT["annotations"]:
                    if a["image_id"] != image_id or a["num_keypoints"] == 0:
                        continue
                    kp = np.asarray(a["keypoints"], dtype=float).reshape(-1, 3)
                    kp[:, :2] += rng.normal(0, 4.0, size=(len(kp), 2))
                    kp[:, 2] = 1.0
                    res.append({"image_id": image_id, "category_id": 1,
                                "keypoints": kp.ravel().tolist(),
                                "score": float(rng.uniform(0.2, 1.0))})
                    fp = kp.copy()
                    fp[:, :2] += 40.0
                    res.append({"image_id": image_id, "category_id": 1,
                                "keypoints": fp.ravel().tolist(),
                                "score": float(rng.uniform(0.5, 1.0))})
                out[image_id] = res
            return out

    blob = torch.load(init, map_location="cpu", weights_only=False)
    split = {"images": images, "annotations": ann}
    results = {}
    for name, cls in (("oracle", Oracle), ("net", PINetModule)):
        module = cls(**blob["hparams"])
        module.load_state_dict(blob["state_dict"])
        dm = PINetDataModule(codec={"layout": "crowdpose", "input_size": 128},
                             protocol="crowdpose", val=split, eval_batch_size=1, num_workers=0,
                             pin_memory=False, persistent_workers=False)
        trainer = pl.Trainer(accelerator="cpu", devices=devices,
                             strategy="ddp" if devices > 1 else "auto", logger=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, default_root_dir=f"{out_dir}/{name}")
        (metrics,) = trainer.validate(module, datamodule=dm, verbose=False)
        results[name] = {"metrics": metrics, "world_size": trainer.world_size,
                         "local_images": len(trainer.val_dataloaders.sampler)}
    if trainer.is_global_zero:
        json.dump(results, open(f"{out_dir}/metrics.json", "w"))
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(script: Path, args: list[str], out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "OMP_NUM_THREADS": "1"}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(script), *args, str(out_dir)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "It is recommended to use" not in proc.stderr  # no sync_dist warning on val/*
    return json.loads((out_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_ddp_validation_equals_single_process(synthetic_crowd, tmp_path):
    images, ann = synthetic_crowd
    # An odd number of validation images: the sampler pads one duplicate on rank 1.
    data = json.loads(Path(ann).read_text())
    keep = sorted(img["id"] for img in data["images"])[:7]
    data["images"] = [img for img in data["images"] if img["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    val_json = tmp_path / "val7.json"
    val_json.write_text(json.dumps(data))

    torch.manual_seed(0)
    hparams = {"codec": {"layout": "crowdpose", "input_size": 128},
               "network": {"backbone": "hrnet_w18_small", "refine_layers": 1},
               "decode": {"top_k": 10}, "eval_protocol": "crowdpose",
               "val_annotation_file": str(val_json)}
    module = PINetModule(**hparams)
    with torch.no_grad():  # nudge the heads so the random network proposes poses
        heads = module.net.heads
        heads.part_heatmap.weight.normal_(0, 0.01)
        heads.part_heatmap.bias.fill_(0.3)
        heads.heatmap.bias.fill_(0.3)
        heads.offset.weight.normal_(0, 0.02)
    init = tmp_path / "init.pt"
    torch.save({"hparams": hparams, "state_dict": module.state_dict()}, init)

    script = tmp_path / "validate.py"
    script.write_text(SCRIPT)
    args = [str(images), str(val_json), str(init)]
    single = _run(script, [*args, "1"], tmp_path / "single")
    ddp = _run(script, [*args, "2"], tmp_path / "ddp")

    assert single["oracle"]["world_size"] == 1 and ddp["oracle"]["world_size"] == 2
    assert single["oracle"]["local_images"] == 7
    assert ddp["oracle"]["local_images"] == 4  # 2 x 4 = 8: one image is padded in twice
    for name in ("oracle", "net"):
        s, d = single[name]["metrics"], ddp[name]["metrics"]
        assert s["val/images"] == d["val/images"] == 7, name  # the padded copy was dropped
        assert set(s) == set(d)
        for key in s:
            assert d[key] == pytest.approx(s[key], abs=1e-9), (name, key)
    oracle = single["oracle"]["metrics"]
    assert 0.05 < oracle["val/AP"] < 0.999  # non-trivial, so a duplicate would show
    assert single["net"]["metrics"]["val/poses"] > 0
    # the gathered results of the real network are identical
    for name in ("oracle", "net"):
        a = json.loads((tmp_path / "single" / name / "results" / "val_epoch0.json").read_text())
        b = json.loads((tmp_path / "ddp" / name / "results" / "val_epoch0.json").read_text())
        assert a == b, name
