"""Module-name patterns (``target_modules``, ``trainable_modules``) that cannot hang loading.

An entry selects modules by qualified name: ``"q_proj"`` matches a name equal to it
or ending in ``".q_proj"``; ``"re:<regex>"`` must match the whole name. Patterns come
from job configs and from ``adapter_config.json`` files that may not be trusted, and
Python's ``re`` backtracks: ``re:([a-z_.0-9]+)+X`` takes time exponential in the
name's length (measured: 0.7 s for 24 characters, doubling with each one more, so
minutes for one 32-character Llama name such as ``model.layers.10.self_attn.q_proj``
and hours for a 40-character one).

So regexes run on the ``regex`` engine (a superset of ``re``'s syntax), which
rejects most such patterns in linear time by its own analysis, and every scan of
a model's names runs under a time budget (``MATCH_BUDGET_S`` per pattern, over all
names): a pattern that exhausts it is refused with an error naming the field, the
pattern and the name it was stuck on, instead of hanging.
"""
from __future__ import annotations

import time
from typing import Iterable

import regex

REGEX_PREFIX = "re:"
MATCH_BUDGET_S = 1.0  # legitimate patterns need microseconds per name; this is ~10⁴× that for a whole model


def compile_entry(entry: str, field: str) -> "regex.Pattern | None":
    """The compiled regex of a ``"re:..."`` entry (None for a plain name).

    Raises:
        ValueError: not a valid regex (the message names ``field`` and the entry).
    """
    if not entry.startswith(REGEX_PREFIX):
        return None
    try:
        return regex.compile(entry[len(REGEX_PREFIX):])
    except regex.error as err:
        raise ValueError(f"{field} entry {entry!r} is invalid: not a regular expression ({err})") from None


def select(names: Iterable[str], entry: str, field: str, budget_s: float | None = None) -> list[str]:
    """The names ``entry`` matches, in order (see the module docstring for the rules).

    Raises:
        ValueError: ``entry`` is not a valid regex, or matching it took longer than the
            budget (the message names the field, the entry and the name being matched).
    """
    pattern = compile_entry(entry, field)
    if pattern is None:
        return [n for n in names if n == entry or n.endswith("." + entry)]
    budget = MATCH_BUDGET_S if budget_s is None else budget_s
    deadline = time.monotonic() + budget
    hits = []
    for name in names:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            if pattern.fullmatch(name, timeout=remaining) is not None:
                hits.append(name)
        except TimeoutError:
            raise ValueError(
                f"{field} entry {entry!r} is invalid: matching it against module names took over {budget:g} s "
                f"(stuck on {name!r}); nested repetition such as (x+)+ backtracks exponentially — simplify the pattern"
            ) from None
    return hits
