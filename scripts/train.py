"""Train PINet (same as the `pinet-train` console command): `python scripts/train.py [overrides]`.

Hydra overrides, `-m` sweeps and `--help` work as with the console command; the configs are
the packaged `conf/` tree.
"""

import pinet_lightning.cli  # noqa: F401  (before torch: sets OMP_WAIT_POLICY, resolvers)
from pinet_lightning.cli.train import main

if __name__ == "__main__":
    main()
