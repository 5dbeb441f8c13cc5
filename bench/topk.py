"""Top-k selection microbenchmark (GPU): the searches of ``hisa/kernels/select.py`` against a kernel that only
loads and stores a row (the floor of one program per row), latency in a CUDA graph and throughput on many rows.

    python bench/topk.py

Prints a Markdown table, µs per call. Each row is checked against ``torch.topk``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.attention import graph_time  # noqa: E402
from hisa.kernels import select  # noqa: E402


@triton.jit
def _copy_row(S, OUT, N, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    o = tl.arange(0, BLOCK)
    x = tl.load(S + r * N + o, mask=o < N, other=0.0)
    tl.store(OUT + r * N + o, x.to(tl.int32), mask=o < N)


def main():
    methods = {"value ranges": select.RANGE, "radix": select.RADIX, "bisection": select.BISECT}
    print(f"{torch.cuda.get_device_name()}, µs per call")
    print("| rows | n | k | timing | load+store only | " + " | ".join(methods) + " |")
    print("|---|---|---|---|---|" + "---|" * len(methods))
    for R, n, k, mode in [(8, 2048, 64, "graph"), (8, 4096, 2048, "graph"), (16384, 2048, 64, "throughput")]:
        sets = [torch.randn(R, n, device="cuda") * 3 for _ in range(4)]
        out = torch.empty(R, n, dtype=torch.int32, device="cuda")
        block = triton.next_power_of_2(n)
        calls = {"load+store only": lambda x: _copy_row[(R,)](x, out, n, BLOCK=block, num_warps=8)}
        for name, m in methods.items():
            want = select._topk_select_torch(sets[0], k, None, None, 1)
            if not torch.equal(select.topk_select(sets[0], k, method=m), want):
                raise SystemExit(f"{name}: wrong selection")
            calls[name] = lambda x, m=m: select.topk_select(x, k, method=m)
        cells = []
        for f in calls.values():
            f(sets[0])
            if mode == "graph":
                t = graph_time([lambda x=x, f=f: f(x) for x in sets])
            else:
                t = triton.testing.do_bench(lambda f=f: f(sets[0]), return_mode="median")
            cells.append(f"{t * 1000:.1f}")
        print(f"| {R} | {n} | {k} | {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
