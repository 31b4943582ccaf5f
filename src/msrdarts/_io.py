"""Atomic file writes: a temporary file in the same folder, fsynced, then renamed over the target.

A crash leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .errors import WriteError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, keep: str | os.PathLike | None = None) -> None:
    """Write ``data`` to ``path`` atomically; with ``keep``, the file it replaces is kept there.

    ``path`` exists (old or new, whole) at every moment: the old file is hard-linked (or copied)
    to ``keep`` before the new one is renamed over it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:   # a full disk or a file-size limit: the file it would replace is untouched
        tmp.unlink(missing_ok=True)
        raise WriteError(f"{path}: cannot write it ({e.strerror or e})") from None
    if keep is not None and path.is_file():
        keep = Path(keep)
        keep_tmp = keep.with_name(f".{keep.name}.tmp")
        keep_tmp.unlink(missing_ok=True)
        try:
            os.link(path, keep_tmp)
        except OSError:   # a file system without hard links
            shutil.copyfile(path, keep_tmp)
        os.replace(keep_tmp, keep)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())
