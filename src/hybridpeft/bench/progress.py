"""How far a benchmark's grid has got: every run its YAML asks for, against a results store.

A store only holds the runs that started, so a report rendered from a partial store cannot
say what is missing. Given the benchmark too (``hybridpeft report --bench FILE``), each cell
(model, task, method) gets a row: learning-rate search runs finished of those asked for, final
runs finished, and what became of the others (never started, failed with n attempts, or
waiting for the lr search that chooses their learning rate).

Runs are matched by key, the hash of their resolved settings, so a store made with different
settings than the YAML's shows its runs as "not in this benchmark"; the report counts them
rather than pretending they belong to the grid.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .selection import select_lrs
from .spec import BenchConfig, expand_grid, grid_cells, expand_search
from .store import RunState, run_states


@dataclass
class CellProgress:
    """One (model, task, method) cell of the grid."""

    cell: tuple[str, str, str]
    search_done: int = 0
    search_total: int = 0
    final_done: int = 0
    final_total: int = 0
    waiting_for_search: int = 0  # final runs whose lr is not chosen yet
    not_started: list[str] = field(default_factory=list)  # run labels (method[@lr]/seed)
    failed: list[str] = field(default_factory=list)       # label (attempts)

    @property
    def complete(self) -> bool:
        return self.search_done == self.search_total and self.final_done == self.final_total


@dataclass
class GridProgress:
    cells: list[CellProgress]
    unmatched_keys: int  # runs in the store that this benchmark does not ask for

    @property
    def done(self) -> int:
        return sum(c.search_done + c.final_done for c in self.cells)

    @property
    def total(self) -> int:
        return sum(c.search_total + c.final_total for c in self.cells)


def _tally(progress: CellProgress, label: str, state: RunState | None, search: bool) -> None:
    if search:
        progress.search_total += 1
    else:
        progress.final_total += 1
    if state is not None and state.status == "ok":
        if search:
            progress.search_done += 1
        else:
            progress.final_done += 1
    elif state is None:
        progress.not_started.append(label)
    elif state.status == "running":
        progress.failed.append(f"{label} (running, or killed while running)")
    elif state.attempts <= 0:
        progress.failed.append(f"{label} (interrupted by the user)")
    else:
        progress.failed.append(f"{label} (failed, {state.attempts} attempt{'s' if state.attempts != 1 else ''})")


def grid_progress(bench: BenchConfig, records: list[dict[str, Any]]) -> GridProgress:
    """Every run ``bench`` asks for, in grid order, checked against ``records`` of a store."""
    states = run_states(records)
    by_cell: dict[tuple[str, str, str], CellProgress] = {}

    def cell_of(model: str, task: str, method: str) -> CellProgress:
        return by_cell.setdefault((model, task, method), CellProgress((model, task, method)))

    asked: set[str] = set()
    for run in expand_search(bench):
        method = run.meta["lr_search"]["method"]
        asked.add(run.key)
        _tally(cell_of(run.model, run.task, method), f"{run.method}/seed{run.seed}", states.get(run.key), search=True)
    selected, _waiting = select_lrs(bench, states)
    finals = {(r.model, r.task, r.method, r.seed): r for r in expand_grid(bench, selected)}
    for model, task, m, seed, _fields in grid_cells(bench, bench.seeds):
        progress = cell_of(model, task, m.name)
        run = finals.get((model, task, m.name, seed))
        if run is None:  # its learning rate is chosen by a search that has not finished
            progress.final_total += 1
            progress.waiting_for_search += 1
            continue
        asked.add(run.key)
        _tally(progress, f"{m.name}/seed{seed}", states.get(run.key), search=False)
    unmatched = sum(1 for key, state in states.items() if key not in asked and state.status == "ok")
    return GridProgress(list(by_cell.values()), unmatched)


def progress_rows(progress: GridProgress) -> list[list[str]]:
    """Table rows (cell, lr search, final runs, what is missing) for the cells not complete."""
    rows = []
    for c in progress.cells:
        if c.complete:
            continue
        missing = []
        if c.waiting_for_search:
            missing.append(f"{c.waiting_for_search} final run(s) wait for the lr search")
        if c.not_started:
            missing.append("never started: " + ", ".join(c.not_started))
        if c.failed:
            missing.append("not finished: " + ", ".join(c.failed))
        search = f"{c.search_done} of {c.search_total}" if c.search_total else "—"
        rows.append(["/".join(c.cell), search, f"{c.final_done} of {c.final_total}", "; ".join(missing)])
    return rows
