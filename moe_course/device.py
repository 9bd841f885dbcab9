"""Pick the compute device and seed every random number generator the course uses (every chapter's
first cell; chapter 0 explains the environment variables).

The environment variable ``MOE_COURSE_DEVICE`` (e.g. ``cpu``, ``cuda``, ``cuda:1``, ``mps``) wins over
everything, so a reader can pin a notebook to the CPU without editing it. ``MOE_COURSE_PRESET``
(``cpu``, ``gpu`` or ``test``) likewise overrides the size preset that ``auto`` picks, e.g. the quick
``cpu`` models on a GPU class server.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["ENV_VAR", "PRESET_ENV_VAR", "get_device", "seed_everything", "default_preset", "model_device",
           "to_device"]

ENV_VAR = "MOE_COURSE_DEVICE"
PRESET_ENV_VAR = "MOE_COURSE_PRESET"
_PRESETS = ("cpu", "gpu", "test")
_KNOWN = ("cpu", "cuda", "mps")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _parse(name: str, source: str) -> torch.device:
    """Turn ``name`` into a device that exists here; ``source`` names where it came from for errors."""
    text = name.strip().lower()
    if text == "auto":
        return _auto()
    kind = text.split(":", 1)[0]
    if kind not in _KNOWN:
        raise ValueError(f"{source} must be one of 'auto', 'cpu', 'cuda[:N]', 'mps', got {name!r}")
    try:
        device = torch.device(text)
    except RuntimeError as err:  # e.g. "cuda:x"
        raise ValueError(f"{source} is not a valid device string: {name!r} ({err})") from None
    # Fail here rather than at the first .to(device) deep inside a training loop.
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{source}={name!r} but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"{source}={name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    if device.type == "mps" and not _mps_available():
        raise ValueError(f"{source}={name!r} but MPS is not available on this machine")
    return device


def _auto() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def get_device(prefer: str | torch.device | None = None) -> torch.device:
    """Return the device to run on.

    Order: the ``MOE_COURSE_DEVICE`` environment variable, then ``prefer``, then the best available
    of cuda > mps > cpu. ``"auto"`` (in either place) means "best available". Asking for a device
    that does not exist here raises ``ValueError`` naming where the request came from.
    """
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return _parse(env, ENV_VAR)
    if prefer is None:
        return _auto()
    if isinstance(prefer, torch.device):
        prefer = str(prefer)
    if not isinstance(prefer, str):
        raise TypeError(f"prefer must be a str, torch.device or None, got {type(prefer).__name__}")
    return _parse(prefer, "prefer")


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model`` lives: the device of its first parameter (or buffer); CPU for an empty module."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor moved to ``device`` (dicts recursively; anything else unchanged)."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and every CUDA device)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0 or seed >= 2**32:
        # NumPy's legacy seeding only accepts [0, 2**32).
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def default_preset(device: str | torch.device | None = None) -> str:
    """Return ``"gpu"`` when ``device`` (default: :func:`get_device`) is CUDA, else ``"cpu"``.

    MPS gets the ``cpu`` preset: the larger ``gpu`` preset is sized for a CUDA card. The environment
    variable ``MOE_COURSE_PRESET`` wins when it is set.
    """
    forced = os.environ.get(PRESET_ENV_VAR, "").strip()
    if forced:
        if forced not in _PRESETS:
            raise ValueError(f"{PRESET_ENV_VAR} must be one of {', '.join(_PRESETS)}, got {forced!r}")
        return forced
    if device is None:
        dev = get_device()
    elif isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ValueError(f"device must be a device string like 'cpu' or 'cuda:0', got {device!r}") from None
    else:
        raise TypeError(f"device must be a str, torch.device or None, got {type(device).__name__}")
    return "gpu" if dev.type == "cuda" else "cpu"
