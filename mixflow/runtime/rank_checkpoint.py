"""A rank's run checkpoint file: its stream state and what its entrypoint registered
(``context.on_checkpoint``), written by ``TrainerRank.save_checkpoint`` and read as plain data."""

from __future__ import annotations

from pathlib import Path

import torch

CHECKPOINT_FORMAT = "mixflow.rank-checkpoint/1"


def load_rank_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """A file written by :meth:`TrainerRank.save_checkpoint`, loaded as plain data
    (``weights_only``: loading it runs no code from it)."""
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path}: no such file") from None
    except Exception as exc:  # noqa: BLE001 - torch's unpickler refuses code objects: say which file
        raise ValueError(f"checkpoint {path}: not a plain-data mixflow rank checkpoint ({exc})") from None
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path}: not a mixflow rank checkpoint (format {CHECKPOINT_FORMAT!r})")
    return saved
