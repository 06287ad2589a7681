"""Output files written whole or not at all.

Every file a run hands to the user (``results.json``, ``metrics.json``, ``model.pt``, the
Lightning checkpoints) is written to a temporary file in the same folder and renamed over the
final name (:func:`os.replace`, atomic on one file system). A crash, a kill or a full disk
during the write leaves the previous file (or none), never a truncated one under the final
name; the temporary file is removed. The errors are ``OSError`` with the original ``errno``
and a message naming the final path (a full disk: ``[Errno 28] cannot write <path>: No space
left on device ...``).
"""

from __future__ import annotations

import io
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["replacing", "write_bytes", "write_text", "write_json", "save_torch", "copy_file"]


def _write(path: Path, file: IO[bytes], data: memoryview) -> None:
    """Write all of ``data`` into ``file``, the temporary file of ``path`` (one place for the
    tests to simulate a full disk)."""
    file.write(data)


def _error(path: Path, err: BaseException) -> OSError:
    """``err`` as an ``OSError`` naming ``path`` (keeping its errno)."""
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    code = err.errno if isinstance(err, OSError) else None
    fix = "; the previous file, if any, is unchanged"
    if code == 28:  # ENOSPC
        fix += ": free space on that disk or write to another folder"
    return OSError(code, f"cannot write {path}: {reason}{fix}") if code is not None else \
        OSError(f"cannot write {path}: {reason}{fix}")


@contextmanager
def replacing(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary file to write ``path``'s new content into; on a clean exit it is flushed to
    the disk and renamed to ``path``, on an error removed (``path`` untouched) and the error
    re-raised as an ``OSError`` naming ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _error(path, err) from err
    # hidden, unique (two writers never share one), in the same folder (os.replace stays a
    # rename on one file system); the mode follows the umask like any new file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as err:
        raise _error(path, err) from err
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())  # on the disk before the name points at it
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)):  # torch's writer raises RuntimeError
            raise _error(path, err) from err
        raise


def write_bytes(path: str | Path, data: bytes | bytearray | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    path = Path(path)
    with replacing(path) as file:
        _write(path, file, memoryview(data))
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any, **dump_options: Any) -> Path:
    """``json.dumps(obj, **dump_options)`` written to ``path`` atomically (the whole text is
    built before the file is opened: a value json cannot encode leaves no file at all)."""
    return write_text(path, json.dumps(obj, **dump_options))


def save_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` written to ``path`` atomically.

    Serialized into memory first, then written: torch's own file writer turns a failing write
    into a ``RuntimeError`` without the errno or the path.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes(path, buffer.getbuffer())


def copy_file(source: str | Path, path: str | Path) -> Path:
    """Copy ``source`` to ``path`` atomically."""
    return write_bytes(path, Path(source).read_bytes())
