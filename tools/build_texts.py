#!/usr/bin/env python3
"""Regenerate the real-text files shipped in ``wina_fx/data/``.

Source: Debian's ``r-cran-janeaustenr`` package (the CRAN package
*janeaustenr* 1.0.0 by Julia Silge, MIT; it holds the plain text of Jane
Austen's six novels as taken from Project Gutenberg; the novels themselves are
in the public domain). Nothing here touches a model or data-set hub: the .deb
comes from the Debian archive through ``apt-get download`` (or is given with
``--deb``), and everything else is done in Python with the standard library.

Splits (disjoint source documents, i.e. different novels):

* ``calibration.txt``: *Sense and Sensibility* (1811; Gutenberg #161),
  whole chapters from chapter 1 on;
* ``evaluation.txt``:  *Persuasion* (1817/1818; Gutenberg #105),
  whole chapters from chapter 1 on.

Each split takes whole chapters, in order from the first, while the output
stays within ``TARGET_BYTES``. Cleaning: the title page, chapter and volume
headings, ``THE END``/``Finis``, editorial notes in ``[...]`` and ``***``
separators are dropped; hard-wrapped lines are joined into one line per
paragraph; ``_italic_`` markers are removed; ``--`` becomes an em dash;
runs of spaces become one. Paragraphs are separated by one blank line.

The output is deterministic: the same .deb always gives byte-identical files.

Usage::

    python tools/build_texts.py            # download, rebuild, write
    python tools/build_texts.py --check    # rebuild in memory, compare, exit 1 on difference
    python tools/build_texts.py --deb r-cran-janeaustenr_1.0.0-1_all.deb
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path
from shipped_files import write_or_check  # noqa: E402  (tools/ is the script folder)

DEB_NAME = "r-cran-janeaustenr"
DEB_VERSION = "1.0.0-1"  # Debian 12 "bookworm", main
DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
RDATA = "./usr/lib/R/site-library/janeaustenr/data/Rdata"

TARGET_BYTES = 150_000

# split -> (R object name inside the package, title, Project Gutenberg ebook number)
SPLITS: dict[str, tuple[str, str, int]] = {
    "calibration": ("sensesensibility", "Sense and Sensibility", 161),
    "evaluation": ("persuasion", "Persuasion", 105),
}

OUT_DIR = Path(__file__).resolve().parent.parent / "wina_fx" / "data"


# --------------------------------------------------------------------------- .deb


def download_deb(dest: Path) -> Path:
    """``apt-get download`` the pinned package version into ``dest``."""
    cmd = ["apt-get", "download", f"{DEB_NAME}={DEB_VERSION}"]
    try:
        subprocess.run(cmd, cwd=dest, check=True, stdout=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(
            f"could not run {' '.join(cmd)!r} ({exc}); run 'apt-get update' first, "
            f"or pass --deb PATH to a downloaded {DEB_NAME}_{DEB_VERSION}_all.deb"
        ) from exc
    debs = sorted(dest.glob(f"{DEB_NAME}_*.deb"))
    if len(debs) != 1:
        raise SystemExit(f"expected one {DEB_NAME} .deb in {dest}, found {debs}")
    return debs[0]


def read_ar(blob: bytes) -> dict[str, bytes]:
    """Members of a Unix ``ar`` archive (the container format of a .deb)."""
    if not blob.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive")
    members: dict[str, bytes] = {}
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos : pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        pos += 60
        members[name] = blob[pos : pos + size]
        pos += size + (size & 1)
    return members


def deb_files(deb: bytes, wanted: list[str]) -> dict[str, bytes]:
    """Extract ``wanted`` paths from the data.tar.* of a .deb, in memory."""
    members = read_ar(deb)
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    if data_name is None:
        raise ValueError("no data.tar.* in the .deb")
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(members[data_name]), mode="r:*") as tar:
        for path in wanted:
            member = tar.getmember(path)
            handle = tar.extractfile(member)
            assert handle is not None
            out[path] = handle.read()
    return out


# ------------------------------------------------------------- R serialization


class RReader:
    """Just enough of R's XDR serialization format (versions 2 and 3) to read
    character vectors and the lazy-load index: NULL, symbols, pairlists,
    logical/integer/double/character vectors and generic lists. Attributes are
    returned as ``RObj(value, attrs)``."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[object] = []

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def _bytes(self, n: int) -> bytes:
        value = self.data[self.pos : self.pos + n]
        self.pos += n
        return value

    def read(self) -> object:
        if self._bytes(2) != b"X\n":
            raise ValueError("not an XDR R serialization")
        version = self._int()
        self._int()  # R version that wrote it
        self._int()  # minimal R version to read it
        if version == 3:
            self._bytes(self._int())  # native encoding name
        return self._item()

    def _item(self) -> object:
        flags = self._int()
        kind = flags & 0xFF
        has_attr = flags & (1 << 9)
        has_tag = flags & (1 << 10)
        if kind in (254, 253, 252, 251, 247, 242, 241):  # NULL, envs, markers
            return None
        if kind == 255:  # REFSXP
            return self.refs[(flags >> 8) - 1]
        if kind == 1:  # SYMSXP
            sym = self._item()
            self.refs.append(sym)
            return sym
        if kind == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            raw = self._bytes(n)
            latin1 = (flags >> 12) & (1 << 2)
            return raw.decode("latin-1" if latin1 else "utf-8")
        if kind == 2:  # LISTSXP (pairlist), used for attributes
            attrs = self._item() if has_attr else None
            del attrs
            tag = self._item() if has_tag else None
            car = self._item()
            cdr = self._item()
            return [(tag, car)] + (cdr if isinstance(cdr, list) else [])
        if kind in (10, 13):  # LGLSXP, INTSXP
            n = self._int()
            value: object = list(struct.unpack(f">{n}i", self._bytes(4 * n)))
        elif kind == 14:  # REALSXP
            n = self._int()
            value = list(struct.unpack(f">{n}d", self._bytes(8 * n)))
        elif kind in (16, 19):  # STRSXP, VECSXP
            n = self._int()
            value = [self._item() for _ in range(n)]
        else:
            raise ValueError(f"unsupported R SEXP type {kind}")
        if has_attr:
            return RObj(value, dict(self._item()))  # type: ignore[arg-type]
        return value


class RObj:
    def __init__(self, value: object, attrs: dict) -> None:
        self.value = value
        self.attrs = attrs


def lazyload(rdx: bytes, rdb: bytes) -> dict[str, list[str]]:
    """Read every object of an R lazy-load database (``.rdx`` index + ``.rdb``)."""
    index = RReader(gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx[4:])).read()
    assert isinstance(index, RObj)
    fields = dict(zip(index.attrs["names"], index.value))  # variables, references, compressed
    variables = fields["variables"]
    assert isinstance(variables, RObj)
    compressed = fields["compressed"][0]
    if compressed not in (1, True):
        raise ValueError(f"unsupported lazy-load compression {compressed!r} (expected zlib)")
    out: dict[str, list[str]] = {}
    for name, (offset, length) in zip(variables.attrs["names"], variables.value):
        blob = rdb[offset : offset + length]
        (raw_len,) = struct.unpack(">I", blob[:4])
        raw = zlib.decompress(blob[4:])
        if len(raw) != raw_len:
            raise ValueError(f"{name}: length mismatch")
        out[name] = RReader(raw).read()  # type: ignore[assignment]
    return out


# --------------------------------------------------------------------- cleaning

CHAPTER_RE = re.compile(r"^\s*chapter\s+([0-9]+|[ivxlc]+)\.?\s*$", re.IGNORECASE)
DROP_PARA_RE = re.compile(
    r"^(volume\s+[ivx0-9]+|the end|finis|\*+(\s*\*+)*|\[.*\])$", re.IGNORECASE | re.DOTALL
)


def clean_paragraph(lines: list[str]) -> str:
    text = " ".join(line.strip() for line in lines)
    text = re.sub(r"_([^_]+)_", r"\1", text)  # _italic_ -> italic
    text = text.replace("_", "")
    text = text.replace("--", "\u2014")  # em dash
    text = re.sub(r"\s+", " ", text).strip()
    return text


def chapters(lines: list[str]) -> list[list[str]]:
    """Split a novel into chapters of cleaned paragraphs (front matter dropped)."""
    result: list[list[str]] = []
    current: list[str] | None = None
    block: list[str] = []

    def flush() -> None:
        if block and current is not None:
            para = clean_paragraph(block)
            if para and not DROP_PARA_RE.match(para):
                current.append(para)
        block.clear()

    for line in lines:
        line = (line or "").rstrip()
        if CHAPTER_RE.match(line):
            flush()
            current = []
            result.append(current)
        elif not line.strip():
            flush()
        else:
            block.append(line)
    flush()
    return [c for c in result if c]


def build_split(novel_lines: list[str]) -> tuple[str, int]:
    """Whole chapters from the first while within TARGET_BYTES; returns (text, chapters used)."""
    chunks: list[str] = []
    size = 0
    for chapter in chapters(novel_lines):
        chunk = "\n\n".join(chapter)
        extra = len(chunk.encode("utf-8")) + (2 if chunks else 0)
        if chunks and size + extra + 1 > TARGET_BYTES:
            break
        chunks.append(chunk)
        size += extra
    return "\n\n".join(chunks) + "\n", len(chunks)


def build(deb: bytes) -> dict[str, tuple[str, int]]:
    files = deb_files(deb, [RDATA + ".rdx", RDATA + ".rdb"])
    novels = lazyload(files[RDATA + ".rdx"], files[RDATA + ".rdb"])
    return {split: build_split(novels[obj]) for split, (obj, _, _) in SPLITS.items()}


# ------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deb", type=Path, help=f"use this {DEB_NAME} .deb instead of apt-get download")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="compare with the files in --out; write nothing")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        deb_path = args.deb if args.deb else download_deb(Path(tmp))
        deb = deb_path.read_bytes()
    digest = hashlib.sha256(deb).hexdigest()
    if digest != DEB_SHA256:
        raise SystemExit(f"{deb_path.name}: sha256 {digest} != pinned {DEB_SHA256}")

    built = build(deb)
    status = 0
    for split, (text, n_chapters) in built.items():
        _, title, ebook = SPLITS[split]
        path = args.out / f"{split}.txt"
        data = text.encode("utf-8")
        summary = (
            f"{split:12s} {title} (Gutenberg #{ebook}), chapters 1-{n_chapters}: "
            f"{len(data)} bytes, {len(text.split())} words, {text.count(chr(10) * 2) + 1} paragraphs"
        )
        status |= write_or_check(path, data, summary, args.check)
    return status


if __name__ == "__main__":
    sys.exit(main())
