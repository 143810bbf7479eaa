"""Real English text shipped with wina-fx, for calibration and perplexity evaluation.

Two disjoint splits, each from a different public-domain novel by Jane Austen
(see ``README.md`` beside this file for source, licence and sizes; rebuilt by
``tools/build_texts.py``):

* ``"calibration"``: *Sense and Sensibility*, chapters 1-15;
* ``"evaluation"``: *Persuasion*, chapters 1-9.

Each is UTF-8 plain text, one paragraph per line, paragraphs separated by a
blank line.
"""

from __future__ import annotations

from importlib import resources

SPLITS: tuple[str, ...] = ("calibration", "evaluation")

__all__ = ["SPLITS", "text"]


def text(split: str) -> str:
    """Return the whole text of ``split`` ("calibration" or "evaluation")."""
    if split not in SPLITS:
        raise ValueError(
            f"unknown text split {split!r}; valid choices: {', '.join(repr(s) for s in SPLITS)}"
        )
    return resources.files(__name__).joinpath(f"{split}.txt").read_text(encoding="utf-8")
