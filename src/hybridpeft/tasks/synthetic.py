"""``arith``: synthetic arithmetic word problems, generated from a seed (no download).

This is a *synthetic* task the project generates itself, for smoke tests and the
embedded default job — not a benchmark from the literature. Each problem is one
of four templates (add, subtract, multiply, two steps) with small numbers, e.g.::

    Question: Mia has 7 pencils. She gets 5 more. How many pencils does Mia have now?
    Answer: 7 + 5 = 12

The target is the worked expression and its value (a one-line "chain of
thought"), which small instruction-tuned models already tend to write.

Splits are disjoint by construction: a problem's split is fixed by a hash of its
arithmetic content (operation and numbers), so no test problem's numbers appear
in training under another name. Scoring is exact match of the *last* integer on
the first non-empty line of the model's greedy continuation, so both a bare
answer (``12``) and a worked line (``7 + 5 = 12``) count.
"""
from __future__ import annotations

import hashlib
import random
import re
from typing import Any

import torch

from .base import Example, Task, register_task

_NAMES = [("Mia", "She"), ("Tom", "He"), ("Ana", "She"), ("Leo", "He"), ("Zoe", "She"), ("Sam", "He")]
_ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "coins", "cookies", "cards"]
_SPLIT_BUCKETS = {"test": (0,), "validation": (1,), "train": tuple(range(2, 10))}
_DEFAULT_SIZE = {"train": 4000, "validation": 400, "test": 400}
_INT = re.compile(r"-?\d+")


def _bucket(key: tuple) -> int:
    return int(hashlib.sha1(repr(key).encode()).hexdigest(), 16) % 10


def _problem(rng: random.Random, max_value: int) -> tuple[tuple, str, str, int]:
    """(content key, question text, worked expression, answer) for one random problem."""
    name, pronoun = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    op = rng.choice(("add", "sub", "mul", "two"))
    if op == "add":
        a, b = rng.randint(1, max_value), rng.randint(1, max_value)
        text = f"{name} has {a} {item}. {pronoun} gets {b} more. How many {item} does {name} have now?"
        return (op, a, b), text, f"{a} + {b}", a + b
    if op == "sub":
        a = rng.randint(2, max_value)
        b = rng.randint(1, a - 1)
        text = f"{name} has {a} {item} and gives {b} away. How many {item} does {name} have left?"
        return (op, a, b), text, f"{a} - {b}", a - b
    if op == "mul":
        a, b = rng.randint(2, min(max_value, 12)), rng.randint(2, min(max_value, 12))
        text = f"{name} buys {a} boxes with {b} {item} in each box. How many {item} is that?"
        return (op, a, b), text, f"{a} * {b}", a * b
    a, b = rng.randint(1, max_value), rng.randint(1, max_value)
    c = rng.randint(1, a + b - 1)
    text = f"{name} has {a} {item}, finds {b} more and then loses {c}. How many {item} does {name} have?"
    return (op, a, b, c), text, f"{a} + {b} - {c}", a + b - c


def extract_int(text: str) -> int | None:
    """The answer in a continuation: the last integer on its first non-empty line, or None."""
    lines = [line for line in text.strip().split("\n") if line.strip()]
    found = _INT.findall(lines[0]) if lines else []
    return int(found[-1]) if found else None


@register_task
class ArithTask(Task):
    """Synthetic arithmetic word problems (causal LM, exact match of the final number via greedy generation).

    Args:
        max_value: largest operand (multiplication operands stay ≤ 12).
        max_new_tokens: generation budget when scoring.
        progress: show a progress bar while generating.
    """

    name = "arith"
    kind = "causal"
    metric = "exact_match"

    def __init__(self, max_value: int = 20, max_new_tokens: int = 16, progress: bool = False) -> None:
        if not isinstance(max_value, int) or max_value < 2:
            raise ValueError(f"max_value={max_value!r} is invalid: expected an integer >= 2")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: expected a positive integer")
        self.max_value = max_value
        self.max_new_tokens = max_new_tokens
        self.progress = progress
        self.last_outputs: list[str] = []  # raw continuations of the latest evaluate(), for inspection

    def load(self, split: str, data_dir: str | None = None, limit: int | None = None, seed: int = 0) -> list[Example]:
        """Generate ``limit`` (default: 4000 train / 400 validation / 400 test) distinct problems.

        The same (split, seed, max_value) always gives the same list; ``data_dir`` is ignored.

        Raises:
            ValueError: unknown split.
        """
        if split not in _SPLIT_BUCKETS:
            raise ValueError(f"split={split!r} is invalid for task 'arith': expected one of {sorted(_SPLIT_BUCKETS)}")
        size = limit if limit is not None else _DEFAULT_SIZE[split]
        rng = random.Random(f"arith/{split}/{seed}/{self.max_value}")
        seen: set[tuple] = set()
        examples: list[Example] = []
        attempts = 0
        while len(examples) < size and attempts < 200 * size:
            attempts += 1
            key, question, worked, answer = _problem(rng, self.max_value)
            if key in seen or _bucket(key) not in _SPLIT_BUCKETS[split]:
                continue
            seen.add(key)
            examples.append(Example(prompt=f"Question: {question}\nAnswer:", target=f" {worked} = {answer}",
                                    meta={"answer": answer}))
        return examples

    def evaluate(self, model: torch.nn.Module, tokenizer: Any, examples: list[Example], batch_size: int = 8) -> dict[str, float]:
        """Exact match of ``extract_int`` of the greedy continuation against the answer."""
        from .lm import generate

        outputs = generate(model, tokenizer, [ex.prompt for ex in examples], max_new_tokens=self.max_new_tokens,
                           batch_size=batch_size, progress=self.progress, desc="arith")
        answers = [extract_int(text) for text in outputs]
        self.last_outputs = outputs
        correct = sum(int(a == ex.meta["answer"]) for a, ex in zip(answers, examples))
        return {self.metric: correct / max(len(examples), 1), "n": float(len(examples))}
