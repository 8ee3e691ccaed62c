"""GSM8K: grade-school maths word problems, scored by exact match of the final number.

The model is trained on the reference solution (calculator annotations ``<<…>>``
removed by default), which ends with ``#### <answer>``; at evaluation it
generates greedily and the final number is extracted from its text.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

import torch

from ..checks import check
from .base import Example, register_task
from .common import CausalTask
from .data import DataFormatError, load_hub_rows, locate, parse_split, read_jsonl, require_text, where
from .lm import generate

# A minus sign counts only where it cannot be subtraction ("10-3" is 10 and 3).
_NUMBER = re.compile(r"(?:(?<![\w)])-)?\$?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_CALCULATOR = re.compile(r"<<[^<>]*>>")

PROMPT = "Question: {question}\nSolve it step by step and write the final answer after '####'.\nAnswer:"


def normalize_number(text: str) -> str | None:
    """Canonical form of a number written as ``$1,234.50``, ``-7``, ``18.00``, ``42.`` …

    ``"18.00"`` and ``"18"`` both give ``"18"``; ``"0.50"`` gives ``"0.5"``.
    Returns ``None`` when ``text`` holds no number.
    """
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The final numeric answer in a model's (or the reference) solution, normalized.

    Precedence: the first number after the last ``####``; else the last
    ``\\boxed{…}``; else the last number anywhere in the text. Thousands commas,
    ``$`` and a sentence-ending period are ignored.
    """
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        m = _NUMBER.search(tail)
        if m:
            return normalize_number(m.group())
    boxed = _BOXED.findall(text)
    if boxed:
        m = _NUMBER.search(boxed[-1])
        if m:
            return normalize_number(m.group())
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


@register_task
class Gsm8k(CausalTask):
    """Args:
        max_new_tokens: generation budget per problem.
        keep_calculator: keep the ``<<48/2=24>>`` annotations in training targets.
        plus ``CausalTask``/``DataTask`` options.
    """

    name = "gsm8k"
    metric = "accuracy"
    stop = ("\nQuestion:",)

    def __init__(self, max_new_tokens: int = 256, keep_calculator: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check(isinstance(max_new_tokens, int) and max_new_tokens > 0, "max_new_tokens", max_new_tokens, "a positive integer")
        self.max_new_tokens = max_new_tokens
        self.keep_calculator = keep_calculator

    def read(self, split: str, data_dir: str | None = None) -> list[Example]:
        """Local ``gsm8k/{train,test}.jsonl`` (keys ``question``, ``answer``) or hub ``openai/gsm8k`` ``main``.

        Raises:
            DataFormatError: missing file, bad JSON, or an answer without ``#### N``.
        """
        parsed = parse_split(split)
        source = locate(data_dir, "gsm8k", f"{parsed.base}.jsonl")
        if source.is_hub:
            origin = f"hub:openai/gsm8k/main[{parsed.hub_name()}]"
            rows = list(enumerate(load_hub_rows("openai/gsm8k", "main", parsed), start=1))
        else:
            origin = source.path
            rows = read_jsonl(source.path, {"question": str, "answer": str})
        examples = [self.make_example(row, origin, line) for line, row in rows]
        return examples if source.is_hub else parsed.apply(examples)

    def make_example(self, row: dict[str, Any], origin: Any, line: int) -> Example:
        question = require_text(row.get("question"), origin, line, "question")
        answer = require_text(row.get("answer"), origin, line, "answer")
        if "####" not in answer or extract_answer(answer) is None:
            raise DataFormatError(f"{where(origin, line)}: expected 'answer' to end with '#### <number>', got ...{answer[-60:]!r}")
        target = answer if self.keep_calculator else _CALCULATOR.sub("", answer)
        return Example(prompt=PROMPT.format(question=question), target=target,
                       meta={"answer": extract_answer(answer), "question": question, "line": line})

    def evaluate(self, model: torch.nn.Module, tokenizer: Any, examples: list[Example], batch_size: int = 8) -> dict[str, float]:
        """Exact match of the extracted final number against the reference's ``#### N``."""
        prompts = [self.render_prompt(tokenizer, ex) for ex in examples]
        texts = generate(model, tokenizer, prompts, max_new_tokens=self.max_new_tokens, batch_size=batch_size,
                         stop=self.stop, progress=self.progress, desc=self.name)
        predicted = [extract_answer(t) for t in texts]
        correct = [p is not None and p == ex.meta["answer"] for p, ex in zip(predicted, examples)]
        self.last_outputs = [{"generation": t, "prediction": p, "answer": ex.meta["answer"], "correct": c}
                             for t, p, ex, c in zip(texts, predicted, examples, correct)]
        out = {"accuracy": sum(correct) / max(len(examples), 1), "n": float(len(examples)),
               "extracted": sum(p is not None for p in predicted) / max(len(examples), 1)}
        return {**out, **self.loss_metrics(model, tokenizer, examples, batch_size)}

    def predictions(self, examples: list[Example]) -> list[dict[str, Any]]:
        """Per problem: the question, the generated solution, the extracted and reference answers."""
        if len(self.last_outputs) != len(examples):
            return []
        return [{"index": i, "input": ex.meta.get("question", ex.prompt), "output": o["generation"],
                 "prediction": o["prediction"], "reference": o["answer"], "correct": o["correct"]}
                for i, (ex, o) in enumerate(zip(examples, self.last_outputs))]
