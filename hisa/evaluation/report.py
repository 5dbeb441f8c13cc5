"""Writing the evaluation report: results.json (every number), report.md (tables) and the needle
heatmaps (dense and HISA side by side: depth on y, haystack length on x)."""

from __future__ import annotations

import json
from pathlib import Path


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x, fmt=".3f") -> str:
    return "–" if x is None else format(x, fmt)


def needle_grid(trials: list[dict], lengths: list[int], depths: list[float], key: str) -> list[list[float | None]]:
    """Accuracy [depth][length] (None where no trial ran)."""
    grid = []
    for d in depths:
        row = []
        for n in lengths:
            cell = [t[key] for t in trials if t["length"] == n and abs(t["depth"] - d) < 1e-9]
            row.append(sum(cell) / len(cell) if cell else None)
        grid.append(row)
    return grid


def needle_rows(trials: list[dict], lengths: list[int]) -> list[dict]:
    rows = []
    for n in lengths:
        cell = [t for t in trials if t["length"] == n]
        if not cell:
            continue
        d = sum(t["dense_correct"] for t in cell) / len(cell)
        h = sum(t["hisa_correct"] for t in cell) / len(cell)
        rows.append({"length": n, "trials": len(cell), "dense_accuracy": d, "hisa_accuracy": h,
                     "delta_points": 100 * (h - d),
                     "prompt_tokens_max": max(t["prompt_tokens"] for t in cell)})
    return rows


def write_heatmap(path: Path, trials: list[dict], lengths: list[int], depths: list[float], title: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(3 + 2.4 * max(2, len(lengths)), 2.2 + 0.42 * len(depths)), squeeze=False,
                             sharey=True, constrained_layout=True)
    im = None
    for ax, key, name in zip(axes[0], ("dense_correct", "hisa_correct"), ("dense", "HISA")):
        grid = np.array([[np.nan if v is None else v for v in row] for row in needle_grid(trials, lengths, depths, key)])
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
        ax.set_xlabel("haystack length (tokens)")
        if key == "dense_correct":
            ax.set_ylabel("needle depth")
        ax.set_title(f"{name}: {np.nanmean(grid) * 100:.0f}% found" if np.isfinite(grid).any() else name)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j] * 100:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=list(axes[0]), label="accuracy", fraction=0.03)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_report(out: Path, results: dict) -> dict:
    """Write results.json, report.md and (when the needle test ran) needle_heatmap.png into ``out``.
    Returns {name: path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "results.json", "markdown": out / "report.md"}
    files["json"].write_text(json.dumps(results, indent=2) + "\n")

    cfg = results["config"]
    lines = [
        "# HISA quality report",
        "",
        f"- model: `{results['model']}` ({results['device']}, {results['dtype']})",
        f"- text: `{results['text']}` ({results['text_tokens']} tokens)",
        f"- HISA: block_size={cfg['block_size']}, top_blocks={cfg['top_blocks']}, top_k={cfg['top_k']}, "
        f"dense_layers={cfg['dense_layers'] or 'none'}, selection={cfg['selection']}, "
        f"min_context={cfg['min_context']}",
        f"- backend: {', '.join(f'{k}={v}' for k, v in results.get('backend', {}).items())}",
        f"- seed: {results['seed']}; elapsed: {results['elapsed_s']:.0f} s",
        "",
    ]
    if results.get("interrupted"):
        lines += ["**Interrupted**: the run was stopped early; the tables hold what had finished.", ""]
    ppl = results.get("perplexity")
    if ppl:
        k = cfg["top_k"]
        lines += [
            "## Perplexity, KL(dense‖HISA) and top-1 agreement",
            "",
            f"\"sparse positions\" are the predictions whose query sees more than top_k = {k} keys: at the other "
            "positions HISA keeps every visible key and equals dense by construction.",
            "",
            "| window | windows | ppl dense | ppl HISA | Δ ppl | KL all | top-1 all | sparse positions "
            "| KL sparse | top-1 sparse |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in ppl:
            a, s = row["all"], row["sparse"]
            lines.append(
                f"| {row['length']} | {len(row['windows'])} | {_num(a['ppl_dense'])} | {_num(a['ppl_hisa'])} | "
                f"{_num(a['ppl_delta_pct'], '+.2f')}% | {_num(a['kl_mean'], '.4f')} | {_pct(a['top1_agreement'])} | "
                f"{s['positions']} | {_num(s['kl_mean'], '.4f')} | {_pct(s['top1_agreement'])} |"
            )
        lines.append("")
    needle = results.get("needle")
    if needle:
        lengths, depths = needle["lengths"], needle["depths"]
        lines += [
            "## Needle in a haystack",
            "",
            f"{needle['per_cell']} generated needle(s) per cell (seeded random name and 6-digit passcode), asked "
            "through the chat template, greedy answer; correct when the passcode appears in the answer.",
            "",
            "| length | trials | dense | HISA | Δ points |",
            "|---:|---:|---:|---:|---:|",
        ]
        for r in needle["rows"]:
            lines.append(f"| {r['length']} | {r['trials']} | {_pct(r['dense_accuracy'])} | "
                         f"{_pct(r['hisa_accuracy'])} | {r['delta_points']:+.1f} |")
        exact = [r["length"] for r in needle["rows"] if r["prompt_tokens_max"] <= cfg["top_k"]
                 or r["prompt_tokens_max"] < cfg["min_context"]]
        if exact:
            lines += ["", f"At length(s) {', '.join(map(str, exact))} the prompt fits in top_k = {cfg['top_k']} keys "
                      "(or is below min_context), so the HISA prefill is exactly dense there; only the answer's "
                      "decode steps past top_k can differ."]
        lines += ["", "Per cell (dense / HISA accuracy):", ""]
        lines.append("| depth | " + " | ".join(str(n) for n in lengths) + " |")
        lines.append("|---:|" + "---:|" * len(lengths))
        gd = needle_grid(needle["trials"], lengths, depths, "dense_correct")
        gh = needle_grid(needle["trials"], lengths, depths, "hisa_correct")
        for i, d in enumerate(depths):
            cells = [f"{_pct(gd[i][j])} / {_pct(gh[i][j])}" for j in range(len(lengths))]
            lines.append(f"| {100 * d:.0f}% | " + " | ".join(cells) + " |")
        files["heatmap"] = out / "needle_heatmap.png"
        write_heatmap(files["heatmap"], needle["trials"], lengths, depths,
                      f"{results['model']} — needle accuracy, dense vs HISA (top_k={cfg['top_k']})")
        lines += ["", "![needle heatmap](needle_heatmap.png)", ""]
    lines += ["## Summary", "", results["summary"], ""]
    files["markdown"].write_text("\n".join(lines))
    return files


def summary_line(results: dict) -> str:
    parts = []
    for row in results.get("perplexity") or []:
        s, a = row["sparse"], row["all"]
        part = f"{row['length']}: ppl {_num(a['ppl_dense'], '.2f')}→{_num(a['ppl_hisa'], '.2f')}"
        part += f" ({_num(a['ppl_delta_pct'], '+.1f')}%), top-1 {_pct(a['top1_agreement'])}"
        if s["positions"]:
            part += f" ({_pct(s['top1_agreement'])} sparse)"
        parts.append(part)
    needle = results.get("needle")
    if needle:
        d = [t["dense_correct"] for t in needle["trials"]]
        h = [t["hisa_correct"] for t in needle["trials"]]
        if d:
            parts.append(f"needle dense {100 * sum(d) / len(d):.0f}% vs HISA {100 * sum(h) / len(h):.0f}% "
                         f"({len(d)} trials)")
    return "hisa-eval: " + ("; ".join(parts) if parts else "nothing evaluated")
