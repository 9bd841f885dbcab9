"""Progress bars for training loops (chapters 3, 6, 10): tqdm.auto, silenced by ``TQDM_DISABLE=1``
(CI, book builds)."""

from __future__ import annotations

import os
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, *, disable: bool = False, **kwargs) -> tqdm:
    """Wrap ``iterable`` in a tqdm bar unless ``disable`` or the ``TQDM_DISABLE`` env var is set.

    Static HTML pages cannot show widget bars, so builds set ``TQDM_DISABLE=1`` and get none.
    """
    off = disable or os.environ.get("TQDM_DISABLE", "").lower() in {"1", "true", "yes"}
    return tqdm(iterable, disable=off, dynamic_ncols=True, **kwargs)
