"""Fault injection on the zoo cache: concurrent first use, a writer killed mid-write, truncated or
foreign files, an unwritable cache directory, and no unpickling anywhere in the package.

Every fault uses the small ``test`` preset of ``mnist1d-moe`` (about 2 s of training) in a
temporary cache; a pristine entry is trained once per module and copied for each test.
"""

from __future__ import annotations

import ast
import builtins
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moe_course
from moe_course import zoo

pytestmark = pytest.mark.usefixtures("single_thread")

NAME, PRESET = "mnist1d-moe", "test"
PACKAGE = Path(moe_course.__file__).parent


def _state_sha(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, str]:
    """A freshly trained entry (its directory) and the sha256 of its state dict."""
    root = tmp_path_factory.mktemp("pristine")
    model = zoo.pretrained(NAME, preset=PRESET, cache_dir=root, progress=False)
    return zoo.entry_dir(NAME, PRESET, cache_dir=root), _state_sha(model)


@pytest.fixture()
def cache(tmp_path, monkeypatch, pristine) -> Path:
    """A cache holding a copy of the pristine entry, selected through $MOE_COURSE_CACHE."""
    root = tmp_path / "cache"
    entry_src, _ = pristine
    shutil.copytree(entry_src, root / entry_src.name)
    monkeypatch.setenv(zoo.ENV_VAR, str(root))
    return root


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, zoo.ENV_VAR: str(cache), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1",
            "OMP_WAIT_POLICY": "PASSIVE"}


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name.startswith((".tmp-", ".old-")))


# --------------------------------------------------------------------------------------------
# two processes ask at the same moment
# --------------------------------------------------------------------------------------------
_RACER = textwrap.dedent(
    """
    import hashlib, json, os, sys, time
    import torch
    torch.set_num_threads(1)
    from moe_course import zoo

    log, go = sys.argv[1], sys.argv[2]
    real_fit = zoo.fit
    def counting_fit(*args, **kwargs):  # records every training that really happens
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\\n")
        return real_fit(*args, **kwargs)
    zoo.fit = counting_fit
    print("ready", flush=True)
    while not os.path.exists(go):  # start barrier: both call pretrained() at the same moment
        time.sleep(0.005)
    model = zoo.pretrained("mnist1d-moe", preset="test", progress=False)
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    print(json.dumps({"source": model.zoo_info["source"], "run_id": model.zoo_info["run_id"],
                      "sha": h.hexdigest()}), flush=True)
    """
)


def test_two_processes_at_once_train_once_and_load_the_same_weights(tmp_path, pristine):
    cache = tmp_path / "cache"
    log, go = tmp_path / "trainings.log", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(log), str(go)], env=_env(cache),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        go.touch()
        outputs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert len(log.read_text().split()) == 1  # exactly one training between the two processes
    assert sorted(r["source"] for r in results) == ["cache", "trained"]
    assert results[0]["run_id"] == results[1]["run_id"]
    assert results[0]["sha"] == results[1]["sha"] == pristine[1]  # and it is the deterministic model
    assert _leftovers(cache) == []


# --------------------------------------------------------------------------------------------
# a writer killed in the middle
# --------------------------------------------------------------------------------------------
_KILLED = textwrap.dedent(
    """
    import sys, time
    import torch
    torch.set_num_threads(1)
    import safetensors.torch
    from moe_course import zoo

    mode = sys.argv[1]
    def hang():
        print("writing", flush=True)
        time.sleep(600)

    if mode == "save":  # half of model.safetensors is on disk when the process dies
        real = safetensors.torch.save_file
        def half_save(tensors, path, *args, **kwargs):
            real(tensors, path, *args, **kwargs)
            data = open(path, "rb").read()
            open(path, "wb").write(data[: len(data) // 2])
            hang()
        safetensors.torch.save_file = half_save
    else:  # "publish": the old entry is moved away, the new one not yet renamed into place
        def half_publish(tmp, entry):
            zoo.os.replace(entry, entry.parent / f".old-{entry.name}-killed")
            hang()
        zoo._publish = half_publish
    zoo.pretrained("mnist1d-moe", preset="test", retrain=True, progress=False)
    """
)


@pytest.mark.parametrize("mode", ["save", "publish"])
def test_writer_killed_mid_write_leaves_no_entry_and_the_next_call_rebuilds(cache, pristine, mode):
    entry = zoo.entry_dir(NAME, PRESET)
    if mode == "save":
        shutil.rmtree(entry)  # first use: nothing cached yet
    proc = subprocess.Popen([sys.executable, "-c", _KILLED, mode], env=_env(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line == "writing", proc.stderr.read()[-2000:] if not line else line
        os.kill(proc.pid, signal.SIGKILL)  # killed while holding the lock, mid-write
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)  # reap it and close its pipes
    assert proc.returncode == -signal.SIGKILL
    assert not entry.exists() and not zoo.is_cached(NAME, PRESET)  # never a half-written entry
    assert _leftovers(cache)  # the killed writer's debris

    import fcntl

    with open(cache / (entry.name + ".lock"), "a+") as fh:  # the dead process's lock is free again
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    model = zoo.pretrained(NAME, preset=PRESET, progress=False)
    assert model.zoo_info["source"] == "trained" and _state_sha(model) == pristine[1]
    assert _leftovers(cache) == []  # debris removed under the lock
    assert zoo.pretrained(NAME, preset=PRESET).zoo_info["source"] == "cache"


# --------------------------------------------------------------------------------------------
# truncated, garbage and foreign files
# --------------------------------------------------------------------------------------------
def _truncate_weights(entry: Path) -> None:
    p = entry / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _foreign_weights_same_shapes(entry: Path) -> None:
    """A valid safetensors file with the right keys and shapes but other values (another run)."""
    p = entry / "model.safetensors"
    state = load_file(p)
    save_file({k: (v + 1 if v.is_floating_point() else v) for k, v in state.items()}, p)


def _foreign_weights_other_model(entry: Path) -> None:
    save_file({"weight": torch.zeros(3, 3)}, entry / "model.safetensors")


def _garbage_config(entry: Path) -> None:
    (entry / "config.json").write_bytes(b"\x00\xff{{ not json")


def _config_not_an_object(entry: Path) -> None:
    (entry / "config.json").write_text("[1, 2, 3]")


def _metadata(entry: Path, **changes) -> None:
    p = entry / "metadata.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **changes}))


def _metadata_other_version(entry: Path) -> None:
    _metadata(entry, zoo_version=zoo.ZOO_VERSION + 1)


def _metadata_other_entry(entry: Path) -> None:
    _metadata(entry, key=hashlib.sha256(b"another entry").hexdigest())


def _metadata_not_an_object(entry: Path) -> None:
    (entry / "metadata.json").write_text('"hello"')


def _partial_entry(entry: Path) -> None:  # e.g. an interrupted copy of a cache
    (entry / "metadata.json").unlink()
    _truncate_weights(entry)


# fault -> (injection, the reason in the warning, whether the cheap is_cached() already sees it;
# the weights' content is only checked, by checksum or by loading, in pretrained())
FAULTS = {
    "truncated weights": (_truncate_weights, "unusable", False),
    "foreign weights, same shapes": (_foreign_weights_same_shapes, "SHA-256", False),
    "foreign weights, other model": (_foreign_weights_other_model, "unusable", False),
    "garbage config.json": (_garbage_config, "JSONDecodeError|UnicodeDecodeError", True),
    "config.json not an object": (_config_not_an_object, "config mismatch", True),
    "metadata.json of another zoo version": (_metadata_other_version, "metadata mismatch", True),
    "metadata.json of another entry": (_metadata_other_entry, "metadata mismatch", True),
    "metadata.json not an object": (_metadata_not_an_object, "metadata mismatch", True),
    "partial entry": (_partial_entry, "missing file metadata.json", True),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_corrupt_or_foreign_entry_is_detected_and_rebuilt(cache, pristine, fault):
    inject, reason, cheap = FAULTS[fault]
    entry = zoo.entry_dir(NAME, PRESET)
    assert zoo.pretrained(NAME, preset=PRESET).zoo_info["source"] == "cache"  # the copy is valid
    assert zoo.is_cached(NAME, PRESET)
    inject(entry)
    assert zoo.is_cached(NAME, PRESET) is not cheap  # and it never raises on a broken entry
    with pytest.warns(UserWarning, match=reason):
        model = zoo.pretrained(NAME, preset=PRESET, progress=False)
    assert model.zoo_info["source"] == "trained"  # rebuilt, not loaded
    assert _state_sha(model) == pristine[1]
    again = zoo.pretrained(NAME, preset=PRESET)
    assert again.zoo_info["source"] == "cache" and _state_sha(again) == pristine[1]
    assert _leftovers(cache) == []


def test_new_entries_record_the_checksum_of_their_weights(cache):
    entry = zoo.entry_dir(NAME, PRESET)
    meta = json.loads((entry / "metadata.json").read_text())
    assert meta["weights_sha256"] == hashlib.sha256((entry / "model.safetensors").read_bytes()).hexdigest()
    assert meta["key"] == zoo._key(zoo._spec(NAME, PRESET)) and meta["zoo_version"] == zoo.ZOO_VERSION


def test_entries_without_a_checksum_still_load(cache):
    """Entries written before the checksum existed stay valid (the user's warm cache is kept)."""
    entry = zoo.entry_dir(NAME, PRESET)
    meta = json.loads((entry / "metadata.json").read_text())
    del meta["weights_sha256"]
    (entry / "metadata.json").write_text(json.dumps(meta))
    assert zoo.pretrained(NAME, preset=PRESET).zoo_info["source"] == "cache"


# --------------------------------------------------------------------------------------------
# a cache directory that cannot be written
# --------------------------------------------------------------------------------------------
@pytest.fixture()
def read_only(monkeypatch):
    """Make directories read-only (chmod 0555); as root, where chmod does not stop writes, also
    refuse, with EACCES, every write the process tries below them (a read-only mount)."""
    made: list[Path] = []

    def make(path: Path) -> Path:
        for p in [path, *path.rglob("*")]:
            if p.is_dir():
                p.chmod(0o555)
        made.append(path.resolve())
        return path

    def _inside(path) -> bool:
        try:
            p = Path(os.fsdecode(path)).resolve()
        except (TypeError, ValueError):
            return False
        return any(p == root or root in p.parents for root in made)

    if os.geteuid() == 0:
        real_open, real_mkdir = builtins.open, os.mkdir

        def guarded_open(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+") and _inside(file):
                raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(file))
            return real_open(file, mode, *args, **kwargs)

        def guarded_mkdir(path, *args, **kwargs):
            if _inside(path):
                raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", guarded_open)
        monkeypatch.setattr(os, "mkdir", guarded_mkdir)
    yield make
    for root in made:
        for p in [root, *root.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)


def test_read_only_cache_still_serves_valid_entries(cache, pristine, read_only):
    read_only(cache)
    model = zoo.pretrained(NAME, preset=PRESET)
    assert model.zoo_info["source"] == "cache" and _state_sha(model) == pristine[1]


def test_read_only_cache_needing_a_write_names_the_directory_and_the_env_var(tmp_path, monkeypatch, read_only):
    root = tmp_path / "ro"
    root.mkdir()
    monkeypatch.setenv(zoo.ENV_VAR, str(root))
    read_only(root)
    with pytest.raises(PermissionError) as info:
        zoo.pretrained(NAME, preset=PRESET, progress=False)
    msg = str(info.value)
    assert str(root) in msg and zoo.ENV_VAR in msg and "writable" in msg
    assert not zoo.is_cached(NAME, PRESET)


def test_cache_path_below_a_file_gives_the_same_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match=f"{zoo.ENV_VAR}.*writable"):
        zoo.pretrained(NAME, preset=PRESET, cache_dir=blocker / "cache", progress=False)


# --------------------------------------------------------------------------------------------
# checkpoints load through safetensors only: no unpickling anywhere in the package
# --------------------------------------------------------------------------------------------
_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """Calls and imports in ``source`` that can unpickle: ``torch.load`` without
    ``weights_only=True``, the pickle family, ``numpy.load(allow_pickle=True)``, ``pandas.read_pickle``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for m in mods:
                if m.split(".")[0] in _PICKLE_MODULES:
                    found.append(f"{filename}:{node.lineno}: import {m}")
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            if name.endswith("load") and name.split(".")[0] in {"torch", "th"} and not safe:
                found.append(f"{filename}:{node.lineno}: {name} without weights_only=True")
            elif name.split(".")[-1] in {"read_pickle", "Unpickler"}:
                found.append(f"{filename}:{node.lineno}: {name}")
            elif name.split(".")[-1] == "load" and name.split(".")[0] in {"np", "numpy"}:
                ap = kw.get("allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    found.append(f"{filename}:{node.lineno}: {name} with allow_pickle")
    return found


def test_the_scanner_catches_unsafe_loads():
    assert _unsafe_loads("import torch\nsd = torch.load('x.pt')")
    assert _unsafe_loads("import torch\nsd = torch.load('x.pt', weights_only=False)")
    assert _unsafe_loads("import pickle\nobj = pickle.load(open('x', 'rb'))")
    assert _unsafe_loads("from joblib import load")
    assert _unsafe_loads("import numpy as np\nnp.load('x.npy', allow_pickle=True)")
    assert _unsafe_loads("import pandas as pd\npd.read_pickle('x')")
    assert not _unsafe_loads("import torch\nsd = torch.load('x.pt', weights_only=True, map_location='cpu')")
    assert not _unsafe_loads("from safetensors.torch import load_file\nsd = load_file('m.safetensors')")
    assert not _unsafe_loads("import json\njson.loads('{}')")


def test_the_package_never_unpickles():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    found = [hit for f in files for hit in _unsafe_loads(f.read_text(), str(f.relative_to(PACKAGE.parent)))]
    assert found == [], "checkpoints must load through safetensors or torch.load(weights_only=True):\n" + "\n".join(found)
