"""The pydocs-cloze task's data, built from the pydocs test split, offline and the same on every machine with
the same Python.

Each test document is cut into consecutive passages of CONTEXT + CONTINUATION words; a passage's first
CONTEXT words are the context, and the choices are its own next CONTINUATION words and those of three
passages of other test documents, drawn, like the order of the choices, with a fixed seed. Scored by
log-likelihood as HellaSwag is (acc, and acc_norm per byte); chance is 25%.
"""

from __future__ import annotations

import random

import datasets

from pipeline.caching import cache_dir
from pipeline.pydocs import collect_documents, split_of

CONTEXT_WORDS = 24
CONTINUATION_WORDS = 12
CHOICES = 4
SEED = 0


def passages() -> list[tuple[int, str, str]]:
    """(document index, context, continuation) of every whole passage of the test documents."""
    found = []
    documents = [doc for doc in collect_documents(cache_dir()) if split_of(doc) == "test"]
    size = CONTEXT_WORDS + CONTINUATION_WORDS
    for index, document in enumerate(documents):
        words = document.split()
        for start in range(0, len(words) - size + 1, size):
            found.append(
                (
                    index,
                    " ".join(words[start : start + CONTEXT_WORDS]),
                    " " + " ".join(words[start + CONTEXT_WORDS : start + size]),
                )
            )
    return found


def build(**_) -> dict:
    """{"test": the items}, each {"context", "choices", "label"}."""
    items = passages()
    rng = random.Random(SEED)
    rows = []
    for index, context, continuation in items:
        others = [i for i, item in enumerate(items) if item[0] != index]
        choices = [continuation] + [items[i][2] for i in rng.sample(others, CHOICES - 1)]
        order = list(range(CHOICES))
        rng.shuffle(order)
        rows.append({"context": context, "choices": [choices[o] for o in order], "label": order.index(0)})
    return {"test": datasets.Dataset.from_list(rows)}
