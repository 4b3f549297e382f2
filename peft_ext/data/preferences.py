"""Preference pairs with a checkable answer, for DPO: two-digit addition, chosen = right sum, rejected = wrong.

The wrong sums are the mistakes a model makes (off by one, off by ten, a dropped carry), so the preference is
informative rather than trivially separable.
"""

from __future__ import annotations

import random


def addition_problem(a: int, b: int) -> str:
    return f"Question: What is {a} + {b}?\nAnswer:"


def addition_operands(n: int, seed: int) -> list[tuple[int, int]]:
    """`n` distinct pairs of two-digit numbers drawn from `seed`."""
    rng = random.Random(seed)
    pairs: dict[tuple[int, int], None] = {}
    while len(pairs) < n:
        pairs[(rng.randint(10, 99), rng.randint(10, 99))] = None
    return list(pairs)


def wrong_sums(a: int, b: int) -> list[int]:
    """Plausible mistakes: off by one, off by ten (which includes a dropped or invented carry)."""
    return sorted({a + b - 1, a + b + 1, a + b - 10, a + b + 10})


def addition_preferences(n: int = 64, seed: int = 0) -> list[dict]:
    """`n` problems as {prompt, chosen, rejected} (TRL's plain-text preference format)."""
    rng = random.Random(seed + 1000)  # the choice of mistake, independent of the operands' draw
    return [
        dict(prompt=addition_problem(a, b), chosen=f" {a + b}", rejected=f" {rng.choice(wrong_sums(a, b))}")
        for a, b in addition_operands(n, seed)
    ]


def addition_probes(n: int = 32, seed: int = 1) -> list[dict]:
    """Multiple-choice probes of the same task: the right sum and three plausible wrong ones."""
    rng = random.Random(seed + 1000)
    probes = []
    for a, b in addition_operands(n, seed):
        options = [str(a + b)] + [str(s) for s in rng.sample(wrong_sums(a, b), 3)]
        rng.shuffle(options)
        probes.append(dict(question=addition_problem(a, b), options=options, answer=options.index(str(a + b))))
    return probes
