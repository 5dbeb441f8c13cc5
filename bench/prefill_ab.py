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
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.e2e import build_model  # noqa: E402
from hisa import HisaConfig, apply_hisa, new_cache  # noqa: E402
from hisa import cache as cache_mod  # noqa: E402
from hisa.kernels import tiled  # noqa: E402
from hisa.patch import _cache_kwarg  # noqa: E402


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
    kernel_sums, append_min = tiled._tile_sums, cache_mod.APPEND_KERNEL_MIN
    model = build_model(args.tokens + 64)
    apply_hisa(model, HisaConfig())
    ids = torch.randint(0, 128256, (1, args.tokens), generator=torch.Generator().manual_seed(0)).cuda()
    settings = {"new": (True, True), "old": (False, False), "append only": (True, False), "sums only": (False, True)}
    times: dict[str, list[float]] = {k: [] for k in settings}
    with torch.no_grad():
        for _ in range(args.reps):
            for label, (append, sums) in settings.items():
                cache_mod.APPEND_KERNEL_MIN = append_min if append else 1 << 60
                tiled._tile_sums = kernel_sums if sums else torch_tile_sums
                cache = new_cache(model, args.tokens + 64)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = model(ids, use_cache=True, logits_to_keep=1, **{_cache_kwarg(model): cache})
                out.logits[:, -1].argmax(-1).item()
                times[label].append(time.perf_counter() - t0)
                del cache, out
                torch.cuda.empty_cache()
    cache_mod.APPEND_KERNEL_MIN, tiled._tile_sums = append_min, kernel_sums
    print(f"# {torch.cuda.get_device_name()}, {args.tokens} tokens")
    for label, ts in times.items():
        print(f"{label}: best {min(ts):.4f} s, all {[round(t, 4) for t in ts]}")


if __name__ == "__main__":
    main()
