"""Model zoo (chapter 3): the course's trained MoE models, trained on first use and cached as
safetensors. The size presets (``cpu``, ``gpu``, ``test``) live here too.

``pretrained("shakespeare-moe")`` / ``pretrained("mnist1d-moe")`` / ``pretrained("digits-moe")`` train deterministically the first
time (seeded data order and initialisation), save the weights (safetensors only, never pickle),
the config, the tokenizer and a metadata JSON, and load in well under a second afterwards.

Cache layout: ``<cache>/<name>-<preset>-<hash12>/`` where the hash covers the model config, the
train config, the data spec and :data:`ZOO_VERSION`, so changing any of them trains a new entry.
Training is bit-for-bit reproducible on the same machine with the same number of torch threads;
another thread count gives the same model up to float rounding.
Entries are written into a temporary directory and renamed into place (atomic), a corrupt or
mismatched entry is rebuilt with a warning, and an ``fcntl`` lock file per entry makes a second
process wait for the first one's training instead of training again.

Faults and what happens (tested in ``tests/test_zoo_faults.py``):

* truncated or foreign ``model.safetensors`` (unreadable, wrong keys or shapes, or bytes that do not
  match the SHA-256 recorded in ``metadata.json``), garbage ``config.json``, a ``metadata.json`` of
  another entry or zoo version: the entry is rebuilt with a warning, never silently loaded;
* a process killed while writing leaves only a ``.tmp-*`` directory (the entry appears by one
  rename): the next call trains again and removes the leftovers; a killed lock holder releases its
  lock with its death;
* a cache directory that cannot be written (read-only, not a directory): valid entries still
  load; anything that needs writing raises ``PermissionError`` naming the directory and
  ``$MOE_COURSE_CACHE`` (point it, or ``cache_dir=``, at a writable directory);
* weights are read with ``safetensors`` only; nothing in the package unpickles.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from moe_course import models as _models
from moe_course.device import default_preset
from moe_course.train import TrainConfig, evaluate, fit

try:  # POSIX; on Windows entries are still written atomically, only the training is not deduplicated
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

ZOO_VERSION = 1
NAMES = ("shakespeare-moe", "mnist1d-moe", "digits-moe")
PRESETS = ("cpu", "gpu", "test")
ENV_VAR = "MOE_COURSE_CACHE"

_FILES = ("config.json", "model.safetensors", "metadata.json")
_TOKENIZER = "tokenizer.json"


# --------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------
def _presets() -> dict[tuple[str, str], tuple[_models._FFNConfig, TrainConfig]]:
    # cpu: measured to train in about a minute on 2 cores (the zoo records train_seconds); the LM
    # is small and short-trained (validation perplexity ~7-9 on unseen plays, seed-dependent),
    # the classifier reaches ~98% on MNIST-1D test; both leave visible room for compression damage.
    return {
        ("test", "shakespeare-moe"): (
            _models.LMConfig(d_model=32, n_layers=2, n_heads=2, num_experts=4, k=2, d_hidden=32, context_length=32),
            TrainConfig(steps=30, batch_size=16, lr=3e-3, warmup_steps=5, eval_every=0, eval_batches=4),
        ),
        ("test", "mnist1d-moe"): (
            _models.ClassifierConfig(d_model=32, n_layers=1, n_heads=2, num_experts=4, k=2, d_hidden=32),
            TrainConfig(steps=30, batch_size=64, lr=3e-3, warmup_steps=5, eval_every=0, eval_batches=4),
        ),
        ("test", "digits-moe"): (
            _models.ImageClassifierConfig(d_model=32, n_layers=1, n_heads=2, num_experts=4, k=2, d_hidden=32),
            TrainConfig(steps=60, batch_size=64, lr=3e-3, warmup_steps=5, eval_every=0, eval_batches=4),
        ),
        ("cpu", "shakespeare-moe"): (
            _models.LMConfig(d_model=96, n_layers=4, n_heads=4, num_experts=8, k=2, d_hidden=64,
                             activation="swiglu", context_length=64),
            TrainConfig(steps=600, batch_size=32, lr=3e-3, warmup_steps=50, eval_every=200, eval_batches=8),
        ),
        ("cpu", "mnist1d-moe"): (
            _models.ClassifierConfig(d_model=64, n_layers=3, n_heads=4, num_experts=8, k=2, d_hidden=64,
                                     activation="swiglu"),
            TrainConfig(steps=600, batch_size=128, lr=3e-3, warmup_steps=50, eval_every=200, eval_batches=8),
        ),
        ("cpu", "digits-moe"): (
            _models.ImageClassifierConfig(d_model=64, n_layers=2, n_heads=4, num_experts=8, k=2, d_hidden=64,
                                          activation="swiglu"),
            TrainConfig(steps=500, batch_size=128, lr=3e-3, warmup_steps=50, eval_every=250, eval_batches=4),
        ),
        ("gpu", "shakespeare-moe"): (
            _models.LMConfig(d_model=384, n_layers=6, n_heads=6, num_experts=8, k=2, d_hidden=512,
                             activation="swiglu", context_length=256, dropout=0.1),
            TrainConfig(steps=5000, batch_size=64, lr=1e-3, warmup_steps=200, eval_every=500, eval_batches=32),
        ),
        ("gpu", "mnist1d-moe"): (
            _models.ClassifierConfig(d_model=128, n_layers=4, n_heads=4, num_experts=8, k=2, d_hidden=128,
                                     activation="swiglu", dropout=0.1),
            TrainConfig(steps=6000, batch_size=256, lr=2e-3, warmup_steps=300, eval_every=1000, eval_batches=16),
        ),
        ("gpu", "digits-moe"): (
            _models.ImageClassifierConfig(d_model=128, n_layers=4, n_heads=4, num_experts=8, k=2, d_hidden=128,
                                          activation="swiglu", dropout=0.1),
            TrainConfig(steps=3000, batch_size=256, lr=2e-3, warmup_steps=200, eval_every=500, eval_batches=4),
        ),
    }


def preset_configs(name: str = "auto", model: str = "shakespeare-moe") -> tuple[_models._FFNConfig, TrainConfig]:
    """The (model config, :class:`~moe_course.train.TrainConfig`) of a zoo model at a size preset.

    ``name``: ``"cpu"`` (about a minute on 2 CPU cores), ``"gpu"`` (larger, trains longer),
    ``"test"`` (seconds, for the test suite) or ``"auto"`` (:func:`moe_course.device.default_preset`).
    ``model``: one of :data:`NAMES`. The LM's ``vocab_size`` is a placeholder that the zoo
    replaces by its tokenizer's size.
    """
    if name == "auto":
        name = default_preset()
    if name not in PRESETS:
        raise ValueError(f"preset name must be one of {PRESETS + ('auto',)}, got {name!r}")
    if model not in NAMES:
        raise ValueError(f"model must be one of {NAMES}, got {model!r}")
    model_cfg, train_cfg = _presets()[(name, model)]
    return model_cfg, train_cfg


# --------------------------------------------------------------------------------------------
# names, presets, paths
# --------------------------------------------------------------------------------------------
def _check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"name must be one of {NAMES}, got {name!r}")


def _resolve_preset(preset: str) -> str:
    if preset == "auto":
        return default_preset()
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS + ('auto',)}, got {preset!r}")
    return preset


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The zoo's cache directory: ``path``, else ``$MOE_COURSE_CACHE``, else ``$XDG_CACHE_HOME/moe_course``
    (``~/.cache/moe_course`` when ``XDG_CACHE_HOME`` is unset)."""
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str, os.PathLike or None, got {type(path).__name__}")
    if path is None:
        path = os.environ.get(ENV_VAR) or None
    if path is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "moe_course")
    return Path(path).expanduser()


# Validation is a fixed, evenly spaced subset of the held-out plays' blocks: large enough for a
# stable perplexity, small enough that chapters can evaluate many compressed variants quickly.
_DATA = {
    "shakespeare-moe": {
        "test": {"val_fraction": 0.1, "val_blocks": 64},
        "cpu": {"val_fraction": 0.1, "val_blocks": 512},
        "gpu": {"val_fraction": 0.1, "val_blocks": 2048},
    },
    "mnist1d-moe": {
        "test": {"seed": 42, "num_samples": 2000},
        "cpu": {"seed": 42, "num_samples": 10000},
        "gpu": {"seed": 42, "num_samples": 20000},
    },
    # The 1,797 real 8x8 digits: 80% train, 20% held out (stratified, seeded); the zoo reports
    # accuracy on the held-out 20% (359 images), as it does on MNIST-1D's test split.
    "digits-moe": {p: {"seed": 0, "val_fraction": 0.0, "test_fraction": 0.2} for p in ("test", "cpu", "gpu")},
}


TRAIN_THREADS = 2  # CPU threads every cpu/test zoo model trains with, whatever the machine has

def _data_spec(name: str, preset: str, model_cfg: Any) -> dict[str, Any]:
    """Everything that determines the training data (part of the cache key)."""
    if name == "shakespeare-moe":
        from moe_course import data as _data

        return {"source": f"shakespeare plays sha256:{_data.SHAKESPEARE_SHA256}, split by play", "tokenizer": "chars of the train split",
                "block_size": model_cfg.context_length, **_DATA[name][preset]}
    if name == "digits-moe":
        return {"source": "sklearn.datasets.load_digits (UCI optdigits 8x8)", "validation": "test split",
                **_DATA[name][preset]}
    return {"source": "mnist1d.data.make_dataset", "validation": "test split", **_DATA[name][preset]}


def _spec(name: str, preset: str) -> dict[str, Any]:
    """The key material of an entry: what it was trained from."""
    model_cfg, train_cfg = preset_configs(preset, name)
    return {
        "name": name,
        "preset": preset,
        "model_class": type(model_cfg).__name__,
        "model_config": model_cfg.to_dict(),
        "train_config": train_cfg.to_dict(),
        "data": _data_spec(name, preset, model_cfg),
        "zoo_version": ZOO_VERSION,
    }


def _key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def entry_dir(name: str, preset: str = "auto", cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of the cache entry for ``name`` at ``preset`` (whether or not it exists)."""
    _check_name(name)
    preset = _resolve_preset(preset)
    return _entry_path(_spec(name, preset), cache_dir)


def _entry_path(spec: dict[str, Any], root: str | os.PathLike | None) -> Path:
    return cache_dir(root) / f"{spec['name']}-{spec['preset']}-{_key(spec)[:12]}"


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)  # chapters ask repeatedly; Datasets are immutable, so sharing is safe
def _build_data(name: str, preset: str) -> tuple[dict[str, Any], Any]:
    """``({"train", "validation"}, tokenizer or None)`` exactly as the zoo trains and evaluates."""
    from moe_course import data as _data

    model_cfg, _ = preset_configs(preset, name)
    spec = _data_spec(name, preset, model_cfg)
    if name == "shakespeare-moe":
        plays = _data.load_shakespeare(val_fraction=spec["val_fraction"])
        tok = _data.CharTokenizer.from_text(plays["train"]["text"])
        train = _data.lm_blocks(plays["train"], tok, spec["block_size"])
        val = _data.lm_blocks(plays["validation"], tok, spec["block_size"])
        n = min(spec["val_blocks"], len(val))
        val = val.select([i * len(val) // n for i in range(n)])
        return {"train": train, "validation": val}, tok
    if name == "digits-moe":
        ds = _data.load_digits(seed=spec["seed"], val_fraction=spec["val_fraction"],
                               test_fraction=spec["test_fraction"])
        return {"train": ds["train"], "validation": ds["test"]}, None
    ds = _data.load_mnist1d(seed=spec["seed"], num_samples=spec["num_samples"])
    # MNIST-1D ships train/test; the zoo reports accuracy on its test split.
    return {"train": ds["train"], "validation": ds["test"]}, None


def data(name: str, preset: str = "auto") -> dict[str, Any]:
    """``{"train": Dataset, "validation": Dataset}`` in the exact form ``pretrained(name, preset)``
    was trained and evaluated on: LM blocks of ``context_length + 1`` ids for ``shakespeare-moe``
    (encoded with the model's tokenizer), MNIST-1D train/test rows for ``mnist1d-moe``, the digits'
    train/test rows (images ``[1, 8, 8]``) for ``digits-moe``."""
    _check_name(name)
    preset = _resolve_preset(preset)
    return dict(_build_data(name, preset)[0])


# --------------------------------------------------------------------------------------------
# locking and atomic writes
# --------------------------------------------------------------------------------------------
def _unwritable(root: Path, err: OSError) -> PermissionError:
    return PermissionError(
        f"zoo cache directory {root} is not writable ({type(err).__name__}: {err}); set the environment "
        f"variable {ENV_VAR} (or pass cache_dir=...) to a writable directory")


@contextlib.contextmanager
def _locked(entry: Path) -> Iterator[None]:
    """Exclusive per-entry lock (``<entry>.lock``); a second process blocks here until the first is done."""
    lock_path = entry.parent / (entry.name + ".lock")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fh = open(lock_path, "a+")
    except OSError as err:
        raise _unwritable(entry.parent, err) from err
    with fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def _remove_leftovers(entry: Path) -> None:
    """Delete temp/old directories of ``entry`` left by a killed writer (call only holding the lock)."""
    if fcntl is None:  # without a real lock another writer's temp dir may be in use
        return
    for prefix in (f".tmp-{entry.name}-", f".old-{entry.name}-"):
        for p in entry.parent.glob(prefix + "*"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _publish(tmp: Path, entry: Path) -> None:
    """Move the finished ``tmp`` directory to ``entry``, replacing an old one; readers see old or new."""
    old = None
    if entry.exists():
        old = entry.parent / f".old-{entry.name}-{uuid.uuid4().hex[:8]}"
        os.replace(entry, old)
    os.replace(tmp, entry)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------
def _load(entry: Path, spec: dict[str, Any]) -> tuple[torch.nn.Module | None, str]:
    """``(model, "")`` or ``(None, reason)``; ``reason == "missing"`` when there is no entry at all."""
    from safetensors.torch import load_file

    if not entry.is_dir():
        return None, "missing"
    try:
        for f in _FILES:
            if not (entry / f).is_file():
                return None, f"missing file {f}"
        stored = json.loads((entry / "config.json").read_text())
        if not isinstance(stored, dict) or stored.get("spec") != spec:
            return None, "config mismatch"
        info = json.loads((entry / "metadata.json").read_text())
        if not isinstance(info, dict) or info.get("key") != _key(spec) or info.get("zoo_version") != ZOO_VERSION:
            return None, "metadata mismatch (another entry or zoo version)"
        # Entries written since the checksum was added record it; older ones are still checked above.
        if "weights_sha256" in info and _sha256(entry / "model.safetensors") != info["weights_sha256"]:
            return None, "model.safetensors does not match the SHA-256 in metadata.json"
        classes = {"LMConfig": _models.LMConfig, "ClassifierConfig": _models.ClassifierConfig,
                   "ImageClassifierConfig": _models.ImageClassifierConfig}
        cls = classes[stored["model_class"]]
        model = _models.model_from_config(cls.from_dict(stored["model_config"]))
        model.load_state_dict(load_file(entry / "model.safetensors"), strict=True)
        if isinstance(model, _models.MoETransformerLM):
            from moe_course.data import CharTokenizer

            if not (entry / _TOKENIZER).is_file():
                return None, f"missing file {_TOKENIZER}"
            model.tokenizer = CharTokenizer.load(entry / _TOKENIZER)
        model.zoo_info = {**info, "path": str(entry), "source": "cache"}
    except Exception as err:  # any unreadable piece means: rebuild
        return None, f"{type(err).__name__}: {err}"
    model.eval()
    return model, ""


def _train_and_save(spec: dict[str, Any], entry: Path, progress: bool) -> None:
    from safetensors.torch import save_file

    from moe_course.device import get_device, seed_everything

    name, preset = spec["name"], spec["preset"]
    model_cfg, train_cfg = preset_configs(preset, name)
    start = time.perf_counter()
    splits, tok = _build_data(name, preset)
    if tok is not None:
        model_cfg = model_cfg.replace(vocab_size=tok.vocab_size)
    seed_everything(train_cfg.seed)
    model = _models.model_from_config(model_cfg)
    # Only the gpu preset is sized for an accelerator; cpu/test stay on the CPU so they are reproducible.
    device = get_device() if preset == "gpu" else torch.device("cpu")
    # CPU float reductions split work by thread: a different thread count trains a (slightly)
    # different model. A fixed count makes the cpu/test models, and the book's numbers, the same on
    # every machine (with the same library versions); 2 is what the book and CI run with.
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(TRAIN_THREADS)
    try:
        history = fit(model, splits["train"], splits["validation"], train_cfg, device=device, progress=progress)
        final = evaluate(model, splits["validation"], batch_size=256)
        train_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    model.to("cpu")

    import moe_course

    meta = {
        "name": name,
        "preset": preset,
        "key": _key(spec),
        "zoo_version": ZOO_VERSION,
        "torch_version": torch.__version__,
        "moe_course_version": getattr(moe_course, "__version__", None),
        "train_device": str(device),
        # CPU results are bit-identical only for the same thread count (float reduction order).
        "num_threads": train_threads,
        "train_seconds": seconds,
        "fit_seconds": history.wall_time,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "final_eval": final,
        "eval_split": "validation" if name == "shakespeare-moe" else "test",
        "history": history.summary(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_id": uuid.uuid4().hex,
    }
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared cache should stay readable
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp / "model.safetensors")
        meta["weights_sha256"] = _sha256(tmp / "model.safetensors")
        if tok is not None:
            tok.save(tmp / _TOKENIZER)
        _write_json(tmp / "config.json", {"spec": spec, "model_class": type(model_cfg).__name__,
                                          "model_config": model_cfg.to_dict()})
        _write_json(tmp / "metadata.json", meta)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        _publish(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def pretrained(
    name: str,
    preset: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    retrain: bool = False,
    progress: bool = True,
) -> torch.nn.Module:
    """A trained zoo model, in eval mode on the CPU (move it where you need it).

    Args:
        name: one of :data:`NAMES` (``"shakespeare-moe"``, ``"mnist1d-moe"``, ``"digits-moe"``).
        preset: ``"cpu"`` (about a minute of training on 2 cores), ``"gpu"``, ``"test"`` or
            ``"auto"`` (``gpu`` on CUDA, else ``cpu``).
        cache_dir: overrides ``$MOE_COURSE_CACHE`` / the user cache directory.
        retrain: train again even if a valid entry exists (and replace it).
        progress: show the training progress bar.

    The model carries ``.zoo_info`` (metadata: final eval metrics, training seconds, torch version,
    history summary, ``"source": "cache" | "trained"``) and, for the LM, ``.tokenizer``.
    """
    _check_name(name)
    preset = _resolve_preset(preset)
    spec = _spec(name, preset)
    entry = _entry_path(spec, cache_dir)
    if not retrain:
        model, _ = _load(entry, spec)
        if model is not None:
            return model
    with _locked(entry):
        if not retrain:
            # Another process may have finished training while we waited for the lock.
            model, reason = _load(entry, spec)
            if model is not None:
                return model
            if reason != "missing":
                warnings.warn(f"zoo cache entry {entry} is unusable ({reason}); retraining it", stacklevel=2)
        _remove_leftovers(entry)
        try:
            _train_and_save(spec, entry, progress)
        except PermissionError as err:
            raise _unwritable(entry.parent, err) from err
        model, reason = _load(entry, spec)
    if model is None:
        raise RuntimeError(f"zoo entry {entry} could not be read back after training ({reason})")
    model.zoo_info["source"] = "trained"
    return model


def is_cached(name: str, preset: str = "auto", cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether ``pretrained(name, preset)`` would load without training (files present, config and
    metadata match; the weights' checksum is only verified by ``pretrained``)."""
    _check_name(name)
    preset = _resolve_preset(preset)
    spec = _spec(name, preset)
    entry = _entry_path(spec, cache_dir)
    try:
        stored = json.loads((entry / "config.json").read_text())
        info = json.loads((entry / "metadata.json").read_text())
    except (OSError, ValueError):
        return False
    needed = _FILES + ((_TOKENIZER,) if name == "shakespeare-moe" else ())
    return (isinstance(stored, dict) and stored.get("spec") == spec and isinstance(info, dict)
            and info.get("key") == _key(spec) and info.get("zoo_version") == ZOO_VERSION
            and all((entry / f).is_file() for f in needed))


__all__ = ["pretrained", "data", "preset_configs", "is_cached", "cache_dir", "entry_dir", "NAMES", "PRESETS", "ZOO_VERSION"]
