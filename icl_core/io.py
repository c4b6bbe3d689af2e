"""Safe, atomic, checksummed file I/O. Nothing here uses pickle.

- every write goes to a temporary file in the same folder, is fsynced, then renamed over the target;
- JSON files carry their own sha256 (``_sha256`` of the canonical payload) and are refused if it
  does not match;
- tensors are stored with safetensors; a tensor file is loaded only after its sha256 matches the
  one recorded when it was written.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import filelock
import torch
from safetensors.torch import load as st_load, save as st_save


class CorruptFileError(RuntimeError):
    """A file failed its checksum or could not be parsed: it is never used."""


def _fsync_dir(path: Path):
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def atomic_write_json(path: str | Path, obj: dict) -> None:
    payload = dict(obj)
    payload.pop("_sha256", None)
    payload["_sha256"] = hashlib.sha256(_canonical(payload)).hexdigest()
    atomic_write_bytes(path, json.dumps(payload, indent=1, sort_keys=True).encode())


def read_json_checked(path: str | Path) -> dict:
    path = Path(path)
    try:
        obj = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path} is not valid JSON ({e}); it was not used") from None
    if not isinstance(obj, dict) or "_sha256" not in obj:
        raise CorruptFileError(f"{path} has no checksum; it was not used")
    want = obj.pop("_sha256")
    if hashlib.sha256(_canonical(obj)).hexdigest() != want:
        raise CorruptFileError(f"{path} failed its checksum; it was not used")
    return obj


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> str:
    """Atomically write a safetensors file; return its sha256 (record it to verify the load)."""
    data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                   metadata={k: str(v) for k, v in (metadata or {}).items()})
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_tensors(path: str | Path, sha256: str) -> dict[str, torch.Tensor]:
    """Load a safetensors file after checking it against the recorded sha256."""
    path = Path(path)
    if not path.exists():
        raise CorruptFileError(f"{path} is missing")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CorruptFileError(f"{path} failed its checksum (truncated or corrupted); it was not used")
    try:
        return st_load(data)
    except Exception as e:  # safetensors raises its own error types
        raise CorruptFileError(f"{path} is not a valid safetensors file ({e})") from None


class FileLock(filelock.FileLock):
    """An inter-process lock (one per run / corpus): a second builder waits, then reuses."""
