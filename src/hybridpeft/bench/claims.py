"""Plain verdicts on the paper's claims, one sentence per (claim, model, task), from a report's cells.

Accuracy-type claims "A beats B" compare the two cells' primary metric over seeds:

- *supported*: A's mean is higher and Welch's two-sided p < 0.05;
- *same direction, not significant* (or *untested* with one seed a side): only the mean is higher;
- *not supported*: A's mean is not higher;
- *not evidence*: neither A nor B clears the task's floor — the higher of the majority-class
  accuracy and the base model's score before training — so neither learned anything measurable.
  When only A misses the floor while B clears it, the claim is *not supported* (B learned, A did not).

The floor applies to every such claim, whichever methods it names. A chain "A > B > C" is
supported only when each link is; not supported when a link is; not evidence when a link is.

Footprint claims (step time, peak memory) compare means and are withheld when any record
involved is marked not comparable (``footprint.comparable = false``: a shared or busy machine).
"""
from __future__ import annotations

from dataclasses import dataclass
from .stats import summarize, welch
from .tables import Cell, adaptive_hybrid, fmt, memory_key, scale, score_floor

# The paper's Table I rows, in its order, as adapter methods: the pairs a claim may name.
HYBRID_RIVALS = ("lora", "lora_ga", "boft", "unitary", "full")
BASELINE_ORDER = ("lora_ga", "boft", "lora")  # Table I: LoRA-GA > BOFT > LoRA at every scale
PAPER_FOOTPRINT_VS_LORA = (1.12, 1.09)  # Table VII (BloomZ-7B1): Hybrid / LoRA step time, peak memory


@dataclass
class Outcome:
    """One comparison's verdict word and the sentence that explains it."""

    word: str
    detail: str

    @property
    def sentence(self) -> str:
        return f"{self.word} {self.detail}"


def beats(a: Cell, b: Cell, floor: tuple[float, str] | None) -> Outcome:
    """Does ``a`` score higher than ``b``? See the module docstring for the words."""
    av, bv = a.values(), b.values(a.metric)
    if not av or not bv:
        return Outcome("no data", f"({a.method} or {b.method} has no {a.metric}).")
    shown_a, unit = scale(a.metric, av)
    shown_b, _ = scale(a.metric, bv)
    mean_a, mean_b = summarize(shown_a).mean, summarize(shown_b).mean
    diff = mean_a - mean_b
    test = welch(av, bv)
    p = "n/a" if test.p is None else f"{test.p:.3f}"
    if unit:
        delta = f"{diff:+.2f} percentage points of {a.metric}"
    else:  # BLEU-like scores in two decimals, small ones (losses) in three significant digits
        delta = f"{diff:+.2f} {a.metric}" if max(abs(mean_a), abs(mean_b)) >= 1 else f"{diff:+.3g} {a.metric}"
    numbers = f"(Δ = {delta}, Welch p = {p}, n = {len(av)} vs {len(bv)})"
    a_low = b_low = False
    floor_text = ""
    if floor is not None:
        shown_floor = scale(a.metric, [floor[0]])[0][0]
        floor_text = f"the {floor[1]} ({fmt(shown_floor)}{'%' if unit else ''})"
        a_low, b_low = summarize(av).mean <= floor[0], summarize(bv).mean <= floor[0]
    if a_low and b_low:
        return Outcome("not evidence:", f"neither {a.method}'s mean nor {b.method}'s clears {floor_text}, so neither "
                                        f"learned anything measurable {numbers}.")
    if a_low:
        return Outcome("not supported:", f"{a.method}'s mean does not clear {floor_text} while {b.method}'s does {numbers}.")
    if diff > 0 and test.significant:
        word = "supported"
    elif diff > 0:
        word = "same direction, untested (a t-test needs two or more seeds per side)" if test.p is None \
            else "same direction, not significant"
    else:
        word = "not supported"
    note = f"; {b.method}'s mean does not clear {floor_text}" if b_low else ""
    return Outcome(word, f"{numbers[:-1]}{note}).")


def chain(links: list[tuple[Cell, Cell]], floor: tuple[float, str] | None) -> Outcome:
    """``A > B > C …`` as the conjunction of its links' verdicts."""
    results = [(a, b, beats(a, b, floor)) for a, b in links]
    words = [o.word.rstrip(":") for _, _, o in results]
    if any(w == "no data" for w in words):
        word = "no data"
    elif any(w == "not evidence" for w in words):
        word = "not evidence"
    elif any(w == "not supported" for w in words):
        word = "not supported"
    elif all(w == "supported" for w in words):
        word = "supported"
    else:
        word = "same direction, not significant" if not any("untested" in w for w in words) else \
            "same direction, untested (a t-test needs two or more seeds per side)"
    parts = "; ".join(f"{a.method} vs {b.method}: {o.word.rstrip(':')}{' —' if o.word.endswith(':') else ''} "
                      f"{o.detail.rstrip('.')}" for a, b, o in results)
    return Outcome(word, f"({parts}).")


def _not_comparable(cells: list[Cell]) -> str | None:
    """The first reason a record of ``cells`` gives for its footprint being not comparable."""
    for cell in cells:
        for record in cell.records:
            footprint = record.get("footprint") or {}
            if footprint.get("comparable") is False:
                return footprint.get("not_comparable_reason") or "marked not comparable"
    return None


def footprint_ratio(num: Cell, den: Cell, key: str) -> float | None:
    a, b = num.footprint(key), den.footprint(key)
    if not a or not b or summarize(b).mean <= 0:
        return None
    return summarize(a).mean / summarize(b).mean


def _withheld(cells: list[Cell]) -> str | None:
    why = _not_comparable(cells)
    return None if why is None else f"withheld: the footprint data is marked not comparable ({why})."


def claims(cells: dict[tuple[str, str, str], Cell], reference: str = "lora") -> list[str]:
    """Every claim of the paper the cells can speak to, one sentence each (see the module docstring)."""
    main = {k: c for k, c in cells.items() if c.role != "lr-search"}
    out: list[str] = []
    for model, task in dict.fromkeys((c.model, c.task) for c in main.values()):
        # Rows are found by name (lora, boft, ...): rows like lora@2e-3 are other settings of a method.
        by_method = {name: main[(model, task, name)] for name in dict.fromkeys((reference,) + HYBRID_RIVALS)
                     if (model, task, name) in main and main[(model, task, name)].role == "main"}
        floor = score_floor(main, model, task)
        where = f"{model}/{task}" + _partial_languages(main, model, task)
        for line in _accuracy_claims(main, model, task, by_method, floor, reference):
            out.append(f"{where} — {line}")
        for line in _footprint_claims(main, model, task, by_method, reference):
            out.append(f"{where} — {line}")
    if not out:
        out.append("No cell of the methods the paper compares was run, so none of its claims can be checked.")
    return out


def _partial_languages(cells: dict[tuple[str, str, str], Cell], model: str, task: str) -> str:
    """`` (en only: no data for hi, zh)`` when the runs of (model, task) left languages out."""
    for cell in cells.values():
        if (cell.model, cell.task) == (model, task):
            for record in cell.records:
                skipped = sorted(((record.get("data") or {}).get("skipped_languages") or {}))
                if skipped:
                    kept = sorted(k[len("accuracy_"):] for k in record["metrics"]
                                  if k.startswith("accuracy_") and k != "accuracy_micro")
                    return f" ({', '.join(kept) or 'none'} only: no data for {', '.join(skipped)})"
    return ""


def _accuracy_claims(cells: dict[tuple[str, str, str], Cell], model: str, task: str, by_method: dict[str, Cell],
                     floor: tuple[float, str] | None, reference: str) -> list[str]:
    lines: list[str] = []
    hybrid = adaptive_hybrid(cells, model, task)
    if hybrid is not None:
        for other in by_method.values():
            if other is not hybrid:
                lines.append(f"Hybrid beats {other.method}: " + beats(hybrid, other, floor).sentence)
    order = [by_method.get(m) for m in BASELINE_ORDER]
    if all(c is not None for c in order):
        links = [(order[0], order[1]), (order[1], order[2])]
        lines.append("LoRA-GA > BOFT > LoRA (the paper's baseline order, Table I): " + chain(links, floor).sentence)
    if "lora" in by_method and "unitary" in by_method:
        lines.append("the unitary (uRNN) adapter trails LoRA (Table I, GLUE): "
                     + beats(by_method["lora"], by_method["unitary"], floor).sentence)
    if hybrid is not None:
        for cell in cells.values():
            if (cell.model, cell.task) == (model, task) and cell.role != "lr-search" \
                    and cell.schedule() not in (None, "adaptive"):
                lines.append(f"adaptive λ beats {cell.method}: " + beats(hybrid, cell, floor).sentence)
    return lines


def _footprint_claims(cells: dict[tuple[str, str, str], Cell], model: str, task: str, by_method: dict[str, Cell],
                      reference: str) -> list[str]:
    hybrid = adaptive_hybrid(cells, model, task)
    if hybrid is None:
        return []
    lines: list[str] = []
    mem = memory_key(cells)
    full = by_method.get("full")
    if full is not None:
        withheld = _withheld([hybrid, full])
        speed = footprint_ratio(full, hybrid, "step_time_s")
        if speed is not None:
            word = withheld or ("supported" if speed >= 2.0 else ("partly (faster, less than 2×)" if speed > 1.0 else "not supported"))
            lines.append(f"Hybrid trains faster per step than full FT (paper: ≈2.1×): {word} "
                         f"(full FT step time / Hybrid step time = {speed:.2f}×).")
        share = footprint_ratio(hybrid, full, mem)
        if share is not None:
            word = withheld or ("supported" if share <= 0.55 else ("partly (less, but not ≈half)" if share < 1.0 else "not supported"))
            lines.append(f"Hybrid needs about half the peak memory of full FT (paper: ≈50% less): {word} "
                         f"(Hybrid / full FT = {100 * share:.0f}%).")
    lora = by_method.get(reference)
    if lora is not None and lora is not hybrid:
        step, memory = footprint_ratio(hybrid, lora, "step_time_s"), footprint_ratio(hybrid, lora, mem)
        if step is not None and memory is not None:
            withheld = _withheld([hybrid, lora])
            word = withheld or ("supported" if step <= 1.25 and memory <= 1.15 else "not supported")
            lines.append(f"the Hybrid's footprint overhead over {lora.method} is small (Table VII: "
                         f"{PAPER_FOOTPRINT_VS_LORA[0]:.2f}× step time, {PAPER_FOOTPRINT_VS_LORA[1]:.2f}× peak memory; "
                         f"taken as ≤ 1.25× and ≤ 1.15×): {word} (here {step:.2f}× and {memory:.2f}×).")
    return lines

