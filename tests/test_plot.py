"""bench/plot.py draws the README's speed plot from benchmark results files (e2e.py's --json output or its
JSON lines); the numbers in its table come from the file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import plot  # noqa: E402

RESULTS = {
    "device": "Test Card 80GB",
    "config": {"block_size": 64, "top_blocks": 64, "top_k": 2048},
    "results": {
        "8192": {"dense": {"ttft_s": 0.5, "decode_ms": 10.0, "peak_gib": 3.0},
                 "hisa": {"ttft_s": 0.45, "decode_ms": 8.0, "peak_gib": 3.1}},
        "32768": {"dense": {"ttft_s": 3.0, "decode_ms": 20.0}, "hisa": {"ttft_s": 1.2, "decode_ms": 10.0}},
        "131072": {"dense": {"error": "OutOfMemoryError: CUDA out of memory"},
                   "hisa": {"ttft_s": 6.0, "decode_ms": 12.5}},
    },
}


def _png_ok(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_plot_and_table_from_results_json(tmp_path):
    src = tmp_path / "e2e.json"
    src.write_text(json.dumps(RESULTS))
    out = tmp_path / "speed.png"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "plot.py"), str(src), "-o", str(out), "--table"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    _png_ok(out)
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    # speed-ups computed from the file: TTFT dense/HISA, decode tok/s HISA/dense
    assert "| 1.11x | 1.25x |" in rows["8k"]
    assert "| 2.50x | 2.00x |" in rows["32k"]
    assert "OutOfMemoryError" in rows["128k"] and rows["128k"].rstrip().endswith("| - | - |")
    assert "80.0" in rows["128k"]  # 1000 / 12.5 ms


def test_json_lines_input(tmp_path):
    lines = ["# Test Card 80GB, torch 2.11, HISA config {...}"]
    for ctx, modes in RESULTS["results"].items():
        for mode, m in modes.items():
            lines.append(json.dumps({"mode": mode, "L": int(ctx), **m}))
    src = tmp_path / "e2e.log"
    src.write_text("\n".join(lines + ["", "## a markdown table that is ignored", "| x | y |"]))
    res = plot.load_results(src)
    assert res["device"] == "Test Card 80GB"
    assert res["points"]["hisa"][32768]["ttft_s"] == 1.2
    _png_ok(plot.plot(res, tmp_path / "lines.png"))


def test_empty_results_file_is_an_error(tmp_path):
    src = tmp_path / "empty.json"
    src.write_text("{}")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "plot.py"), str(src)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "no measurements" in proc.stderr


def test_rows_list_input(tmp_path):
    rows = [{"mode": mode, "context": int(ctx), **m} for ctx, modes in RESULTS["results"].items()
            for mode, m in modes.items()]
    src = tmp_path / "rows.json"
    src.write_text(json.dumps({"device": "Row Card", "rows": rows}))
    res = plot.load_results(src)
    assert res["device"] == "Row Card" and res["points"]["dense"][8192]["decode_ms"] == 10.0
    assert "| 2.50x | 2.00x |" in plot.table(res)
