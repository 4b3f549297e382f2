"""A codebook to memorise: N made-up words, each with a fixed made-up code word (a random lookup table).

    codebook(n)        [{"source", "target"}]            n distinct pairs, deterministic for (n, seed)
    codebook_qa(n)     [{"prompt", "completion"}]        "Code word for naki:" -> " gasana"

Unlike a handful of facts, a random table of a few hundred entries has no structure for an adapter to exploit:
every pair is an independent association, so the update it needs grows in rank with the number of pairs (a rank-r
linear update maps at most r keys to arbitrary values). That makes it a real-model task on which a rank-1 LoRA is
limited by its rank, not by its steps (peft_ext.experiments.cola_vs_lora, recipes/cola_vs_lora_capacity.yaml).
"""

from __future__ import annotations

import random

SOURCE_CONSONANTS = "bdfgklmnprstvz"
TARGET_CONSONANTS = "bcdfghjklmnprstvwz"
VOWELS = "aeiou"


def _word(rng: random.Random, consonants: str, syllables: int) -> str:
    return "".join(rng.choice(consonants) + rng.choice(VOWELS) for _ in range(syllables))


def codebook(n: int = 256, seed: int = 0) -> list[dict]:
    """n pairs {source, target}: distinct two-syllable words, each with a distinct three-syllable code word.

    Pairs are drawn one after the other, so a smaller table is the start of a larger one with the same seed.
    """
    if n < 1 or n > 2000:
        raise ValueError(f"codebook: n must be between 1 and 2000, got {n}")
    rng = random.Random(f"codebook-{seed}")
    pairs, used = [], set()
    while len(pairs) < n:
        source, target = _word(rng, SOURCE_CONSONANTS, 2), _word(rng, TARGET_CONSONANTS, 3)
        if source not in used and target not in used:
            used |= {source, target}
            pairs.append(dict(source=source, target=target))
    return pairs


def codebook_qa(n: int = 256, seed: int = 0) -> list[dict]:
    """The table as prompt/completion pairs (TRL trains on the completion only)."""
    return [dict(prompt=f"Code word for {p['source']}:", completion=f" {p['target']}") for p in codebook(n, seed)]
