"""The third-party warnings the commands hide: narrowly, by module, category and message."""

from __future__ import annotations

import warnings

__all__ = ["QUIET_WARNINGS", "quiet_third_party_warnings"]

# Warnings raised inside third-party code that a user of the commands cannot act on, each
# matched by the module that raises it, its category AND its message, so that nothing else
# is hidden (ours never: no entry names a pinet_lightning module).
QUIET_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # Lightning 2.6 builds torch's LeafSpec, deprecated in torch 2.10+, on every batch transfer
    (r"pytorch_lightning\.utilities\._pytree$", FutureWarning,
     r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
)


def quiet_third_party_warnings() -> None:
    """Ignore the :data:`QUIET_WARNINGS` (module, category and message must all match)."""
    for module, category, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
