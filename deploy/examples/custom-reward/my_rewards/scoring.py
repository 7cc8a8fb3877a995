"""Reward functions are called as fn(prompt, completion, reference) and return a float, or a
dict of named floats (its "reward" entry is the reward). `reference` is the task's JSON
reference data, whatever the recipe sent."""

from __future__ import annotations

import re

_WORD = re.compile(r"[a-z0-9]+")


def keyword_recall(prompt: str, completion: str, reference: object) -> dict[str, float]:
    """The share of the reference's keywords the completion mentions, and a brevity bonus."""
    keywords = set(_WORD.findall(str(reference).lower())) if not isinstance(reference, list) else {str(k).lower() for k in reference}
    found = set(_WORD.findall(completion.lower()))
    recall = len(keywords & found) / len(keywords) if keywords else 0.0
    brevity = 1.0 if len(completion) <= 400 else 400 / len(completion)
    return {"reward": recall * brevity, "recall": recall, "brevity": brevity}
