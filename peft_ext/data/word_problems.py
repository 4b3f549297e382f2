"""Arithmetic word problems with exact answers: a generated task for small-scale reproductions.

    word_problems(n, seed)           [{"prompt", "completion", "answer", "op"}]   n distinct problems
    word_problem_splits(n_train, n_eval, seed)   (train, held_out): no (operation, numbers) pair in both

    "Mia has 23 marbles. She finds 14 more. How many marbles does Mia have now?\\nAnswer:" -> " 37"

Each problem is one of a few story templates around one operation (addition, subtraction, multiplication of
small numbers), with random names, objects and numbers; the answer is a non-negative integer. Scoring is exact:
`peft_ext.evaluation.exact_match` (greedy completion = the answer) or any integer parser. The prompt ends on a
token boundary ("Answer:"), the completion is " " + the number, so a tokenizer that splits digits sees the same
tokens in training and at evaluation.
"""

from __future__ import annotations

import random

NAMES = (
    "Mia", "Noah", "Emma", "Liam", "Ava", "Lucas", "Zoe", "Omar", "Lena", "Ravi", "Sofia", "Ivan", "Nora", "Theo",
    "Aisha", "Jonas", "Maya", "Felix", "Chloe", "Mateo", "Hana", "Diego", "Ella", "Kofi",
)  # fmt: skip
SHE = {"Mia", "Emma", "Ava", "Zoe", "Lena", "Sofia", "Nora", "Aisha", "Maya", "Chloe", "Hana", "Ella"}
PRONOUN = {name: "She" if name in SHE else "He" for name in NAMES}
OBJECTS = (
    "marbles", "apples", "stickers", "books", "pencils", "coins", "shells", "cards", "stamps", "cookies", "balloons",
    "buttons", "eggs", "candles", "ribbons", "beads",
)  # fmt: skip
CONTAINERS = ("boxes", "bags", "jars", "baskets", "trays", "packs")

OPERATIONS = ("add", "sub", "mul")


def _problem(rng: random.Random, op: str) -> tuple[str, int, tuple]:
    name, other = rng.sample(NAMES, 2)
    he, thing = PRONOUN[name], rng.choice(OBJECTS)
    style = rng.randrange(2)
    if op == "add":
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        text = (
            f"{name} has {a} {thing}. {he} finds {b} more. How many {thing} does {name} have now?",
            f"{name} has {a} {thing} and {other} has {b} {thing}. How many {thing} do they have together?",
        )[style]
        return text, a + b, (op, a, b)
    if op == "sub":
        a = rng.randint(10, 60)
        b = rng.randint(1, a - 1)
        text = (
            f"{name} has {a} {thing}. {he} gives {b} to {other}. How many {thing} does {name} have left?",
            f"There were {a} {thing} on the table. {name} took {b} of them. How many {thing} are still on the table?",
        )[style]
        return text, a - b, (op, a, b)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    box = rng.choice(CONTAINERS)
    text = (
        f"{name} has {a} {box} with {b} {thing} in each. How many {thing} does {name} have in all?",
        f"{name} buys {a} {box} of {thing}. Each one holds {b} {thing}. How many {thing} did {name} buy?",
    )[style]
    return text, a * b, (op, a, b)


def _item(text: str, answer: int, key: tuple) -> dict:
    return dict(prompt=f"{text}\nAnswer:", completion=f" {answer}", answer=answer, op=key[0], key=list(key))


def word_problem_splits(n_train: int = 512, n_eval: int = 150, seed: int = 0, ops=OPERATIONS) -> tuple[list, list]:
    """(train, held_out) problems, deterministic for the arguments. The operations take turns; no (operation, a, b)
    appears in both splits (the held-out items are new numbers, not new wordings of trained ones), and no prompt
    repeats within a split."""
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"word_problem_splits: sizes must be >= 0, got n_train={n_train}, n_eval={n_eval}")
    unknown = sorted(set(ops) - set(OPERATIONS))
    if unknown or not ops:
        raise ValueError(f"word_problem_splits: unknown operation(s) {unknown}; choose from {list(OPERATIONS)}")
    rng = random.Random(f"word-problems-{seed}")
    held_out, train, eval_keys, prompts = [], [], set(), set()
    # the held-out items first, so that the train split never takes their numbers
    for target, out in ((n_eval, held_out), (n_train, train)):
        tries = 0
        while len(out) < target:
            tries += 1
            if tries > 200 * (target + 10):
                raise ValueError(f"word_problem_splits: cannot draw {target} distinct problems for ops {list(ops)}")
            op = ops[len(out) % len(ops)]
            text, answer, key = _problem(rng, op)
            if text in prompts or (out is train and key in eval_keys):
                continue
            prompts.add(text)
            if out is held_out:
                eval_keys.add(key)
            out.append(_item(text, answer, key))
    return train, held_out


def word_problems(n: int = 256, seed: int = 0, ops=OPERATIONS) -> list[dict]:
    """n distinct problems (the held-out split's generator, no train split)."""
    return word_problem_splits(0, n, seed, ops)[1]
