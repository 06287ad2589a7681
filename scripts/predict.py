"""Poses on a folder of images or a video (same as `pinet-predict`):
`python scripts/predict.py ckpt_path=<ckpt> input=<folder | video> [output_dir=<dir>]`.

Hydra overrides, `-m` sweeps and `--help` work as with the console command; the configs are
the packaged `conf/` tree.
"""

import pinet_lightning.cli  # noqa: F401  (before torch: sets OMP_WAIT_POLICY, resolvers)
from pinet_lightning.cli.predict import main

if __name__ == "__main__":
    main()
