"""moe_course: the companion package of the course on compressing Mixture-of-Experts models
(chapters 1 to 13; chapter 0, the book's welcome page, maps each chapter to its module).

Submodules load on first use (``import moe_course; moe_course.zoo.pretrained(...)`` works), so
importing the package stays fast and does not pull in datasets or matplotlib until needed.

Layering: a module imports only from its own level or the levels below it, and the imports have
no cycle (``tests/test_layering.py`` reads the source and enforces both). Lowest first:

1. core: ``device``, ``progress``, ``_validate``, ``losses``, ``dispatch``, ``layers``, ``data``
2. ``models`` (the model families; their presets live in ``zoo``)
3. ``train``, ``calib`` (training loops; calibration batches, hooks and per-expert capture)
4. ``metrics`` (sizes, latency, routing statistics)
5. ``compress`` (one module per technique), ``factorized``
6. ``compress.recipes``, ``zoo``, ``viz``, ``widgets``, ``serving``, ``hf``, ``hf_zoo``
7. ``course_table``, ``grading``, ``cli``, ``doctor``, ``exercises`` (the course's applications)

Feed-forward kinds of higher modules plug into ``models`` through ``models.register_ffn`` when
they are imported (``factorized`` adds ``"mumoe-cp"`` and ``"mumoe-tr"``).
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "calib", "cli", "compress", "course_table", "data", "device", "dispatch", "doctor", "exercises", "factorized",
    "grading", "hf", "layers", "losses", "metrics", "models", "progress", "serving", "train", "viz", "widgets", "zoo",
)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
