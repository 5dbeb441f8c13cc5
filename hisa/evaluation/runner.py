"""The whole evaluation: perplexity windows and needle grid for one model and one HISA config."""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import HisaConfig
from ..patch import apply_hisa
from .needle import plan_trial, run_planned
from .perplexity import evaluate_windows, text_windows
from .report import needle_rows, summary_line, write_report


@dataclass
class EvalSettings:
    lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192])
    depths: int = 11  # needle depths per length, evenly from 0% to 100%
    needles_per_cell: int = 1
    ppl_windows: int = 2
    max_new_tokens: int = 32
    seed: int = 0
    skip_needle: bool = False
    skip_ppl: bool = False
    chunk: int = 512  # positions projected to logits at once

    def depth_values(self) -> list[float]:
        if self.depths < 1:
            raise ValueError("depths must be >= 1")
        if self.depths == 1:
            return [0.5]
        return [round(i / (self.depths - 1), 4) for i in range(self.depths)]


def backend_info(device) -> dict:
    """Which HISA implementation runs on ``device`` (hisa.ops decides from $HISA_BACKEND)."""
    from .. import ops  # noqa: PLC0415

    name = ops.backend_for(torch.empty(0, device=device))
    info = {"backend": name, "HISA_BACKEND": os.environ.get("HISA_BACKEND", "auto")}
    if name == "triton":
        from ..kernels import prefill_mode  # noqa: PLC0415

        info["prefill"] = prefill_mode()  # "tile": tile-shared prefill selection; "exact": per query
        info["dense_below"] = {"prefill": ops.dense_crossover(1 << 20), "decode": ops.dense_crossover(1)}
    return info


def spread_order(values: list) -> list:
    """Coarse to fine: middle, ends, then the midpoints of the largest gaps (0,25,50,75,100 -> 50,0,100,25,75)."""
    if len(values) <= 2:
        return list(values)
    order = [len(values) // 2, 0, len(values) - 1]
    while len(order) < len(values):
        taken = sorted(order)
        gaps = [(b - a, (a + b) // 2) for a, b in zip(taken, taken[1:]) if b - a > 1]
        order.append(max(gaps)[1])
    return [values[i] for i in order]


def _max_context(model) -> int | None:
    cfg = model.config.get_text_config(decoder=True)
    return getattr(cfg, "max_position_embeddings", None)


def run_evaluation(model, tokenizer, text: str, config: HisaConfig, settings: EvalSettings, *,
                   out: str | Path | None = None, model_name: str = "model", text_name: str = "text",
                   progress: bool = True) -> dict:
    """Evaluate ``model`` (patched in place with ``config``) on ``text``; write the report to ``out``
    when given. Returns the results dict (the content of results.json)."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    t0 = time.perf_counter()
    torch.manual_seed(settings.seed)
    apply_hisa(model, config)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    max_ctx = _max_context(model)
    lengths = sorted(set(settings.lengths))
    if any(n < 64 for n in lengths):
        raise ValueError(f"lengths must be >= 64 tokens, got {lengths}")
    if max_ctx and max(lengths) > max_ctx:
        raise ValueError(f"length {max(lengths)} exceeds the model's context ({max_ctx} tokens)")
    if ids.numel() < max(lengths):
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than the longest length {max(lengths)}")

    depths = settings.depth_values()
    windows = {} if settings.skip_ppl else {n: text_windows(ids, n, settings.ppl_windows) for n in lengths}
    n_ppl = sum(len(w) for w in windows.values()) * 2
    n_needle = 0 if settings.skip_needle else len(lengths) * len(depths) * settings.needles_per_cell
    bar = tqdm(total=n_ppl + n_needle, desc="hisa-eval", unit="step", disable=not progress, dynamic_ncols=True)

    results: dict = {
        "model": model_name,
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "text": text_name,
        "text_tokens": int(ids.numel()),
        "seed": settings.seed,
        "config": config.to_dict(),
        "backend": backend_info(next(model.parameters()).device),
        "settings": {k: v for k, v in settings.__dict__.items()},
        "perplexity": None,
        "needle": None,
    }

    try:
        if not settings.skip_ppl:
            rows = []
            results["perplexity"] = rows
            for n in lengths:
                bar.set_postfix_str(f"perplexity @ {n}")
                res = evaluate_windows(model, windows[n], config, chunk=settings.chunk,
                                       on_step=lambda _: bar.update(1))
                rows.append({"length": n, **res})

        if not settings.skip_needle:
            # needles are drawn in a fixed order (so a seed gives the same needles whatever runs), then run
            # depth by depth over all lengths, coarse to fine: an interrupted run still covers every row
            rng = random.Random(settings.seed)
            plan = {}
            for n in lengths:
                for d in depths:
                    for i in range(settings.needles_per_cell):
                        plan[n, d, i] = plan_trial(rng, ids.numel(), n)
            trials = []
            results["needle"] = {"lengths": lengths, "depths": depths, "per_cell": settings.needles_per_cell,
                                 "trials": trials, "rows": []}
            text_ids = ids.tolist()
            for d in spread_order(depths):
                for n in lengths:
                    # the prompt plus the answer must fit the model's context
                    prompt_len = min(n, max_ctx - settings.max_new_tokens) if max_ctx else n
                    for i in range(settings.needles_per_cell):
                        bar.set_postfix_str(f"needle @ {n} tokens, depth {100 * d:.0f}%")
                        needle, offset = plan[n, d, i]
                        trial = run_planned(model, tokenizer, text_ids, prompt_len, d, needle, offset,
                                            settings.max_new_tokens)
                        trial.length = n  # the row it belongs to (prompt_tokens has the exact size)
                        trials.append(trial.to_dict())
                        results["needle"]["rows"] = needle_rows(trials, lengths)
                        bar.update(1)
    except KeyboardInterrupt:
        results["interrupted"] = True
        bar.write("hisa-eval: interrupted, writing the report of what finished")
    bar.close()
    if results["needle"] is not None:
        results["needle"]["trials"].sort(key=lambda t: (t["length"], t["depth"]))
    results.setdefault("interrupted", False)
    results["elapsed_s"] = time.perf_counter() - t0
    results["summary"] = summary_line(results)
    if out is not None:
        results["files"] = {k: str(v) for k, v in write_report(Path(out), results).items()}
    return results
