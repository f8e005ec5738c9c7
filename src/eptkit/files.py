"""Atomic file writes: every file eptkit writes exists completely or not at all.

Each writer puts the bytes in a temporary file beside the target, fsyncs it and renames it over the
target (`os.replace` is atomic on POSIX and Windows), so a crash or a full disk never leaves a
half-written adapter, results file or checkpoint part behind, and an earlier file survives a failed
write.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def _atomic(path: Path, write) -> None:
    """Call write(temporary_path), fsync, rename to `path`; remove the temporary file on any failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        make_readable(tmp)  # mkstemp creates 0600; files eptkit writes get the usual 0666 & ~umask
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once: os.umask sets as it reads, which is not thread-safe


def make_readable(path) -> None:
    """Give a file the mode a plain open() would: 0666 minus the umask."""
    os.chmod(path, 0o666 & ~_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_lines(path: Path, lines: list[str]) -> None:
    atomic_write_bytes(path, "".join(line + "\n" for line in lines).encode())


def atomic_copy(source: Path, path: Path) -> None:
    """Copy a file's bytes (not its mode) atomically."""
    _atomic(path, lambda tmp: shutil.copyfile(source, tmp))


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save, atomically (optimizer and RNG state of checkpoints; read back with weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write tensors atomically; return the file's SHA-256. Tensors that share storage (tied
    weights) are cloned, since safetensors refuses shared storage."""
    digest = []

    def write(tmp):
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, tmp, metadata=metadata)
        digest.append(sha256_file(Path(tmp)))

    _atomic(path, write)
    return digest[0]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
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


def round_floats(obj, digits: int = 6):
    """`obj` with every float rounded to `digits` decimals (results.json and printed summaries:
    84.4, not 84.39999999999999); NaN and infinities are kept."""
    if isinstance(obj, float):
        return round(obj, digits) if obj == obj and abs(obj) != float("inf") else obj
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_floats(v, digits) for v in obj]
    return obj
