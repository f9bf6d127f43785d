"""Synthetic data for the lora-train tests (imported by conftest and the tests; the name is unique on
purpose, since several test folders have a conftest.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

POS_WORDS = ["apple", "banana", "cherry", "grape", "lemon", "orange", "peach", "pear"]
NEG_WORDS = ["car", "truck", "train", "boat", "plane", "bus", "bike", "ship"]
FILLER = ["the", "a", "is", "on", "with", "near", "under", "big", "small", "red", "blue", "old", "new", "very",
          "and", "this", "that", "my", "your", "one"]


def make_sentences(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = [rng.choice(FILLER) for _ in range(rng.randint(4, 9))]
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(POS_WORDS if label == "pos" else NEG_WORDS))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
