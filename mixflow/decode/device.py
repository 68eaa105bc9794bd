"""Choose where decoding runs. DALI needs ``device_id=None`` for a CPU-only pipeline."""

from __future__ import annotations


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return torch.cuda.is_available()


def resolve_decode_device(requested: str, gpus_available: bool | None = None) -> str:
    """``auto`` -> ``gpu`` when CUDA is usable, else ``cpu``; ``gpu`` without CUDA is an error."""
    if requested not in ("auto", "cpu", "gpu"):
        raise ValueError(f"decode.device must be one of auto, cpu, gpu; got {requested!r}")
    have_gpu = cuda_available() if gpus_available is None else gpus_available
    if requested == "auto":
        return "gpu" if have_gpu else "cpu"
    if requested == "gpu" and not have_gpu:
        raise RuntimeError("decode.device is 'gpu' but no CUDA device is available; use 'cpu' or 'auto'")
    return requested
