"""The README's speed plot, drawn from benchmark results (never typed in by hand): time to first token and decode
speed against context length, dense vs HISA, measured in the same run on the same card.

    python bench/e2e.py --json bench/results/e2e-h100.json          # on the GPU machine
    python bench/plot.py bench/results/e2e-h100.json -o docs/e2e-speed.png

Input: the JSON file that ``bench/e2e.py --json`` writes,

    {"device": "NVIDIA H100 80GB HBM3",                     # card name, shown in the title
     "model": "...",                                        # optional: what was run (title)
     "config": {"top_k": 2048, ...},                        # optional: HISA settings (subtitle)
     "results": {"8192":  {"dense": {"ttft_s": 0.41, "decode_ms": 9.8, ...},
                           "hisa":  {"ttft_s": 0.38, "decode_ms": 9.1, ...}},
                 "32768": {...}, ...}}

the same measurements as a list of rows (top level, or under "results"/"rows"), or the JSON lines e2e.py prints
while it runs (``{"mode": "dense", "L": 8192, "ttft_s": ..., "decode_ms": ...}``,
one per line; other lines are skipped). Keys per measurement: ``ttft_s`` (seconds) and ``decode_ms`` (ms per
generated token; plotted as tokens/s) or ``decode_tok_s``; a measurement with ``"error"`` (e.g. dense out of memory)
or a missing value is drawn as a gap and labelled. Modes other than dense/hisa (e.g. a vLLM baseline) are drawn
too. The plot marks HISA's speed-up over dense at each context length; ``--table`` also prints the numbers as a
Markdown table for the README.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STYLE = {"dense": ("#7f7f7f", "o", "dense (SDPA)"), "hisa": ("#d62728", "s", "HISA")}


def load_results(path: Path) -> dict:
    """-> {"device": str|None, "model": str|None, "config": dict, "points": {mode: {ctx: measurement}}}"""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    points: dict[str, dict[int, dict]] = {}
    meta = {"device": None, "model": None, "config": {}}
    if isinstance(data, dict):
        meta.update(device=data.get("device"), model=data.get("model"), config=data.get("config") or {})
    rows = data if isinstance(data, list) else (data or {}).get("results", (data or {}).get("rows"))
    if isinstance(rows, dict):  # {ctx: {mode: measurement}}
        for ctx, modes in rows.items():
            for mode, m in modes.items():
                points.setdefault(mode, {})[int(ctx)] = m or {}
    elif isinstance(rows, list):  # [{"mode": ..., "L" or "context": ..., ...}]
        for row in rows:
            if isinstance(row, dict) and "mode" in row and ("L" in row or "context" in row):
                points.setdefault(row["mode"], {})[int(row.get("L", row.get("context")))] = row
    elif data is None:  # JSON lines
        for line in text.splitlines():
            line = line.strip()
            if not line.startswith("{"):
                if line.startswith("# ") and meta["device"] is None:
                    meta["device"] = line[2:].split(",")[0].strip()
                continue
            row = json.loads(line)
            if "mode" in row and ("L" in row or "context" in row):
                ctx = int(row.get("L", row.get("context")))
                points.setdefault(row["mode"], {})[ctx] = row
    if not points:
        raise ValueError(f"{path}: no measurements found (expected e2e.py's --json output or its JSON lines)")
    return {**meta, "points": points}


def _ttft(m: dict) -> float | None:
    v = m.get("ttft_s")
    return float(v) if isinstance(v, (int, float)) and v > 0 and not m.get("error") else None


def _tok_s(m: dict) -> float | None:
    if m.get("error"):
        return None
    if isinstance(m.get("decode_tok_s"), (int, float)) and m["decode_tok_s"] > 0:
        return float(m["decode_tok_s"])
    v = m.get("decode_ms")
    return 1000.0 / float(v) if isinstance(v, (int, float)) and v > 0 else None


def _ctx_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else f"{n / 1000:.0f}k" if n >= 1000 else str(n)


def _order(modes) -> list[str]:
    return sorted(modes, key=lambda m: (m != "dense", m != "hisa", m))


def table(res: dict) -> str:
    """Markdown table: TTFT and decode speed per context, each mode, HISA/dense ratios."""
    pts = res["points"]
    modes = _order(pts)
    ctxs = sorted({c for m in pts.values() for c in m})
    head = ["context"] + [f"{m} TTFT s" for m in modes] + [f"{m} tok/s" for m in modes]
    ratio = "dense" in pts and "hisa" in pts
    if ratio:
        head += ["TTFT speed-up", "decode speed-up"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in ctxs:
        cells = [_ctx_label(c)]
        for fn, fmt in ((_ttft, "{:.3f}"), (_tok_s, "{:.1f}")):
            for m in modes:
                v = fn(pts[m].get(c, {}))
                cells.append(fmt.format(v) if v is not None else _missing(pts[m].get(c)))
        if ratio:
            d, h = pts["dense"].get(c, {}), pts["hisa"].get(c, {})
            td, th, sd, sh = _ttft(d), _ttft(h), _tok_s(d), _tok_s(h)
            cells.append(f"{td / th:.2f}x" if td and th else "-")
            cells.append(f"{sh / sd:.2f}x" if sd and sh else "-")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _missing(m: dict | None) -> str:
    if m and m.get("error"):
        return str(m["error"]).split(":")[0][:20]
    return "-"


def plot(res: dict, out: Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    pts = res["points"]
    modes = _order(pts)
    ctxs = sorted({c for m in pts.values() for c in m})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), constrained_layout=True)
    panels = ((axes[0], _ttft, "time to first token (s, lower is better)", True),
              (axes[1], _tok_s, "decode speed (tokens/s, higher is better)", False))
    extra_colors = iter(["#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"])
    colors = {m: STYLE[m][0] if m in STYLE else next(extra_colors, "#000000") for m in modes}
    for ax, fn, label, log_y in panels:
        for mode in modes:
            xs = [c for c in ctxs if c in pts[mode] and fn(pts[mode][c]) is not None]
            ys = [fn(pts[mode][c]) for c in xs]
            _, marker, name = STYLE.get(mode, (None, "^", mode))
            ax.plot(xs, ys, marker=marker, color=colors[mode], label=name, linewidth=2)
            for c in ctxs:  # failed points (e.g. out of memory) are labelled where they would be
                m = pts[mode].get(c)
                if m is not None and fn(m) is None and m.get("error"):
                    ax.annotate(f"{mode}: {_missing(m)}", xy=(c, 0.04), xycoords=("data", "axes fraction"),
                                fontsize=7, color=colors[mode], ha="center", va="bottom", rotation=90)
        if "dense" in pts and "hisa" in pts:  # speed-up labels
            for c in ctxs:
                d, h = fn(pts["dense"].get(c, {})), fn(pts["hisa"].get(c, {}))
                if d and h:
                    r = d / h if log_y else h / d
                    ax.annotate(f"{r:.2f}x", (c, h), textcoords="offset points", xytext=(0, -14 if log_y else 8),
                                ha="center", fontsize=8, color=colors["hisa"], fontweight="bold")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(ctxs))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(ctxs, [_ctx_label(c) for c in ctxs])
        if log_y:
            ax.set_yscale("log")
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo * 0.6, hi * 1.3)  # room for the speed-up labels
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
            ax.tick_params(axis="y", which="minor", labelsize=7)
        else:
            ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.12)
        ax.set_xlabel("context length (prompt tokens)")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=9, frameon=False)
    head = title or "hisa-serve: HISA vs dense attention, same model, same card, same run"
    sub = " · ".join(x for x in (res.get("device"), res.get("model"), _cfg(res.get("config"))) if x)
    fig.suptitle(head + (f"\n{sub}" if sub else ""), fontsize=11)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return out


def _cfg(cfg: dict | None) -> str:
    if not cfg:
        return ""
    keys = [k for k in ("block_size", "top_blocks", "top_k") if k in cfg]
    return "HISA " + " ".join(f"{k}={cfg[k]}" for k in keys) if keys else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="bench/e2e.py --json output (or its JSON-lines stdout)")
    ap.add_argument("-o", "--out", type=Path, default=None, help="image to write (.png or .svg; default: the "
                    "results file with .png)")
    ap.add_argument("--title", default=None, help="first title line")
    ap.add_argument("--table", action="store_true", help="also print a Markdown table of the numbers")
    args = ap.parse_args(argv)
    try:
        res = load_results(args.results)
    except (OSError, ValueError) as e:
        print(f"plot.py: {e}", file=sys.stderr)
        return 1
    out = plot(res, args.out or args.results.with_suffix(".png"), args.title)
    print(f"wrote {out}")
    if args.table:
        print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
