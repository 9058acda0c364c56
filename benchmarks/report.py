"""The throughput benchmark's report: the table and ratios per (model, dtype), and where it is written.

Split from throughput.py, which measures; this only formats what it measured.
"""
from __future__ import annotations

import json
from pathlib import Path

BEGIN, END = "<!-- throughput:begin -->", "<!-- throughput:end -->"


def _num(v, fmt="{:.1f}") -> str:
    return "–" if v is None else fmt.format(v)


def _best(ceiling: list[dict], batch: int | None, after: bool) -> dict | None:
    """The ceiling row with the best forward rate, measured before (or after) the stages.

    ``batch`` None: over every batch size and thread count (the machine's ceiling); else at that batch.
    """
    rows = [r for r in ceiling if "rate" in r and bool(r.get("after")) == after
            and (batch is None or r.get("batch") == batch)]
    return max(rows, key=lambda r: r["rate"], default=None)


def _rate(row: dict | None) -> float | None:
    return row["rate"] if row else None


def _ours(block: dict) -> dict | None:
    """Ours at the smallest image count (the one compared with baseline and peer)."""
    return next((r for n in sorted(block["runs"]) for r in block["runs"][n]
                 if r["stage"] == "ours" and "error" not in r), None)


def format_block(cfg, block: dict) -> list[str]:
    """The table and ratios of one (model, dtype)."""
    lines = [_heading(cfg, block), "",
             "| stage | images | batch | img/s (steady) | start-up s | wall s | peak RSS MiB (sum) "
             "| peak PSS MiB | ours ÷ this | other work, cores |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += _table_rows(cfg, block) + [""]
    if any(r.get("settled") is False for rs in block["runs"].values() for r in rs):
        lines.append("- \\* too short for the settling window: measured from the first result, which overstates "
                     "the steady state")
    return lines + _ratio_lines(cfg, block) + _memory_lines(block)


def _heading(cfg, block: dict) -> str:
    return (f"**{block['model']}**, {block['dtype']}, {cfg.device}; {cfg.kind} images from {cfg.source}"
            + (f" (+{cfg.s3_latency_ms:g} ms per request)" if getattr(cfg, "s3_latency_ms", 0) else "") + "; "
            f"e2e batch {cfg.batch_size}, {cfg.num_actors} actor(s) x {cfg.cpus_per_actor:g} CPU, "
            + (f"decode tasks {cfg.decode_cpus:g} CPU" if cfg.decode_cpus else "decoding in the actors")
            + f"; peer {cfg.num_actors} x {cfg.peer_cpus_per_actor:g} CPU, read/preprocess tasks "
            f"{cfg.peer_decode_cpus:g} CPU" + (", --fast-decode" if cfg.fast_decode else "")
            + (f"; ours with `{cfg.ours_args}`" if getattr(cfg, "ours_args", "") else ""))


def _table_rows(cfg, block: dict) -> list[str]:
    """One row per ceiling and end-to-end stage, each with ours' rate over its own."""
    rows = [(r, None) for r in block["ceiling"]] + [(r, n) for n, rs in block["runs"].items() for r in rs]
    ours_rates = {n: r["rate"] for n, rs in block["runs"].items() for r in rs
                  if r["stage"] == "ours" and "error" not in r}
    lines = []
    for r, n in rows:
        if "error" in r:
            lines.append(f"| {r['stage']} | {_num(n, '{:,}')} | | failed: {r['error'][:120]} | | | | | | |")
            continue
        ours_rate = ours_rates.get(n) if n else next(iter(ours_rates.values()), None)
        ratio = ours_rate / r["rate"] if ours_rate and r.get("rate") else None
        m = r["memory"]
        unsettled = "*" if r.get("settled") is False else ""
        lines.append(f"| {r['stage']} | {_num(r.get('images'), '{:,}')} | {r.get('batch', cfg.batch_size)} "
                     f"| {_num(r.get('rate'))}{unsettled} | {_num(r.get('startup_s'))} | {_num(r.get('wall_s'))} "
                     f"| {m['peak_rss_mib']:,.0f} | {m['peak_pss_mib']:,.0f} | {_num(ratio, '{:.2f}')} "
                     f"| {m['other_cores']:.2f} |")
    return lines


def _ratio_lines(cfg, block: dict) -> list[str]:
    """The drift of the ceiling, and per image count ours over the ceiling, the baseline and the peer."""
    # the ceiling is the machine's: the best forward rate measured, whatever the batch size and thread
    # count, not the rate at the actor's own threads or the end-to-end batch (either could hide headroom)
    best = _best(block["ceiling"], None, after=False)
    ceiling, at_batch = _rate(best), _rate(_best(block["ceiling"], cfg.batch_size, after=False))
    lines = []
    after = _rate(_best(block["ceiling"], cfg.batch_size, after=True))
    if at_batch and after:  # the machine drifts: the same forward pass, measured again right after ours
        lines.append(f"- ceiling at batch {cfg.batch_size} right after ours' first run / before = "
                     f"{after / at_batch:.2f}; ours / the mean of both = "
                     f"{_ratio(_ours(block) or {}, (at_batch + after) / 2)}")
    for n, rs in block["runs"].items():
        by = {r["stage"].split(" ")[0]: r for r in rs if "error" not in r}
        ours = by.get("ours")
        if not ours:
            continue
        parts = [f"ours / ceiling = {_ratio(ours, ceiling)} (target >= 0.85; {_against(best, cfg, ours, at_batch)})",
                 f"ours / baseline = {_ratio(ours, by.get('baseline', {}).get('rate'))}",
                 f"ours / peer = {_ratio(ours, by.get('peer', {}).get('rate'))}",
                 f"start-up {ours['startup_s']:.1f} s (target < 20 s; "
                 + ", ".join(f"{k} at {v} s" for k, v in ours["startup_marks"].items()) + ")"]
        lines.append(f"- {n:,} images: " + "; ".join(parts))
        lines.append("  - ours' processes at its memory peak (RSS MiB): "
                     + ", ".join(f"{name} {mib:,.0f}" for name, mib in ours["memory"]["at_peak"][:6])
                     + f"; the harness's sampler took {ours['memory'].get('sampler_cores', 0):.3f} cores meanwhile")
    return lines


def _against(best: dict | None, cfg, ours: dict, at_batch: float | None) -> str:
    """Which ceiling ours was divided by, and ours over the ceiling at its own batch size if that differs."""
    if not best:
        return "no ceiling measured"
    text = f"the best ceiling, {best['rate']:.1f} img/s at batch {best['batch']}"
    if label := best["stage"].removeprefix("ceiling").strip(" ()"):
        text += f", {label}"
    if best["batch"] != cfg.batch_size:
        text += f"; at ours' batch {cfg.batch_size}: {_ratio(ours, at_batch)}"
    return text


def _memory_lines(block: dict) -> list[str]:
    ours_mem = {n: r["memory"]["peak_rss_mib"] for n, rs in block["runs"].items() for r in rs
                if r["stage"] == "ours" and "error" not in r}
    if len(ours_mem) < 2:
        return []
    (n0, m0), (n1, m1) = sorted(ours_mem.items())[0], sorted(ours_mem.items())[-1]
    return [f"- ours' peak RSS at {n1:,} / at {n0:,} images = {m1 / m0:.2f} (target <= 1.10)"]


def _ratio(ours: dict, other: float | None) -> str:
    return f"{ours['rate'] / other:.2f}" if other and ours.get("rate") else "–"


def format_report(cfg, meta: dict, blocks: list[dict]) -> str:
    """The run as markdown: heading, command, commit, hardware, each model's table and ratios."""
    hw = meta["hardware"]
    lines = [f"### Run of {meta['date']}", "",
             f"- Command: `{meta['command']}`", f"- Commit: `{meta['commit']}`",
             f"- Hardware: {hw['cpu']}, {hw['cores']} cores, {hw['memory_gib']} GiB RAM, GPU: {hw['gpu']}; "
             f"Python {hw['python']}, " + ", ".join(f"{k} {v}" for k, v in hw["versions"].items()), ""]
    for block in blocks:
        lines += format_block(cfg, block) + [""]
    busy = [r["memory"]["other_cores"] for b in blocks for r in b["ceiling"] + sum(b["runs"].values(), [])
            if "memory" in r]
    if busy and max(busy) > 0.15:
        lines.append(f"Note: processes outside the stage kept up to {max(busy):.2f} cores busy during a stage "
                     "(last column); those figures are low by about that share of the machine.")
    return "\n".join(lines).rstrip() + "\n"


def write_out(path: Path, text: str, data: dict | None = None, markers: tuple[str, str] = (BEGIN, END),
              title: str | None = None) -> None:
    """JSON of ``data`` for ``.json``; markdown otherwise, ``text`` between the ``markers``.

    A file without them gets the text appended, below ``# title`` if the file is new, so each
    incremental save replaces the last one instead of repeating it. Shared by throughput.py and
    agreement.py (each its own markers).
    """
    begin, end = markers
    text = text if text.endswith("\n") else text + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(data, indent=2, default=str))
        return
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        path.write_text(f"{head}{begin}\n{text}{end}{rest.split(end, 1)[1]}")
    else:
        heading = f"# {title}\n\n" if title and not old else ""
        path.write_text(old + ("\n" if old else "") + f"{heading}{begin}\n{text}{end}\n")
