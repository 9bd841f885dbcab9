"""moe_course: the companion package of the course on compressing Mixture-of-Experts models.

Submodules load on first use (``import moe_course; moe_course.zoo.pretrained(...)`` works), so
importing the package stays fast and does not pull in datasets or matplotlib until needed.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "cli", "compress", "data", "device", "dispatch", "exercises", "factorized", "grading", "hf", "layers",
    "losses", "metrics", "models", "progress", "train", "viz", "zoo",
)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
