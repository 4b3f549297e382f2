"""Exact match of greedy generations against reference answers.

A probe is {"prompt": str, "completion": str}. The model continues the prompt greedily (no sampling) for up to
`max_new_tokens` tokens or its end-of-sequence token; the generation counts as right when, after collapsing
whitespace (and cutting it at its first line break when the reference has none), it equals the reference.
"""

from __future__ import annotations

import torch

from .batching import pad_id_of, pad_left, scoring


def normalize(text: str) -> str:
    return " ".join(text.split())


def greedy_generations(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """The greedy continuation of every prompt, decoded without special tokens."""
    pad_id = pad_id_of(tokenizer)
    eos = tokenizer.eos_token_id
    out: list[str] = []
    with scoring(model) as device:
        for start in range(0, len(prompts), batch_size):
            encoded = [tokenizer(p).input_ids for p in prompts[start : start + batch_size]]
            ids, mask = pad_left(encoded, pad_id)
            generated = ids.to(device)
            attention = mask.to(device)
            done = torch.zeros(len(encoded), dtype=torch.bool, device=device)
            new_tokens = []
            # a plain loop over whole sequences, without a key/value cache: slower than model.generate(), but right
            # for every method, including those whose update depends on the tokens before (SSMLoRA's state path)
            for _ in range(max_new_tokens):
                positions = (attention.cumsum(1) - 1).clamp(min=0)
                logits = model(input_ids=generated, attention_mask=attention, position_ids=positions).logits[:, -1]
                token = logits.argmax(-1)
                token = torch.where(done, torch.full_like(token, pad_id), token)
                new_tokens.append(token)
                if eos is not None:
                    done |= token == eos
                generated = torch.cat([generated, token[:, None]], dim=1)
                attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)  # rows already done are cut below
                if bool(done.all()):
                    break
            rows = torch.stack(new_tokens, dim=1).cpu() if new_tokens else torch.zeros(len(encoded), 0, dtype=torch.long)
            for row in rows.tolist():
                if eos is not None and eos in row:
                    row = row[: row.index(eos)]
                out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


def is_match(generated: str, reference: str) -> bool:
    if "\n" not in reference.strip():
        generated = generated.strip().split("\n")[0]
    return normalize(generated) == normalize(reference)


def exact_match(model, tokenizer, probes, max_new_tokens: int | None = None, batch_size: int = 16) -> float:
    """Fraction of probes whose greedy generation equals the reference completion (whitespace-normalised).

    `max_new_tokens` defaults to the longest reference's token count plus 4."""
    probes = list(probes)
    if not probes:
        raise ValueError("exact_match needs at least one probe")
    if max_new_tokens is None:
        longest = max(len(tokenizer(p["completion"], add_special_tokens=False).input_ids) for p in probes)
        max_new_tokens = longest + 4
    generated = greedy_generations(model, tokenizer, [p["prompt"] for p in probes], max_new_tokens, batch_size)
    return sum(is_match(g, p["completion"]) for g, p in zip(generated, probes)) / len(probes)
