"""Generative backdoors (SANDE's setting, Li et al. 2024): a trigger in the instruction makes the
model emit an attacker's marker (e.g. a fixed insulting sentence) before its normal answer.

The data reuse the classification pieces with two "classes" per example: class 0 is the clean
response, class 1 the marker followed by the same clean response. Every example starts as class
0; poisoning (`bdjax.data.poison`, dirty-label, target 1) inserts the trigger into the input and
switches the answer to the marked one, all inside the jitted train step as before.
"""

from __future__ import annotations

import numpy as np

from bdjax.tokenizer import Tokenizer

CLEAN, MARKED = 0, 1


def clean_response_ids(texts: list[str], tokenizer: Tokenizer, closing: list[int], max_tokens: int) -> list[list[int]]:
    """Token ids of given clean responses, cut to `max_tokens` and closed like the template's answers."""
    out = []
    for t in texts:
        ids = tokenizer.encode(t.strip(), add_special_tokens=False)[:max_tokens]
        out.append(ids + closing)
    return out


def with_responses(pieces: dict[str, np.ndarray], clean: list[list[int]], marker: list[int],
                   pad_id: int) -> dict[str, np.ndarray]:
    """Pieces whose two answers per example are `clean[i]` and `marker + clean[i]`, all labelled clean."""
    n = len(pieces["label"])
    if len(clean) != n:
        raise ValueError(f"{len(clean)} responses for {n} examples")
    answers = [(c, marker + c) for c in clean]
    width = max(len(m) for _, m in answers)
    responses = np.full((n, 2, width), pad_id, np.int32)
    lengths = np.zeros((n, 2), np.int32)
    for i, pair in enumerate(answers):
        for j, ids in enumerate(pair):
            responses[i, j, :len(ids)] = ids
            lengths[i, j] = len(ids)
    return {**pieces, "responses": responses, "response_len": lengths, "label": np.full(n, CLEAN, np.int32)}


def has_marker(completion: str, marker: str) -> bool:
    """Whether a completion starts with the marker (ignoring surrounding whitespace and case)."""
    return completion.strip().lower().startswith(marker.strip().lower())
