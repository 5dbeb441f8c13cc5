"""Time to first token, HISA vs stock transformers, in alternating rounds on the same weights and the same card.

    python bench/ttft_ratio.py                       # 128k tokens, 6 rounds
    python bench/ttft_ratio.py --tokens 65536 --rounds 8 --json ttft.json

A Llama-3.2-1B-shaped model with random weights (as ``bench/e2e.py``) is held twice: stock
(``attn_implementation="sdpa"``, DynamicCache) and a copy with ``apply_hisa`` (HisaCache). Each round prefills the
prompt (one forward, the last position's logits, first token read on the host) with the stock model, with HISA,
and with HISA using the Triton tile kernel instead of the Hopper one (``HISA_TILE_KERNEL=triton``; the same
kernel off Hopper). The first round (compilation) is dropped; the ratio of medians and of minima is printed.
``bench/e2e.py`` times each mode in its own block, so slow drifts of the card (clocks under the power cap,
the allocator) land on one side; alternating puts them on both.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.e2e import build_model  # noqa: E402
from hisa import HisaConfig, apply_hisa, new_cache  # noqa: E402
from hisa.patch import _cache_kwarg  # noqa: E402


@torch.no_grad()
def prefill_seconds(model, ids, cache) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1, **{_cache_kwarg(model): cache})
    out.logits[:, -1].argmax(-1).item()
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    from transformers import DynamicCache

    L = args.tokens
    dense = build_model(L + 64)
    hisa = apply_hisa(copy.deepcopy(dense), HisaConfig())
    ids = torch.randint(0, dense.config.vocab_size, (1, L), generator=torch.Generator().manual_seed(0)).cuda()
    times = {"dense": [], "hisa": [], "hisa-triton-tile": []}
    env = os.environ.get("HISA_TILE_KERNEL")
    try:
        for r in range(args.rounds):
            for mode in times:
                os.environ["HISA_TILE_KERNEL"] = "triton" if mode == "hisa-triton-tile" else (env or "auto")
                if mode == "dense":
                    t = prefill_seconds(dense, ids, DynamicCache())
                else:
                    t = prefill_seconds(hisa, ids, new_cache(hisa, L + 64))
                times[mode].append(t)
                torch.cuda.empty_cache()
                print(f"round {r} {mode}: {t:.4f} s", flush=True)
    finally:
        if env is None:
            os.environ.pop("HISA_TILE_KERNEL", None)
        else:
            os.environ["HISA_TILE_KERNEL"] = env
    kept = {m: t[1:] if len(t) > 1 else t for m, t in times.items()}
    med = {m: statistics.median(t) for m, t in kept.items()}
    best = {m: min(t) for m, t in kept.items()}
    dev = torch.cuda.get_device_name()
    print(f"\n## {dev}, {L} tokens, {len(kept['dense'])} rounds after the first")
    print("| mode | TTFT median s | min s | median vs dense | min vs dense |")
    print("|---|---|---|---|---|")
    for m in kept:
        print(f"| {m} | {med[m]:.4f} | {best[m]:.4f} | {med[m] / med['dense']:.4f} | {best[m] / best['dense']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": dev, "tokens": L, "times_s": times, "median_s": med,
                                               "min_s": best}, indent=1))


if __name__ == "__main__":
    main()
