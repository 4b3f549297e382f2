"""Real English prose for language-model loss, always present offline: CPython's own documentation.

The stdlib module `pydoc_data.topics` holds the text of the Python reference manual's topics (what `help()`
shows). We keep its prose paragraphs (no code, no lists, >= 200 characters, almost only letters and
punctuation), in a fixed order. Every `HELDOUT_EVERY`-th paragraph is held out for measuring forgetting; the
rest can serve as training text. The exact paragraphs follow the running Python's version of the docs.
"""

from __future__ import annotations

import re

HELDOUT_EVERY = 4
MIN_CHARS = 200
PROSE_CHARS = " ,.;:()'-\u2018\u2019"


def _is_prose(paragraph: str) -> bool:
    text = " ".join(paragraph.split())
    if paragraph[:1] in (" ", "*") or len(text) < MIN_CHARS:
        return False  # indented code/quotes, bullet lists, headings and short fragments
    return sum(c.isalpha() or c in PROSE_CHARS for c in text) / len(text) >= 0.95


def python_doc_paragraphs() -> list[str]:
    """Every distinct prose paragraph of the Python reference topics, whitespace-normalised, in topic order."""
    from pydoc_data.topics import topics

    paragraphs: dict[str, None] = {}  # several topics repeat a paragraph: keep its first place only
    for name in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            if _is_prose(paragraph):
                paragraphs.setdefault(" ".join(paragraph.split()))
    return list(paragraphs)


def english_text(split: str = "heldout", limit: int | None = None) -> list[str]:
    """Paragraphs of `split` ("heldout": every 4th, for evaluation; "train": the others), the first `limit`."""
    if split not in ("heldout", "train"):
        raise ValueError(f'english_text split must be "heldout" or "train", got {split!r}')
    paragraphs = python_doc_paragraphs()
    chosen = [p for i, p in enumerate(paragraphs) if (i % HELDOUT_EVERY == 0) == (split == "heldout")]
    return chosen[:limit] if limit is not None else chosen
