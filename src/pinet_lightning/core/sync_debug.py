"""The sync debug mode: host-device syncs of a block of torch code, counted on any device.

A GPU only runs at speed while the host queues work ahead of it. Any op that needs a value
of a device tensor on the host (``.item()``, ``bool(t)``, a data-dependent output size)
makes the host wait until the device has finished everything queued before it: a sync.
``torch.cuda.set_sync_debug_mode`` finds them on a GPU only; :class:`SyncCounter` finds
them on the CPU as well, so a test without a GPU can keep the hot path free of them, and
names the op and the Python line that made each.

Counted (an event each):

- at the aten level (a ``TorchDispatchMode``, on every device, backward included):
  ``_local_scalar_dense`` (``.item()``, ``int()``/``float()``/``bool()`` of a tensor,
  ``if tensor:``), ``equal``; the ops whose output size depends on the values: ``nonzero``,
  ``masked_select``, ``unique*``, ``bincount``, ``repeat_interleave`` with tensor repeats and
  no ``output_size``, indexing with (and ``index_put`` through) a boolean mask; copies from
  an accelerator to the host (seen on a GPU only);
- at the Python level (a ``TorchFunctionMode``): ``.item()``, ``int()``, ``float()``,
  ``bool()``, ``__index__`` of a tensor (under ``torch.inference_mode`` the CPU's
  ``.item()`` never reaches the aten level), and host data placed on a device
  (``torch.tensor(data, device=...)``, ``torch.as_tensor(data, device=...)``,
  ``t.new_tensor(data)``): a blocking host-to-device copy, which PyTorch follows with a
  stream synchronize on CUDA; with ``cpu_is_device=True`` (the default: the CPU standing in
  for the GPU) also the reads that copy device memory to the host on a GPU but are no-ops on
  the CPU (``.cpu()``, ``.numpy()``, ``.tolist()``, ``np.asarray(tensor)``).

On the CPU every tensor counts as a device tensor (``cpu_is_device=True``), so
``t.cpu().numpy()`` counts twice there and once on a GPU. On a GPU pass
``cpu_is_device=False``: values read from host tensors are not syncs there.

    with SyncCounter() as syncs:
        loss = module.training_step(batch, 0)
        loss.backward()
    assert not syncs.events, syncs.report()
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SyncEvent", "SyncCounter", "sync_reason"]

aten = torch.ops.aten

# aten ops that read device values on the host, by overload packet.
_VALUE_READS: dict[Any, str] = {
    aten._local_scalar_dense: "a tensor value read on the host (.item(), int(), bool(), if t:)",
    aten.equal: "torch.equal returns a Python bool",
    aten.nonzero: "output size depends on the values",
    aten.masked_select: "output size depends on the values",
    aten.bincount: "output size depends on the values",
    aten._unique: "output size depends on the values",
    aten._unique2: "output size depends on the values",
    aten.unique_dim: "output size depends on the values",
    aten.unique_consecutive: "output size depends on the values",
    aten.unique_dim_consecutive: "output size depends on the values",
}
_INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
_COPY_OPS = {aten._to_copy, aten.copy_}

# Python-level value reads (the aten-level _local_scalar_dense they make is not counted again).
_PY_VALUE_READS = {torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__float__,
                   torch.Tensor.__bool__, torch.Tensor.__index__}
# Python-level reads that are no-ops on the CPU but device -> host copies on a GPU.
_HOST_READS = {torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.tolist,
               torch.Tensor.__array__}
# Host data placed on a device (blocking host -> device copy).
_HOST_DATA = {torch.tensor, torch.as_tensor}

_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_FILE = os.path.abspath(__file__)


def _is_mask(index: Any) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def sync_reason(func: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str | None:
    """Why the aten op ``func`` called with ``args`` / ``kwargs`` makes the host wait for the
    device, or None when it does not."""
    packet = getattr(func, "overloadpacket", func)
    if packet in _VALUE_READS:
        return _VALUE_READS[packet]
    if packet is aten.repeat_interleave:
        overload = getattr(func, "_overloadname", "")
        if overload != "self_int" and kwargs.get("output_size") is None:
            return "repeat_interleave with tensor repeats and no output_size"
        return None
    if packet in _INDEX_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(_is_mask(i) for i in indices or ()):
            return "boolean-mask indexing: output size depends on the values"
        return None
    if packet in _COPY_OPS:
        tensors = [a for a in args[:2] if isinstance(a, torch.Tensor)]
        if packet is aten._to_copy:
            target = kwargs.get("device")
            if (tensors and tensors[0].device.type != "cpu" and target is not None
                    and torch.device(target).type == "cpu"):
                return "copy from the device to the host"
        elif (len(tensors) == 2 and tensors[0].device.type == "cpu"
              and tensors[1].device.type != "cpu"):
            return "copy from the device to the host"  # copy_(dst on the host, src)
    return None


def _python_stack() -> list[str]:
    """The caller's Python frames (innermost last), torch's own and this module's dropped."""
    frames = []
    for frame in traceback.extract_stack()[:-2]:
        path = os.path.abspath(frame.filename)
        if path == _THIS_FILE or path.startswith(_TORCH_DIR):
            continue
        frames.append(f"{frame.filename}:{frame.lineno} in {frame.name}: "
                      f"{(frame.line or '').strip()}")
    return frames


@dataclass
class SyncEvent:
    """One sync: the op, why it syncs, and the Python frames that made it (innermost last)."""

    op: str
    reason: str
    stack: list[str] = field(default_factory=list)
    backward: str | None = None  # the autograd node when it ran in backward

    @property
    def where(self) -> str:
        """The innermost Python line outside torch (the line to look at)."""
        return self.stack[-1] if self.stack else "<no Python frame>"

    def __str__(self) -> str:
        during = f" during backward ({self.backward})" if self.backward else ""
        return f"{self.op}: {self.reason}{during}\n    at {self.where}"


def _on_device(args: Sequence[Any], cpu_is_device: bool) -> bool:
    """Whether a tensor among ``args`` (one level of lists too) lives on the device."""
    if cpu_is_device:
        return True
    for arg in args:
        for item in arg if isinstance(arg, (list, tuple)) else (arg,):
            if isinstance(item, torch.Tensor) and item.device.type != "cpu":
                return True
    return False


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, owner: SyncCounter) -> None:
        super().__init__()
        self._owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = sync_reason(func, args, kwargs)
        if reason is not None and _on_device(args, self._owner.cpu_is_device) and not (
                self._owner._python_read and func.overloadpacket is aten._local_scalar_dense):
            self._owner._record(str(func), reason)
        return func(*args, **kwargs)


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, owner: SyncCounter) -> None:
        super().__init__()
        self._owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        cpu_is_device = self._owner.cpu_is_device
        reason = None
        if func in _PY_VALUE_READS:
            if _on_device(args[:1], cpu_is_device):
                reason = "a tensor value read on the host (.item(), int(), bool(), if t:)"
        elif func in _HOST_READS:
            if cpu_is_device and isinstance(args[0], torch.Tensor) and (
                    args[0].device.type == "cpu"):
                reason = "a device -> host copy on a GPU (a no-op on the CPU)"
        elif func in _HOST_DATA:
            device = kwargs.get("device")
            data = args[0] if args else kwargs.get("data")
            if device is not None and not (isinstance(data, torch.Tensor)
                                           and data.device == torch.device(device)):
                if torch.device(device).type != "cpu" or cpu_is_device:
                    reason = "host data copied to the device (blocking: a stream sync on CUDA)"
        elif func is torch.Tensor.new_tensor:
            if _on_device(args[:1], cpu_is_device):
                reason = "host data copied to the device (blocking: a stream sync on CUDA)"
        if reason is not None:
            self._owner._record(getattr(func, "__qualname__", str(func)), reason)
        if func not in _PY_VALUE_READS:
            return func(*args, **kwargs)
        self._owner._python_read += 1  # its _local_scalar_dense is this same sync
        try:
            return func(*args, **kwargs)
        finally:
            self._owner._python_read -= 1


class SyncCounter:
    """Context manager recording every host-device sync of the block (see the module doc).

    Args:
        cpu_is_device: count CPU tensors as device tensors, and the host reads that only a
            GPU turns into syncs (runs on the CPU standing in for one). On a GPU pass False:
            only ops on GPU tensors count, and the aten level sees the real device -> host
            copies.
    """

    def __init__(self, cpu_is_device: bool = True) -> None:
        self.cpu_is_device = cpu_is_device
        self.events: list[SyncEvent] = []
        self._modes: list[Any] = []
        self._python_read = 0

    def _record(self, op: str, reason: str) -> None:
        node = torch._C._current_autograd_node()
        self.events.append(SyncEvent(op=op, reason=reason, stack=_python_stack(),
                                     backward=type(node).__name__ if node is not None else None))

    def __enter__(self) -> SyncCounter:
        self._modes = [_FunctionCounter(self), _DispatchCounter(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = []

    def __len__(self) -> int:
        return len(self.events)

    def report(self, frames: int = 4) -> str:
        """Every event with its op, reason and last ``frames`` Python frames."""
        if not self.events:
            return "no host-device syncs"
        lines = [f"{len(self.events)} host-device sync(s):"]
        for i, event in enumerate(self.events, 1):
            during = f" during backward ({event.backward})" if event.backward else ""
            lines.append(f"{i}. {event.op}: {event.reason}{during}")
            lines.extend(f"     {frame}" for frame in event.stack[-frames:])
        return "\n".join(lines)

    def summary(self) -> list[dict[str, Any]]:
        """The events as plain dicts (op, reason, where, backward) for a JSON report."""
        return [{"op": e.op, "reason": e.reason, "where": e.where, "backward": e.backward}
                for e in self.events]
