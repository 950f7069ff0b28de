"""Checkpoints that are safe to load and say when they are broken; atomic, durable file writes.

File format (``torch.save`` of a plain dict, loadable with ``torch.load(weights_only=True)``)::

    {"format": "eqprop-checkpoint", "version": 1, "sha256": <hex digest of payload>,
     "payload": <uint8 tensor: the torch.save bytes of the checkpoint dict>}

The checkpoint dict itself holds only tensors and JSON-like data (dicts, lists, numbers, strings; RNG
states as tensors), so it too loads with ``weights_only=True``: loading someone else's checkpoint runs
no pickled code. The digest is checked on every load, so a file with flipped bytes is reported as
corrupted instead of resuming a run that silently differs; a truncated, empty or foreign file is a
``ValueError`` naming it.

Every write goes to a temporary file in the same folder, is flushed and fsync'ed, then renamed over
the target, and the folder is fsync'ed: a crash or a reader sees the old file or the new one, never a
half-written one, and the rename survives a power loss.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import time
from pathlib import Path

import torch

FORMAT = "eqprop-checkpoint"
VERSION = 1


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(data: bytes, path) -> Path:
    """Write ``data`` to ``path`` atomically and durably (temporary file, fsync, rename, fsync the folder)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def write_text_atomic(text: str, path) -> Path:
    """``write_bytes_atomic`` of UTF-8 text."""
    return write_bytes_atomic(text.encode(), path)


def save_checkpoint(payload: dict, path) -> Path:
    """Write ``payload`` (tensors and JSON-like data only) as a checksummed checkpoint, atomically.

    Example: ``save_checkpoint({"model": model.state_dict(), "step": 10}, "runs/x/last.pt")``
    """
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    outer = {
        "format": FORMAT,
        "version": VERSION,
        "sha256": hashlib.sha256(data).hexdigest(),
        "payload": torch.frombuffer(bytearray(data), dtype=torch.uint8),
    }
    buf = io.BytesIO()
    torch.save(outer, buf)
    return write_bytes_atomic(buf.getvalue(), path)


def load_checkpoint_file(path, *, map_location="cpu") -> dict:
    """The checkpoint dict saved by ``save_checkpoint``, after checking its format and checksum.

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the file, when it is empty, truncated, not an eqprop checkpoint, or
            corrupted (checksum mismatch).

    Example: ``ckpt = load_checkpoint_file("runs/markov/last.pt"); ckpt["step"]``
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    size = path.stat().st_size
    not_valid = f"{path} is not a valid/complete eqprop checkpoint"
    if size == 0:
        raise ValueError(f"{not_valid}: the file is empty")
    try:
        outer = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip / unpickling errors differ by how the file is broken
        raise ValueError(
            f"{not_valid} (truncated, corrupted or another kind of file; {size} bytes): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    if not (isinstance(outer, dict) and outer.get("format") == FORMAT):
        raise ValueError(
            f"{not_valid}: it was not written by eqprop.train (no {FORMAT!r} header; a checkpoint of an "
            "older eqprop, or a plain torch.save file?)"
        )
    if outer.get("version") != VERSION:
        raise ValueError(
            f"{path} is an eqprop checkpoint of format version {outer.get('version')!r}; this eqprop "
            f"reads version {VERSION}"
        )
    payload = outer.get("payload")
    if not (isinstance(payload, torch.Tensor) and payload.dtype == torch.uint8 and payload.dim() == 1):
        raise ValueError(f"{not_valid}: its payload is missing")
    data = payload.numpy().tobytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != outer.get("sha256"):
        raise ValueError(
            f"{path} is corrupted: the sha256 checksum of its payload does not match the one stored "
            f"when it was written ({digest[:12]}... vs {str(outer.get('sha256'))[:12]}...); "
            "do not use it (an earlier checkpoint or a fresh run is needed)"
        )
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:  # pragma: no cover - the checksum matched, so the writer stored something odd
        raise ValueError(f"{not_valid}: its payload cannot be read: {type(err).__name__}: {err}") from None


# ---- RNG states as plain data (weights_only-loadable) ---------------------------------------------


def rng_state() -> dict:
    """Every RNG the loop may touch, as tensors and ints (torch CPU/CUDA, Python, NumPy)."""
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state(
            (s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached_gaussian"])
        )


# ---- a run's folder --------------------------------------------------------------------------------

#: Files whose presence means a folder holds a run.
RUN_FILES = ("config.json", "last.pt", "best.pt", "summary.json")


def existing_run_files(out_dir) -> list:
    """The ``RUN_FILES`` present in ``out_dir``."""
    out_dir = Path(out_dir)
    return [name for name in RUN_FILES if (out_dir / name).exists()]


def move_aside(out_dir) -> Path:
    """Rename ``out_dir`` to ``<out_dir>.old-<YYYYmmdd-HHMMSS>`` (a free name); nothing is deleted.

    Example: ``move_aside("runs/k2")  # Path('runs/k2.old-20260101-120000')``
    """
    out_dir = Path(out_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = out_dir.with_name(f"{out_dir.name}.old-{stamp}")
    i = 1
    while target.exists():
        target = out_dir.with_name(f"{out_dir.name}.old-{stamp}-{i}")
        i += 1
    os.replace(out_dir, target)
    _fsync_dir(out_dir.parent.resolve())
    return target
