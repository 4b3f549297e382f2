"""Hotel reviews whose label is the majority of their opinion words: a generated binary classification task (GLUE /
SST-like, but with an exact label) for small-scale sequence-classification reproductions.

    review_votes(n, seed, opinions=5, filler=0)                 [{"text", "label", "positives", "opinions"}]
    review_vote_splits(n_train, n_eval, seed, opinions, filler)  (train, held_out): no text in both

    "Review: The staff was rude. I found the breakfast superb. The view was lovely. The bed seemed noisy to us. The
     price was excellent.\\nOverall, the stay was"  -> label 1 (3 of 5 opinions positive)

Each review states `opinions` (odd) opinions, one per sentence, about different aspects of a hotel stay, each with
an adjective from a positive or a negative list; the label is 1 when the positive ones are the majority. The number
of positive opinions is drawn uniformly from the mixed counts (1 .. opinions - 1), so no review is one-sided and the
labels are balanced: the model has to weigh several opinions, not spot one. `filler` > 0 interleaves that many
neutral sentences (dates, directions, the weather) at random places between the opinions: the same decision from
information spread over a longer input (the longer-input variant). Every review ends with "\\nOverall, the stay was",
so the last token, which a causal model's classification head reads, is where the verdict belongs.
"""

from __future__ import annotations

import random

ASPECTS = (
    "the room", "the staff", "the breakfast", "the view", "the price", "the bed", "the location", "the service",
    "the pool", "the wifi", "the bathroom", "the restaurant", "the lobby", "the shower", "the coffee", "the parking",
    "the check-in", "the garden", "the gym", "the balcony",
)  # fmt: skip
POSITIVE = (
    "wonderful", "excellent", "friendly", "clean", "superb", "lovely", "great", "pleasant", "delightful", "spotless",
    "fantastic", "charming", "comfortable", "perfect", "helpful", "amazing",
)  # fmt: skip
NEGATIVE = (
    "awful", "terrible", "rude", "dirty", "dreadful", "noisy", "poor", "horrible", "disappointing", "shabby",
    "unpleasant", "mediocre", "uncomfortable", "broken", "unhelpful", "filthy",
)  # fmt: skip
OPINION_TEMPLATES = ("{A} was {adj}.", "I found {a} {adj}.", "{A} seemed {adj} to us.", "We thought {a} was {adj}.")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
PLACES = ("the station", "the harbour", "the old town", "the museum", "the airport", "the market", "the river")
FILLER_TEMPLATES = (
    lambda r: f"We arrived on a {r.choice(DAYS)} afternoon.",
    lambda r: f"The hotel is a {r.randint(5, 25)} minute walk from {r.choice(PLACES)}.",
    lambda r: f"Our room was on floor {r.randint(2, 12)}.",
    lambda r: f"We stayed for {r.randint(2, 9)} nights in {r.choice(('May', 'June', 'July', 'March', 'October'))}.",
    lambda r: f"It rained on {r.choice(DAYS)} and we took a taxi to {r.choice(PLACES)}.",
    lambda r: f"The building has {r.randint(3, 14)} floors and a lift.",
    lambda r: f"We travelled with {r.choice(('two friends', 'my sister', 'our kids', 'a colleague', 'my parents'))}.",
    lambda r: f"Check-out is at {r.randint(10, 12)} in the morning.",
    lambda r: f"There is a bus stop near {r.choice(PLACES)}.",
    lambda r: f"We booked the trip {r.randint(2, 11)} weeks ahead.",
)
SUFFIX = "\nOverall, the stay was"


def _review(rng: random.Random, opinions: int, filler: int) -> tuple[str, int, int]:
    positives = rng.randint(1, opinions - 1)
    signs = [1] * positives + [0] * (opinions - positives)
    rng.shuffle(signs)
    sentences = []
    for aspect, positive in zip(rng.sample(ASPECTS, opinions), signs):
        adj = rng.choice(POSITIVE if positive else NEGATIVE)
        template = rng.choice(OPINION_TEMPLATES)
        sentences.append(template.format(A=aspect[0].upper() + aspect[1:], a=aspect, adj=adj))
    for _ in range(filler):  # neutral sentences at random places, opinions kept in order
        sentences.insert(rng.randint(0, len(sentences)), rng.choice(FILLER_TEMPLATES)(rng))
    text = "Review: " + " ".join(sentences) + SUFFIX
    return text, int(2 * positives > opinions), positives


def review_vote_splits(
    n_train: int = 320, n_eval: int = 200, seed: int = 0, opinions: int = 5, filler: int = 0
) -> tuple[list[dict], list[dict]]:
    """(train, held_out) reviews, deterministic for the arguments; no text occurs twice (within or across splits).
    Labels alternate within each split (balanced exactly for even sizes)."""
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"review_vote_splits: sizes must be >= 0, got n_train={n_train}, n_eval={n_eval}")
    if not isinstance(opinions, int) or opinions < 3 or opinions % 2 == 0 or opinions > len(ASPECTS):
        raise ValueError(f"review_vote_splits: opinions must be an odd integer in 3..{len(ASPECTS)}, got {opinions!r}")
    if not isinstance(filler, int) or filler < 0:
        raise ValueError(f"review_vote_splits: filler must be an integer >= 0, got {filler!r}")
    rng = random.Random(f"review-votes-{seed}-{opinions}-{filler}")
    held_out: list[dict] = []
    train: list[dict] = []
    seen: set[str] = set()
    for target, out in ((n_eval, held_out), (n_train, train)):
        tries = 0
        while len(out) < target:
            tries += 1
            if tries > 200 * (target + 10):
                raise ValueError(f"review_vote_splits: cannot draw {target} distinct reviews")
            text, label, positives = _review(rng, opinions, filler)
            if text in seen or label != len(out) % 2:
                continue
            seen.add(text)
            out.append(dict(text=text, label=label, positives=positives, opinions=opinions))
    return train, held_out


def review_votes(n: int = 200, seed: int = 0, opinions: int = 5, filler: int = 0) -> list[dict]:
    """n distinct reviews (the held-out split's generator, no train split)."""
    return review_vote_splits(0, n, seed, opinions, filler)[1]
