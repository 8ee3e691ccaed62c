"""Ratios, target checks and the JSON + Markdown outputs of a step-time run.

A result row (from ``step_time.measure``) carries ``method``, ``family``,
``status`` (``ok`` / ``skipped`` / ``error``), ``median_s``, ``peak_bytes``,
``tunable_params`` and ``match``: the effective settings that pair a method of
ours with PEFT's. Ratios are ours ÷ reference, so < 1 means ours is cheaper.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# (ours, what it is compared with, ratio limit) — the targets; figures, not assertions.
TARGET_VS_LORA_TIME = 1.3
TARGET_VS_LORA_MEMORY = 1.1
TARGET_BOFT_SPEEDUP = 10.0
ORTHOGONAL = ("boft", "unitary", "unitary-full", "hybrid")


def _ok(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["method"]: r for r in rows if r.get("status") == "ok"}


def peft_pair(row: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The PEFT row with the same effective settings as ``row`` (ours), if measured."""
    if row.get("family") != "ours":
        return None
    for other in _ok(rows).values():
        if other["family"] == "peft" and other.get("match") == row.get("match"):
            return other
    return None


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
    if a is None or b is None or not b.get(key):
        return None
    return a[key] / b[key]


def ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per measured method: time and memory ÷ floor, ÷ our LoRA, ÷ PEFT at equal settings."""
    ok = _ok(rows)
    floor, lora = ok.get("floor"), ok.get("lora")
    out: dict[str, dict[str, float | None]] = {}
    for name, row in ok.items():
        pair = peft_pair(row, rows)
        out[name] = {
            "time_vs_floor": _ratio(row, floor, "median_s"),
            "memory_vs_floor": _ratio(row, floor, "peak_bytes"),
            "time_vs_our_lora": _ratio(row, lora, "median_s") if row["family"] != "reference" else None,
            "memory_vs_our_lora": _ratio(row, lora, "peak_bytes") if row["family"] != "reference" else None,
            "time_vs_peft": _ratio(row, pair, "median_s"),
            "memory_vs_peft": _ratio(row, pair, "peak_bytes"),
            "cpu_vs_our_lora": _ratio(row, lora, "cpu_median_s") if row["family"] != "reference" else None,
            "cpu_vs_peft": _ratio(row, pair, "cpu_median_s"),
            "peft_pair": pair["method"] if pair else None,
        }
    return out


def target_checks(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, each as one line saying met / missed / not measured, with the numbers."""
    ok, r = _ok(rows), ratios(rows)
    lines = []

    def verdict(good: bool) -> str:
        return "met" if good else "MISSED"

    def cpu(value: float | None) -> str:
        return "" if value is None else f" (CPU time {value:.2f}×)"

    if "lora" in r and r["lora"]["time_vs_peft"] is not None:
        t = r["lora"]["time_vs_peft"]
        lines.append(f"our LoRA ≤ 1.0× PEFT LoRA step time: {t:.2f}× — {verdict(t <= 1.0)}{cpu(r['lora'].get('cpu_vs_peft'))}")
    else:
        lines.append("our LoRA vs PEFT LoRA: not measured")
    boft_rows = [n for n in ("boft", "boft-m1") if n in r and r[n]["time_vs_peft"] is not None]
    for name in boft_rows:
        speedup = 1.0 / r[name]["time_vs_peft"]
        lines.append(f"our BOFT ({ok[name]['match']}) ≥ {TARGET_BOFT_SPEEDUP:.0f}× faster than PEFT BOFT at equal "
                     f"settings: {speedup:.1f}× — {verdict(speedup >= TARGET_BOFT_SPEEDUP)}")
    if "peft-boft" in ok and "boft" in ok and ok["peft-boft"].get("match") != ok["boft"].get("match"):
        lines.append(f"note: PEFT BOFT ran as {ok['peft-boft']['match']!r} (its CUDA extension was not available), "
                     f"not {ok['boft']['match']!r}; compared with our method of the same effective settings")
    for name in ORTHOGONAL:
        if name not in r or r[name]["time_vs_our_lora"] is None:
            continue
        t, m = r[name]["time_vs_our_lora"], r[name]["memory_vs_our_lora"]
        # A tiny model's training peak can sit inside memory the process already held (RSS meter reads 0):
        # then there is no memory ratio, and the line says so instead of inventing one.
        memory = ("not measured (our LoRA's peak read 0)" if m is None
                  else f"{m:.2f}× — {verdict(m <= TARGET_VS_LORA_MEMORY)}")
        lines.append(f"{name} ≤ {TARGET_VS_LORA_TIME}× our LoRA time / ≤ {TARGET_VS_LORA_MEMORY}× memory: "
                     f"time {t:.2f}× — {verdict(t <= TARGET_VS_LORA_TIME)}{cpu(r[name].get('cpu_vs_our_lora'))}; "
                     f"memory {memory}")
    for name in ("lora_ga", "hybrid"):
        if name in ok and "full-bwd" in ok and ok["full-bwd"].get("peak_bytes"):
            est = ok[name]["prepare_peak_bytes"] / ok["full-bwd"]["peak_bytes"]
            lines.append(f"{name} gradient estimate peak memory ÷ plain full fwd+bwd peak: {est:.2f}× "
                         f"({_bytes(ok[name]['prepare_peak_bytes'])} vs {_bytes(ok['full-bwd']['peak_bytes'])})")
    return lines


def _bytes(n: float | None) -> str:
    if n is None:
        return "—"
    if abs(n) >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    return f"{n / (1 << 20):.0f} MiB"


def _count(n: int | None) -> str:
    if n is None:
        return "—"
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} k"
    return str(n)


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    spec, machine = meta["spec"], meta["machine"]
    threads = spec.get("threads") or machine.get("torch_threads")
    where = machine.get("gpu") or f"{machine.get('cpu')} ({machine.get('cpu_cores')} cores, {threads} torch thread(s))"
    r = ratios(rows)
    lines = [
        f"# Step time and memory: {spec['device']}, {spec['size']}, {spec['dtype']}"
        + (f", {spec['quant']} base" if spec.get("quant") else "") + (", torch.compile" if spec.get("compile") else ""),
        "",
        f"- date: {meta['date']}",
        f"- machine: {where}; torch {machine.get('torch')}, transformers {machine.get('transformers')}, "
        f"peft {machine.get('peft')}" + (f", CUDA {machine['cuda']}" if machine.get("cuda") else ""),
        f"- load average at start (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in machine.get('load_average') or [])}",
        f"- model: random-init Llama `{spec['size']}` ({meta['model']['hidden']} wide, {meta['model']['layers']} layers), "
        f"targets q/k/v/o/gate/up/down, {meta['tokens_per_step']} tokens/step, AdamW",
        f"- timing: median of {spec['steps']} steps after {spec['warmup']} warm-up steps"
        + (f", the quietest of {meta['rounds']} interleaved rounds" if meta.get("rounds", 1) > 1 else "") + " "
        f"(fwd + bwd + optimizer step{', device synchronized' if spec['device'].startswith('cuda') else ''}); "
        f"{'one subprocess per method' if meta.get('isolated_subprocesses') else 'all methods in one process'}",
        f"- peak memory: {next((x['memory_method'] for x in rows if x.get('memory_method')), '—')}, "
        "from before the model is built (so weights are included; the process is warmed up first so that "
        "imports and library buffers are not charged to a method)",
        f"- command: `{meta['command']}`",
    ]
    if meta.get("note"):
        lines.append(f"- note: {meta['note']}")
    lines += [
        "",
        "Ratios are this row ÷ the reference: × floor (frozen fwd+bwd), × our LoRA, × PEFT at equal settings. "
        "`kernels/step`: ATen ops one step dispatches, views excluded (≈ kernel launches on a GPU); "
        "`syncs/step`: host waits for the device in one step (CUDA only). `CPU s`: this process's CPU "
        "seconds per step (median; the lowest round's), which other processes' load inflates far less than the "
        "wall time on a shared machine (with one thread ≈ the step time on a quiet one).",
        "",
        "| method | family | settings | step s | min s | × floor | × our LoRA | × PEFT | CPU s | CPU × our LoRA | CPU × PEFT | peak mem | × floor | × our LoRA | × PEFT | tunable | kernels/step | syncs/step |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row.get("status") != "ok":
            lines.append(f"| {row['method']} | {row['family']} | {row['summary']} | {row.get('status')}: "
                         f"{row.get('reason', '')[:120]} |  |  |  |  |  |  |  |  |  |  |  |  |  |  |")
            continue
        q = r[row["method"]]
        settings = row["summary"] + (f" (ran as {row['match']})" if "note_effective" in row else "")
        cpu_s = f"{row['cpu_median_s']:.4f}" if row.get("cpu_median_s") is not None else "—"
        lines.append(
            f"| {row['method']} | {row['family']} | {settings} | {row['median_s']:.4f} | {row['min_s']:.4f} | {_x(q['time_vs_floor'])} | "
            f"{_x(q['time_vs_our_lora'])} | {_x(q['time_vs_peft'])} | {cpu_s} | "
            f"{_x(q.get('cpu_vs_our_lora'))} | {_x(q.get('cpu_vs_peft'))} | {_bytes(row['peak_bytes'])} | "
            f"{_x(q['memory_vs_floor'])} | {_x(q['memory_vs_our_lora'])} | {_x(q['memory_vs_peft'])} | "
            f"{_count(row['tunable_params'])} | {row.get('kernels_per_step', '—')} | {row.get('host_syncs_per_step', '—')} |"
        )
    lines += ["", "## Targets (benchmark figures, not test assertions)", ""]
    lines += [f"- {line}" for line in target_checks(rows)]
    notes = [f"- {row['method']}: {row[k]}" for row in rows for k in sorted(row) if k.startswith("note")]
    if notes:
        lines += ["", "## Notes", ""] + notes
    return "\n".join(lines) + "\n"


def one_line(row: dict[str, Any]) -> str:
    if row.get("status") != "ok":
        return f"  {row['method']:<13} {row.get('status')}: {row.get('reason', '')[:200]}"
    return (f"  {row['method']:<13} {row['median_s']:.4f} s/step  peak {_bytes(row['peak_bytes']):>10}  "
            f"tunable {_count(row['tunable_params']):>8}  ({row['steps_timed']} steps, {row.get('match', '')})")


def write(meta: dict[str, Any], rows: list[dict[str, Any]], out: Path, stem: str) -> tuple[Path, Path]:
    """Write ``<out>/<stem>.json`` (meta, rows, ratios, target lines) and ``<out>/<stem>.md``."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    payload = {"meta": meta, "results": rows, "ratios": ratios(rows), "targets": target_checks(rows)}
    json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    md_path.write_text(markdown(meta, rows))
    return json_path, md_path
