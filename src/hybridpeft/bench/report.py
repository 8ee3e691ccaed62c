"""``write_report``: results store → ``report.md``, ``report.html`` and PNG figures.

The report is a list of blocks (heading, paragraph, list, table, figure) rendered
twice, to Markdown and to a self-contained HTML page, so both always say the same.
It contains: what was run; the main table (Table I layout) with Welch's t-test
against LoRA; the λ ablation; the footprint table; every metric; the figures;
automatic checks of the paper's claims; and the runs that failed.
"""
from __future__ import annotations

import html
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from . import figures
from .claims import claims
from .diagnostics import clipping_table, lambda_table, lr_selection_table
from .progress import GridProgress, grid_progress, progress_rows
from .layouts import direction_average_cells, direction_tables, language_tables
from .store import SkippedLine, apply_annotations, finished, read_annotations, read_store
from .tables import (Cell, Table, ablation_table, adaptive_hybrid, build_cells, footprint_table, main_tables,
                     metrics_table, not_comparable_reasons, _memory_key)

if TYPE_CHECKING:
    from .spec import BenchConfig


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Image:
    path: str  # relative to the report directory
    caption: str


Block = Union[Heading, Para, Bullets, Table, Image]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def write_report(results: str | Path, out_dir: str | Path, *, reference: str = "lora", title: str | None = None,
                 notes: str | Path | None = None, bench: "BenchConfig | None" = None) -> dict[str, Path]:
    """Render the report for a results store.

    Args:
        results: a ``results.jsonl`` file or the directory holding it.
        out_dir: where ``report.md``, ``report.html`` and ``figures/*.png`` go.
        reference: the method the t-tests and ratios compare against.
        title: report title (default: from the results directory name).
        notes: a Markdown file whose text is included verbatim after the summary
            (hand-written discussion; the automatic checks are always included).
        bench: the benchmark the store was run from; the report then says how many of the
            runs it asks for have finished and names every one missing (``bench.progress``).

    Returns:
        ``{"markdown": path, "html": path, "figures": [...]}``-style mapping of names to paths.

    A run whose primary metric is missing or not finite (NaN, inf) is listed under
    "Failed runs" as a failed metric and left out of every statistic (a non-finite
    secondary metric only out of that metric's mean, and listed too); lines of the
    results file that cannot be used are listed, with file and line, under "Skipped
    lines of the results file" (and warned about on stderr).

    Raises:
        FileNotFoundError: no results file; ValueError: it holds no finished run with a
            finite primary metric (the failed ones are named).
    """
    records, skipped = read_store(results, complete=True)
    for line in skipped:
        warnings.warn(f"skipped {line}", stacklevel=2)
    records = apply_annotations(records, read_annotations(results))
    done, metric_failed = split_metric_failures(finished(records))
    if not done:
        failed = "; ".join(f"{r['key']}: {', '.join(metric_problems(r))}" for r in metric_failed)
        raise ValueError(f"{results} holds no finished run (status 'ok') with a usable metric; nothing to report"
                         + (f" ({failed})" if failed else ""))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cells = build_cells(done)
    blocks, figure_paths = build_blocks(records, cells, out, reference=reference,
                                        title=title or f"Benchmark report: {Path(results).resolve().name}",
                                        notes=Path(notes).read_text() if notes else None,
                                        metric_failed=metric_failed, skipped=skipped,
                                        progress=grid_progress(bench, records) if bench is not None else None)
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(render_markdown(blocks))
    html_path.write_text(render_html(blocks))
    paths: dict[str, Path] = {"markdown": md_path, "html": html_path}
    paths.update({p.stem: p for p in figure_paths})
    return paths


def metric_problems(record: dict[str, Any]) -> list[str]:
    """Every metric of a finished record that is not a finite number (``["accuracy = nan"]``);
    a missing primary metric counts too."""
    metrics = record["metrics"]
    problems = [] if record["primary_metric"] in metrics else [f"primary metric {record['primary_metric']!r} missing"]
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{name} = {value!r} is not a number")
        elif not math.isfinite(value):
            problems.append(f"{name} = {value}")
    return problems


def primary_failed(record: dict[str, Any]) -> bool:
    value = record["metrics"].get(record["primary_metric"])
    return isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)


def split_metric_failures(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(records whose primary metric is a finite number, records with any metric that is not)."""
    return [r for r in records if not primary_failed(r)], [r for r in records if metric_problems(r)]


def build_blocks(records: list[dict[str, Any]], cells: dict[tuple[str, str, str], Cell], out: Path, *,
                 reference: str, title: str, notes: str | None, metric_failed: list[dict[str, Any]] = (),
                 skipped: list[SkippedLine] = (), progress: GridProgress | None = None) -> tuple[list[Block], list[Path]]:
    blocks: list[Block] = [Heading(1, title)]
    blocks += _setup_blocks(records, cells)
    if progress is not None:
        blocks += _progress_blocks(progress)
    if notes:
        blocks.append(Para(notes.strip()))
    averaged = direction_average_cells(cells)  # the paper's "average BLEU over directions" as cells of their own
    blocks += [Heading(2, "What the numbers say about the paper's claims"), Bullets(claims({**cells, **averaged}, reference))]
    blocks.append(Heading(2, "Main results (Table I layout)"))
    blocks += main_tables(cells, reference)
    multilingual = language_tables(cells) + direction_tables(cells)
    if multilingual:
        blocks.append(Heading(2, "Multilingual and low-resource layout (Tables III–VI)"))
        blocks += multilingual
    blocks.append(Heading(2, "λ ablation (Table II)"))
    ablation = ablation_table(cells)
    blocks.append(ablation if ablation is not None else Para("No Hybrid variant besides the adaptive one was run; no ablation table."))
    selection = lr_selection_table(cells)
    if selection is not None:
        blocks += [Heading(2, "Learning-rate selection"), selection]
    blocks.append(Heading(2, "Training footprint (Table VII)"))
    blocks.append(footprint_table(cells, reference))
    blocks += [t for t in (clipping_table(cells), lambda_table(cells)) if t is not None]
    blocks.append(metrics_table(cells))

    figure_paths: list[Path] = []
    blocks.append(Heading(2, "Figures"))
    memory_key = _memory_key(cells)
    shown = [c for c in cells.values() if c.role != "lr-search"]
    comparable = not not_comparable_reasons(shown)
    path = figures.footprint_figure(shown, out / "figures" / "footprint.png", memory_key)
    figure_paths.append(path)
    blocks.append(Image(f"figures/{path.name}", "Step time and peak memory per method (cf. the paper's Fig. 1)." +
                        ("" if comparable else " Not comparable: see the footprint table's note.")))
    for model, task in dict.fromkeys((c.model, c.task) for c in cells.values()):
        group = [c for c in cells.values() if (c.model, c.task) == (model, task) and c.role in ("main", "extra")]
        path = figures.curves_figure(group, out / "figures" / f"curves_{slug(model)}_{slug(task)}.png", f"{model} · {task}")
        figure_paths.append(path)
        blocks.append(Image(f"figures/{path.name}", f"Gradient norm and validation loss over training, {model} on {task} (cf. Fig. 2)."))
        hybrid = adaptive_hybrid(cells, model, task)
        if hybrid is not None:
            path = figures.lambda_figure(hybrid, out / "figures" / f"lambda_{slug(model)}_{slug(task)}.png", f"{model} · {task}")
            if path is not None:
                figure_paths.append(path)
                blocks.append(Image(f"figures/{path.name}", f"Per-layer λ of the adaptive Hybrid over training, {model} on {task}."))
    blocks += _failure_blocks(records, metric_failed)
    if skipped:
        blocks += [Heading(2, "Skipped lines of the results file"),
                   Bullets([f"`{line.file.name}` line {line.line}: {line.reason}" for line in skipped])]
    return blocks, figure_paths


def _setup_blocks(records: list[dict[str, Any]], cells: dict[tuple[str, str, str], Cell]) -> list[Block]:
    """What was run, with which budget: read from the resolved configs, not restated by hand."""
    done = [r for c in cells.values() for r in c.records]
    seeds = sorted({r["seed"] for r in done})
    items = [f"{len(done)} finished runs in {len(cells)} cells (model × task × method), seeds {seeds}."]
    items += _budget_items(cells)
    adapters: dict[tuple[str, str], list[str]] = {}
    for cell in cells.values():
        resolved = (cell.records[0].get("job_config") or {}).get("adapter")  # with the library defaults filled in
        adapter = json.dumps(resolved or cell.records[0]["config"].get("adapter", {}), sort_keys=True)
        models = adapters.setdefault((cell.method, adapter), [])
        if cell.model not in models:
            models.append(cell.model)
    for (method, adapter), models in adapters.items():
        items.append(f"{method} ({', '.join(models)}): adapter `{adapter}`")
    items += _data_items(cells)
    reused = [r for r in done if r.get("reused_from")]
    if reused:
        items.append(f"{len(reused)} of the {len(done)} records reuse a finished run with identical settings under another "
                     "label (`reused_from` in the store), e.g. a final run at the lr its search run already trained.")
    loads = [r["footprint"]["load_avg_1m_mean"] for r in done if isinstance((r.get("footprint") or {}).get("load_avg_1m_mean"), (int, float))]
    if loads:
        cpus = next((r["footprint"].get("cpu_count") for r in done if (r.get("footprint") or {}).get("cpu_count")), None)
        items.append(f"Machine load during the runs (1-minute load average, mean per run): {min(loads):.1f}–{max(loads):.1f}"
                     + (f" on {cpus} cores." if cpus else "."))
    vers = done[0].get("versions", {})
    items.append("Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(vers.items())))
    return [Heading(2, "What was run"), Bullets(items)]


def _data_items(cells: dict[tuple[str, str, str], Cell]) -> list[str]:
    """Where each (model, task)'s training, validation and scored examples came from (as the runs recorded it)."""
    items = []
    for model, task in dict.fromkeys((c.model, c.task) for c in cells.values()):
        data = next((r["data"] for c in cells.values() if (c.model, c.task) == (model, task)
                     for r in c.records if isinstance(r.get("data"), dict)), None)
        if data is None:
            continue
        text = f"Data, {model}/{task}: training {data.get('train')}; validation {data.get('validation')}"
        if data.get("scored"):
            text += f"; scored on {data['scored']}"
        skipped = data.get("skipped_languages") or {}
        if skipped:
            text += f"; no data for {', '.join(sorted(skipped))} (neither a local file nor the hub could provide it)"
        items.append(text + " (as the lowest seed recorded it; every seed draws its own sample the same way).")
    return items


def _budget_items(cells: dict[tuple[str, str, str], Cell]) -> list[str]:
    """One line per distinct (data, train, eval) settings, naming the cells that used them."""
    groups: dict[str, dict[tuple[str, str], list[str]]] = {}
    for cell in cells.values():
        config = cell.records[0]["config"]
        key = "; ".join(f"{section} " + json.dumps(config.get(section, {}), sort_keys=True)
                        for section in ("data", "train", "eval") if config.get(section))
        groups.setdefault(key or "(library defaults)", {}).setdefault((cell.model, cell.task), []).append(cell.method)
    items = []
    for i, (key, where) in enumerate(groups.items(), start=1):
        used = []
        for (model, task), methods in where.items():
            every = [c.method for c in cells.values() if (c.model, c.task) == (model, task)]
            used.append(f"{model}/{task} ({'every method' if methods == every else ', '.join(methods)})")
        label = "Settings" if len(groups) == 1 else f"Settings {i}"
        items.append(f"{label}: `{key}` — used by {'; '.join(used)}.")
    return items


def _progress_blocks(progress: GridProgress) -> list[Block]:
    search = [c for c in progress.cells if c.search_total]
    split = (f" (lr search {sum(c.search_done for c in search)} of {sum(c.search_total for c in search)}, final runs "
             f"{sum(c.final_done for c in progress.cells)} of {sum(c.final_total for c in progress.cells)})" if search else "")
    if progress.done == progress.total:
        blocks: list[Block] = [Heading(2, "Grid progress"),
                               Para(f"**Complete:** all {progress.total} runs the benchmark asks for have finished{split}.")]
    else:
        blocks = [Heading(2, "Grid progress"),
                  Para(f"**Partial:** {progress.done} of the {progress.total} runs the benchmark asks for have finished{split}; "
                       "every claim below rests on the finished runs only."),
                  Table("Cells with runs missing", ["Cell", "lr search", "Final runs", "Missing"] if search
                        else ["Cell", "Runs", "Missing"], [row if search else row[:1] + row[2:] for row in progress_rows(progress)])]
    if progress.unmatched_keys:
        blocks.append(Para(f"{progress.unmatched_keys} finished run(s) in the store are not runs of this benchmark "
                           "(different settings); they are reported below but not counted here."))
    return blocks


def _failure_blocks(records: list[dict[str, Any]], metric_failed: list[dict[str, Any]] = ()) -> list[Block]:
    last: dict[str, dict[str, Any]] = {}
    for r in records:
        last[r["key"]] = r
    bad = [r for r in last.values() if r["status"] != "ok"]
    if not bad and not metric_failed:
        return [Heading(2, "Failed runs"), Para("None: every run in the store finished.")]
    rows = [[r["key"], r["status"], str(r.get("attempt", "?")), _last_line(r.get("error"))] for r in bad]
    rows += [[r["key"], "metric failed", str(r.get("attempt", "?")),
              "; ".join(metric_problems(r)) + ("; left out of every table and test" if primary_failed(r)
                                               else "; left out of that metric's mean")] for r in metric_failed]
    return [Heading(2, "Failed runs"), Table("Runs whose last attempt did not finish, or finished without a usable metric",
                                             ["Run", "Status", "Attempts", "Last error line"], rows)]


def _last_line(error: Any) -> str:
    lines = str(error or "").strip().splitlines()
    return lines[-1][:200] if lines else "interrupted or still running"


# ---------------------------------------------------------------- rendering

def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Para):
            lines += [block.text, ""]
        elif isinstance(block, Bullets):
            lines += [f"- {item}" for item in block.items] + [""]
        elif isinstance(block, Table):
            lines += [f"**{block.title}**", ""]
            lines.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
            lines.append("|" + "|".join("---" for _ in block.header) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            lines += [""] + ([block.note, ""] if block.note else [])
        elif isinstance(block, Image):
            lines += [f"![{block.caption}]({block.path})", "", f"*{block.caption}*", ""]
    return "\n".join(lines).rstrip() + "\n"


def _inline_html(text: str) -> str:
    """Escape, then the inline Markdown forms the report uses: **bold**, *emphasis* and `code`."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"(?<![\w*])\*(\S.*?)\*(?![\w*])", r"<em>\1</em>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f3f3f3}caption{font-weight:bold;text-align:left;padding:.3em 0}.note{color:#555;font-size:.85em}
img{max-width:100%}figure{margin:1em 0 2em}figcaption{color:#555;font-size:.9em}"""


def render_html(blocks: list[Block]) -> str:
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>"]
    heading = next((b.text for b in blocks if isinstance(b, Heading)), "report")
    parts += [f"<title>{html.escape(heading)}</title>", f"<style>{_CSS}</style></head><body>"]
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{_inline_html(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            for chunk in block.text.split("\n\n"):
                if chunk.startswith("- "):  # a Markdown list in hand-written notes
                    items = [item.strip() for item in ("\n" + chunk).split("\n- ") if item.strip()]
                    parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in items) + "</ul>")
                else:
                    parts.append(f"<p>{_inline_html(chunk)}</p>")
        elif isinstance(block, Bullets):
            parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in block.items) + "</ul>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            parts.append(f"<table><caption>{html.escape(block.title)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            if block.note:
                parts.append(f"<p class='note'>{_inline_html(block.note)}</p>")
        elif isinstance(block, Image):
            parts.append(f"<figure><img src='{html.escape(block.path)}' alt='{html.escape(block.caption)}'>"
                         f"<figcaption>{_inline_html(block.caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
