"""Saving and loading checkpoints: atomic writes, safe loads (no code execution)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from medseg.errors import CheckpointError
from medseg.files import atomic_write_with


def save(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` atomically (`medseg.files.atomic_write_with`).

    A crash at any moment leaves either the previous file or the new one, never half of one.
    """
    atomic_write_with(Path(path), lambda stream: torch.save(state, stream))


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`: tensors and plain data only, never code."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else "unsupported content"
        raise CheckpointError(f"{path}: refused to load: it holds more than weights and data ({reason[:120]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupted or truncated checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a medseg checkpoint")
    return state
