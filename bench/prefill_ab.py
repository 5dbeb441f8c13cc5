"""Time to first token at 128k, A/B in one process: today's prefill against the previous eager append and tile
sums.

A Llama-3.2-1B-shaped model with random weights and HISA applied prefills 128k tokens (one forward, last
position's logits) four times in each of four settings, alternating: both changes ("new"), neither ("old": the
strided K/V copies plus the pooling pass, and the PyTorch reduction for the tile selectors, re-created here),
and each alone. Prints the best and all times per setting.

    python bench/prefill_ab.py [--tokens 131072] [--reps 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.prefill_variants import report, time_settings  # noqa: E402
from hisa import cache as cache_mod  # noqa: E402
from hisa.kernels import tiled  # noqa: E402


def torch_tile_sums(q, bs: int, q_start: int, SG: int):
    """The tile selectors as PyTorch reduced them before the Triton kernel (same values)."""
    B, Hq, Lq, D = q.shape
    t_first, t_last = q_start // bs, (q_start + Lq - 1) // bs
    NT = t_last - t_first + 1
    front = q_start - t_first * bs
    back = NT * bs - Lq - front
    if not front and not back:
        return q.reshape(B, Hq // SG, SG, NT, bs, D).sum((2, 4), dtype=torch.float32)
    qs = q.reshape(B, Hq // SG, SG, Lq, D).sum(2, dtype=torch.float32)
    qs = torch.nn.functional.pad(qs, (0, 0, front, back))
    return qs.view(B, Hq // SG, NT, bs, D).sum(3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()
    old_append = {(cache_mod, "APPEND_KERNEL_MIN"): 1 << 60}
    old_sums = {(tiled, "_tile_sums"): torch_tile_sums}
    settings = {"new": {}, "old": {**old_append, **old_sums}, "append only": old_sums, "sums only": old_append}
    report(time_settings(settings, args.tokens, args.reps, warmup=0), args.tokens)


if __name__ == "__main__":
    main()
