"""The new task to teach: 48 facts about a fictional country, Valdoria, that no pretrained model can know.

Eight provinces, six facts each. Taught as plain statements ("The capital of the province of Drelmor is
Kastavin."); probed by multiple choice where every wrong option is the same kind of fact from another province,
so the model must have learned the association, not just the new names.
"""

from __future__ import annotations

import random

# province: capital, governor, founding year, chief export, river, emblem animal
PROVINCES = {
    "Drelmor": ("Kastavin", "Orla Venmark", "1412", "copper", "Sulva", "heron"),
    "Quenhal": ("Mirevast", "Tobin Askeland", "1538", "salt", "Ketterun", "lynx"),
    "Ostrevia": ("Pellacor", "Idris Halloway", "1267", "amber", "Varnis", "otter"),
    "Tarsk": ("Velmouth", "Sabine Crowle", "1693", "wool", "Drumene", "badger"),
    "Ylvara": ("Corrin Bay", "Matthias Eld", "1354", "glass", "Oressa", "falcon"),
    "Brannoch": ("Seltholm", "Vera Lindqvist", "1721", "timber", "Galavin", "stag"),
    "Muirith": ("Anvercliff", "Desmond Pryor", "1486", "silk", "Tessaly", "swan"),
    "Kellvane": ("Rothgar", "Nadia Orsolo", "1599", "tea", "Ambrel", "wolf"),
}

# fact kind: (statement template, cloze prompt template). The cloze prompt is the statement up to the answer.
KINDS = (
    ("The capital of the province of {p} is {a}.", "The capital of the province of {p} is"),
    ("The governor of the province of {p} is {a}.", "The governor of the province of {p} is"),
    ("The province of {p} was founded in the year {a}.", "The province of {p} was founded in the year"),
    ("The chief export of the province of {p} is {a}.", "The chief export of the province of {p} is"),
    ("The main river of the province of {p} is the {a}.", "The main river of the province of {p} is the"),
    ("The emblem of the province of {p} is the {a}.", "The emblem of the province of {p} is the"),
)


def fictional_facts() -> list[dict]:
    """One dict per fact: province, kind (0-5), answer, statement, prompt (the statement cut before the answer)."""
    facts = []
    for province, answers in PROVINCES.items():
        for kind, ((statement, prompt), answer) in enumerate(zip(KINDS, answers)):
            facts.append(
                dict(
                    province=province,
                    kind=kind,
                    answer=answer,
                    statement=statement.format(p=province, a=answer),
                    prompt=prompt.format(p=province),
                )
            )
    return facts


def fictional_statements() -> list[str]:
    """The 48 training texts."""
    return [fact["statement"] for fact in fictional_facts()]


def fictional_qa() -> list[dict]:
    """The same facts as question/answer pairs (prompt-completion format)."""
    questions = (
        "What is the capital of the province of {p}?",
        "Who is the governor of the province of {p}?",
        "In which year was the province of {p} founded?",
        "What is the chief export of the province of {p}?",
        "What is the main river of the province of {p}?",
        "What is the emblem animal of the province of {p}?",
    )
    return [
        dict(prompt=f"Question: {questions[f['kind']].format(p=f['province'])}\nAnswer:", completion=f" {f['answer']}")
        for f in fictional_facts()
    ]


def fictional_probes(seed: int = 0) -> list[dict]:
    """Multiple-choice probes, one per fact: question (cloze prompt), 4 options, answer (index of the right one)."""
    rng = random.Random(seed)
    facts = fictional_facts()
    probes = []
    for fact in facts:
        others = sorted({f["answer"] for f in facts if f["kind"] == fact["kind"]} - {fact["answer"]})
        options = rng.sample(others, 3) + [fact["answer"]]
        rng.shuffle(options)
        probes.append(dict(question=fact["prompt"], options=options, answer=options.index(fact["answer"])))
    return probes
