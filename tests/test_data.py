import hashlib
import importlib.util
import json
import lzma
import random
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from moe_course import data
from moe_course.data import CharTokenizer, batches, lm_blocks, load_mnist1d, load_shakespeare, load_text_dataset


# ----------------------------------------------------------------------------- Shakespeare
@pytest.fixture(scope="module")
def shakespeare():
    return load_shakespeare()


def test_shakespeare_splits_by_play(shakespeare):
    assert set(shakespeare) == {"train", "validation"}
    train, val = shakespeare["train"], shakespeare["validation"]
    assert train.column_names == ["title", "text"] == val.column_names
    train_titles, val_titles = set(train["title"]), set(val["title"])
    assert not train_titles & val_titles
    n_plays = len(train_titles | val_titles)
    assert n_plays == len(train) + len(val)  # one row per play, no duplicates
    assert n_plays >= 30  # the complete plays, not a sample
    assert len(val) == round(0.1 * n_plays)
    assert "Hamlet" in train_titles | val_titles


def test_shakespeare_is_deterministic_and_fraction_matters(shakespeare):
    again = load_shakespeare()
    assert list(again["validation"]["title"]) == list(shakespeare["validation"]["title"])
    bigger = load_shakespeare(val_fraction=0.3)
    n = len(shakespeare["train"]) + len(shakespeare["validation"])
    assert len(bigger["validation"]) == round(0.3 * n)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 2])
def test_shakespeare_bad_fraction(bad):
    with pytest.raises(ValueError, match="val_fraction"):
        load_shakespeare(val_fraction=bad)


def test_shakespeare_text_has_no_markup(shakespeare):
    for split in shakespeare.values():
        for title, text in zip(split["title"], split["text"]):
            assert len(text) > 20_000, title
            # the source markdown's: '#' headers, '**NAME**' speakers, '_..._' / '*...*' directions,
            # '\[' escapes and '[Aside]' brackets, two-space hard line breaks.
            for residue in "#*_\\[]":
                assert residue not in text, (title, residue)
            assert not re.search(r" +\n", text), title
            assert not re.search(r"^(ACT|SCENE) [IVX]+", text, flags=re.M), title
            assert "\n\n\n" not in text
            assert text == text.strip()


def test_shakespeare_keeps_speaker_layout(shakespeare):
    rows = dict(zip(shakespeare["train"]["title"], shakespeare["train"]["text"]))
    rows.update(zip(shakespeare["validation"]["title"], shakespeare["validation"]["text"]))
    hamlet = rows["Hamlet"]
    assert hamlet.startswith("BERNARDO:\nWho's there?\n\nFRANCISCO:\n")
    assert "\nHAMLET:\nTo be, or not to be" in hamlet
    # nearly every paragraph is "NAME:" followed by the speech, as in tiny-shakespeare
    blocks = [b for text in rows.values() for b in text.split("\n\n")]
    with_speaker = sum(bool(re.fullmatch(r"[^\n]+:\n[^\n]+(\n[^\n]+)*", b)) for b in blocks)
    assert with_speaker / len(blocks) > 0.99


def _build_script():
    """scripts/build_shakespeare.py, imported as a module (it is not part of the package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "build_shakespeare.py"
    spec = importlib.util.spec_from_file_location("build_shakespeare", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_markdown_stripping_rules():
    markdown = (
        "# A Play\n\n## ACT I\n\n### SCENE I. A field of battle, with a header that\n\nwraps.\n\n"
        "_Enter KING, with a long\nstage direction_\n\n"
        "**KING**  \n__\\[Aside]_  \nNow is the winter\\--of our discontent;  \n"
        "Made glorious summer\u2014by this sun.\n\n_Exit QUEEN_\n\nAnd all the clouds.\n\n"
        "BISHOP\n\n**OF ELY**  \n[Within]_  \nAmen.\n\n**GHOST**  \n*Exit.*\n"
    )
    title, text = _build_script()._strip_play_markdown(markdown)
    assert title == "A Play"
    assert text == (
        "KING:\nNow is the winter--of our discontent;\nMade glorious summer--by this sun.\n"
        "And all the clouds.\n\nBISHOP OF ELY:\nAmen."
    )


def test_shipped_corpus_matches_its_checksum_and_the_build_script():
    raw = lzma.decompress(data._SHAKESPEARE_FILE.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == data.SHAKESPEARE_SHA256
    payload = json.loads(raw)
    rows = [(p["title"], p["text"]) for p in payload["plays"]]
    # the script's canonical encoding of those rows gives back the very same bytes and checksum
    assert _build_script().encode(rows) == (raw, data.SHAKESPEARE_SHA256)
    assert len(rows) == 38 and data._SHAKESPEARE_FILE.stat().st_size < 2_000_000


@pytest.mark.parametrize("damage", ["edited", "truncated", "missing"])
def test_damaged_corpus_fails_clearly(tmp_path, monkeypatch, damage):
    good = data._SHAKESPEARE_FILE.read_bytes()
    bad = tmp_path / "shakespeare_plays.json.xz"
    if damage == "edited":  # valid xz, different text: only the checksum can tell
        raw = lzma.decompress(good).replace(b"To be, or not to be", b"To be, or not to bee")
        bad.write_bytes(lzma.compress(raw))
        expected = (RuntimeError, r"SHA-256 [0-9a-f]{64}, expected " + data.SHAKESPEARE_SHA256)
    elif damage == "truncated":
        bad.write_bytes(good[: len(good) // 2])
        expected = (RuntimeError, "damaged")
    else:
        expected = (FileNotFoundError, "missing from the moe_course package")
    monkeypatch.setattr(data, "_SHAKESPEARE_FILE", bad)
    data._corpus.cache_clear()
    try:
        with pytest.raises(expected[0], match=expected[1]):
            load_shakespeare()
    finally:
        monkeypatch.undo()
        data._corpus.cache_clear()


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_and_sorted_vocab():
    text = "To be, or not to be:\nthat is the question."
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == len(set(text)) + 1 == len(tok)
    assert list(tok.chars) == sorted(set(text))
    ids = tok.encode(text)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert min(ids) >= 1 and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text
    assert tok.decode(np.array(ids)) == text
    # the vocabulary depends on the character set only, not on order or on how texts are grouped
    assert CharTokenizer().fit(["question.", text[::-1]]) == tok
    assert CharTokenizer.from_text(text).encode("be") == tok.encode("be")


def test_tokenizer_unknown_chars():
    tok = CharTokenizer.from_text("abc")
    assert tok.unk_id == 0 and tok.unk_token == "<unk>"
    assert tok.encode("axb\u2014c\U0001f600") == [1, 0, 2, 0, 3, 0]
    assert tok.decode([1, 0, 3]) == "a\ufffdc"
    np.testing.assert_array_equal(tok.encode_array("cab"), np.array([3, 1, 2]))
    assert tok.encode("") == []
    assert tok.decode([]) == ""


def test_tokenizer_save_load(tmp_path):
    tok = CharTokenizer.from_text("héllo wörld\n\t")
    path = tok.save(tmp_path / "tok.json")
    loaded = CharTokenizer.load(path)
    assert loaded == tok
    assert loaded.encode("wörld?") == tok.encode("wörld?")
    (tmp_path / "bad.json").write_text('{"chars": ["a"]}')
    with pytest.raises(ValueError, match="CharTokenizer"):
        CharTokenizer.load(tmp_path / "bad.json")
    (tmp_path / "garbage.json").write_text("not json")
    with pytest.raises(ValueError, match="path"):
        CharTokenizer.load(tmp_path / "garbage.json")
    with pytest.raises(FileNotFoundError, match="path"):
        CharTokenizer.load(tmp_path / "missing.json")


def test_tokenizer_validation():
    tok = CharTokenizer.from_text("ab")
    with pytest.raises(ValueError, match="ids"):
        tok.decode([5])
    with pytest.raises(ValueError, match="ids"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="ids"):
        tok.decode(np.array([1.0]))
    with pytest.raises(TypeError, match="text"):
        tok.encode(["a"])
    with pytest.raises(TypeError, match="texts"):
        CharTokenizer().fit([1, 2])
    with pytest.raises(TypeError, match="texts"):
        CharTokenizer().fit(3)
    with pytest.raises(ValueError, match="texts"):
        CharTokenizer.from_text("")
    with pytest.raises(ValueError, match="chars"):
        CharTokenizer(["ab"])
    with pytest.raises(RuntimeError, match="fit"):
        CharTokenizer().encode("a")


# ----------------------------------------------------------------------------- lm_blocks
def test_lm_blocks_windows():
    ds = datasets.Dataset.from_dict({"text": ["abcd", "efg"], "other": [1, 2]})
    tok = CharTokenizer.from_text("\n\n".join(ds["text"]))  # the separator is text too
    blocks = lm_blocks(ds, tok, block_size=2)
    # "abcd\n\nefg" = 9 chars -> 3 non-overlapping windows of 3
    assert len(blocks) == 3 and blocks.column_names == ["input_ids"]
    ids = blocks[:]["input_ids"]
    assert isinstance(ids, torch.Tensor) and ids.dtype == torch.int64 and ids.shape == (3, 3)
    assert [tok.decode(row) for row in ids] == ["abc", "d\n\n", "efg"]
    assert len(lm_blocks(ds, tok, block_size=3)) == 2  # the 1-char tail is dropped


def test_lm_blocks_full_corpus(shakespeare):
    val = shakespeare["validation"]
    tok = CharTokenizer.from_text(shakespeare["train"]["text"])
    blocks = lm_blocks(val, tok, block_size=128)
    total = sum(map(len, val["text"])) + 2 * (len(val) - 1)
    assert len(blocks) == total // 129
    ids = blocks[:8]["input_ids"]
    assert ids.shape == (8, 129) and ids.dtype == torch.int64
    assert int(ids.max()) < tok.vocab_size
    assert tok.decode(blocks[0]["input_ids"]) == "\n\n".join(val["text"])[:129]


def test_lm_blocks_validation():
    ds = datasets.Dataset.from_dict({"text": ["hello"]})
    tok = CharTokenizer.from_text("hello")
    with pytest.raises(TypeError, match="dataset"):
        lm_blocks(datasets.DatasetDict({"train": ds}), tok, 2)
    with pytest.raises(ValueError, match="block_size"):
        lm_blocks(ds, tok, 0)
    with pytest.raises(ValueError, match="block_size"):
        lm_blocks(ds, tok, 5)  # 5 tokens < block_size + 1
    with pytest.raises(ValueError, match="text_column"):
        lm_blocks(ds, tok, 2, text_column="body")
    with pytest.raises(ValueError, match="empty"):
        lm_blocks(ds.select([]), tok, 2)


# ----------------------------------------------------------------------------- MNIST-1D
def test_mnist1d_shapes_and_dtypes():
    ds = load_mnist1d(num_samples=1005)  # rounded down to whole classes, split 80/20
    assert list(ds) == ["train", "test"]
    assert len(ds["train"]) == 800 and len(ds["test"]) == 200
    batch = ds["train"][:]
    assert batch["x"].shape == (800, 40) and batch["x"].dtype == torch.float32
    assert batch["y"].dtype == torch.int64
    assert set(batch["y"].tolist()) == set(range(10))
    assert torch.isfinite(batch["x"]).all()


def test_mnist1d_deterministic_per_seed():
    a = load_mnist1d(seed=3, num_samples=500)
    data._mnist1d_arrays.cache_clear()  # really regenerate, not just hit the cache
    b = load_mnist1d(seed=3, num_samples=500)
    c = load_mnist1d(seed=4, num_samples=500)
    assert torch.equal(a["train"][:]["x"], b["train"][:]["x"])
    assert torch.equal(a["test"][:]["y"], b["test"][:]["y"])
    assert not torch.equal(a["train"][:]["x"], c["train"][:]["x"])


def test_mnist1d_leaves_global_rng_alone():
    random.seed(7)
    np.random.seed(7)
    expected = (random.random(), float(np.random.rand()))
    random.seed(7)
    np.random.seed(7)
    load_mnist1d(seed=11, num_samples=100)
    assert (random.random(), float(np.random.rand())) == expected


def test_mnist1d_validation_split():
    full = load_mnist1d(seed=5, num_samples=500)
    ds = load_mnist1d(seed=5, num_samples=500, val_fraction=0.25)
    assert list(ds) == ["train", "validation", "test"]
    assert len(ds["validation"]) == 100 and len(ds["train"]) == 300
    joined = torch.cat([ds["train"][:]["x"], ds["validation"][:]["x"]])
    assert torch.equal(joined, full["train"][:]["x"])
    assert torch.equal(ds["test"][:]["x"], full["test"][:]["x"])


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        ({"num_samples": 5}, ValueError, "num_samples"),
        ({"num_samples": 100.0}, TypeError, "num_samples"),
        ({"seed": -1}, ValueError, "seed"),
        ({"val_fraction": 1.0}, ValueError, "val_fraction"),
        ({"num_samples": 10, "val_fraction": 0.01}, ValueError, "val_fraction"),
    ],
)
def test_mnist1d_validation(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        load_mnist1d(**kwargs)


# ----------------------------------------------------------------------------- load_text_dataset
def test_load_text_file_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first file, ünïcode\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored")
    one = load_text_dataset(tmp_path / "a.txt")
    assert isinstance(one, datasets.Dataset)
    assert one.column_names == ["text"] and one["text"] == ["first file, ünïcode\n"]
    many = load_text_dataset(str(tmp_path), text_column="body")
    assert many.column_names == ["body"]
    assert list(many["body"]) == ["first file, ünïcode\n", "second file\n"]
    tok = CharTokenizer.from_text(many["body"])
    assert len(lm_blocks(many, tok, 4, text_column="body")) > 0


def test_load_text_local_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="name_or_path"):
        load_text_dataset(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="name_or_path"):
        load_text_dataset("missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="name_or_path"):
        load_text_dataset(tmp_path / "empty")
    (tmp_path / "table.csv").write_text("a,b")
    with pytest.raises(ValueError, match="name_or_path"):
        load_text_dataset(tmp_path / "table.csv")
    with pytest.raises(TypeError, match="name_or_path"):
        load_text_dataset(42)


def test_load_text_hub_path(monkeypatch):
    calls = []

    def fake_load_dataset(name, split=None, **kwargs):
        calls.append((name, split))
        return datasets.Dataset.from_dict({"text": ["from the hub"], "id": [0]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_text_dataset("someone/some_corpus", split="validation")
    assert calls == [("someone/some_corpus", "validation")]
    assert ds["text"] == ["from the hub"]
    with pytest.raises(ValueError, match="text_column"):
        load_text_dataset("someone/some_corpus", text_column="content")


def test_load_text_hub_offline(monkeypatch):
    def offline(name, split=None, **kwargs):
        raise ConnectionError("Couldn't reach 'x' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match="offline.*local .txt file") as info:
        load_text_dataset("someone/some_corpus")
    assert isinstance(info.value.__cause__, ConnectionError)


def test_load_text_hub_other_errors_propagate(monkeypatch):
    def missing(name, split=None, **kwargs):
        raise FileNotFoundError("no such dataset")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(FileNotFoundError, match="no such dataset"):
        load_text_dataset("someone/typo")


# ----------------------------------------------------------------------------- batches
@pytest.fixture()
def numbers():
    return datasets.Dataset.from_dict({"i": list(range(10)), "x": [[float(i)] * 3 for i in range(10)]}).with_format(
        "torch"
    )


def test_batches_deterministic_and_seeded(numbers):
    first = [b["i"].tolist() for b in batches(numbers, 3, seed=1)]
    again = [b["i"].tolist() for b in batches(numbers, 3, seed=1)]
    other = [b["i"].tolist() for b in batches(numbers, 3, seed=2)]
    assert first == again
    assert first != other
    assert [len(b) for b in first] == [3, 3, 3]  # drop_last
    assert len({i for b in first for i in b}) == 9


def test_batches_cover_everything_without_drop_last(numbers):
    out = list(batches(numbers, 4, seed=0, drop_last=False))
    assert [len(b["i"]) for b in out] == [4, 4, 2]
    assert sorted(torch.cat([b["i"] for b in out]).tolist()) == list(range(10))
    batch = out[0]
    assert isinstance(batch["x"], torch.Tensor) and batch["x"].shape == (4, 3)
    assert torch.equal(batch["x"][:, 0].long(), batch["i"])  # rows stay aligned


def test_batches_in_order_and_plain_format(numbers):
    plain = numbers.with_format(None)
    out = list(batches(plain, 5, shuffle=False))
    assert [b["i"].tolist() for b in out] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert list(batches(numbers, 11)) == []  # drop_last: a dataset smaller than one batch


def test_batches_does_not_touch_global_rng(numbers):
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    list(batches(numbers, 2, seed=3))
    assert torch.equal(torch.rand(2), expected)


def test_batches_errors(numbers):
    with pytest.raises(ValueError, match="batch_size"):
        batches(numbers, 0)  # raises at the call, before iteration
    with pytest.raises(TypeError, match="batch_size"):
        next(batches(numbers, 2.0))
    with pytest.raises(ValueError, match="dataset is empty"):
        next(batches(numbers.select([]), 2))
    with pytest.raises(TypeError, match="dataset"):
        next(batches(datasets.DatasetDict({"train": numbers}), 2))


def test_batches_bulk_and_arrow_paths_agree(numbers, monkeypatch):
    mixed = numbers.add_column("name", [f"row{i}" for i in range(10)])
    fast = list(batches(mixed, 4, seed=5, drop_last=False))
    monkeypatch.setattr(data, "_MATERIALIZE_BYTES", -1)  # force one arrow read per batch
    slow = list(batches(mixed, 4, seed=5, drop_last=False))
    assert len(fast) == len(slow) == 3
    for a, b in zip(fast, slow):
        assert a.keys() == b.keys()
        assert torch.equal(a["i"], b["i"]) and torch.equal(a["x"], b["x"])
        assert list(a["name"]) == list(b["name"]) == [f"row{i}" for i in a["i"].tolist()]


def test_arrays_to_dataset_keeps_rows_of_any_shape():
    images = np.arange(2 * 1 * 3 * 3, dtype=np.float32).reshape(2, 1, 3, 3)
    ds = data._arrays_to_dataset({"x": images, "y": np.array([4, 5], dtype=np.int64)}).with_format("torch")
    assert ds[:]["x"].shape == (2, 1, 3, 3) and ds[:]["x"].dtype == torch.float32
    np.testing.assert_array_equal(ds[1]["x"].numpy(), images[1])
    assert ds[:]["y"].dtype == torch.int64


def test_digits_loader_is_offline_and_split_like_mnist1d():
    ds = data.load_digits()
    assert list(ds) == ["train", "validation", "test"]
    assert all(d.format["type"] == "torch" for d in ds.values())
    assert ds["train"].features["y"].dtype == "int64"
    assert sum(len(d) for d in ds.values()) == 1797
