"""Where a 1B-shaped model's time goes on the GPU (torch.profiler): one HISA prefill forward, or decode steps
through ``hisa.DecodeStep`` (the server's decode), at one context length.

    python bench/gpu_profile.py --phase prefill --context 128k
    python bench/gpu_profile.py --phase decode --context 128k

Prints the wall time (prefill s, or ms per decode step including reading the token on the host) and the
kernels by GPU time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.e2e import _parse_ctx, build_model  # noqa: E402
from hisa import HisaConfig, apply_hisa  # noqa: E402
from hisa.graph import DecodeStep  # noqa: E402
from hisa.patch import _cache_kwarg, new_cache  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["prefill", "decode"], default="prefill")
    ap.add_argument("--context", default="128k")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    L = _parse_ctx(args.context)[0]
    model = build_model(L + 256)
    apply_hisa(model, HisaConfig())
    kw = _cache_kwarg(model)
    ids = torch.randint(0, model.config.vocab_size, (1, L), device="cuda")
    reps = 1
    with torch.inference_mode():
        if args.phase == "prefill":
            for _ in range(2):
                cache = new_cache(model, max_cache_len=L + 64)
                torch.cuda.synchronize()
                t = time.perf_counter()
                model(ids, use_cache=True, logits_to_keep=1, **{kw: cache})
                torch.cuda.synchronize()
                print(f"prefill {time.perf_counter() - t:.3f} s")
                del cache
            cache = new_cache(model, max_cache_len=L + 64)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model(ids, use_cache=True, logits_to_keep=1, **{kw: cache})
                torch.cuda.synchronize()
        else:
            step = DecodeStep(model)
            cache = new_cache(model, max_cache_len=L + 128)
            tok = model(ids, use_cache=True, logits_to_keep=1, **{kw: cache}).logits[:, -1].argmax(-1)
            for _ in range(5):
                tok = step(tok, cache).argmax(-1)
            times = []
            for _ in range(21):
                torch.cuda.synchronize()
                t = time.perf_counter()
                tok = step(tok, cache).argmax(-1)
                tok.item()
                times.append(time.perf_counter() - t)
            print(f"decode {sorted(times)[10] * 1000:.2f} ms/token (median of 21)")
            reps = 5
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(reps):
                    tok = step(tok, cache).argmax(-1)
                torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events) / reps / 1e3
    print(f"GPU time per {'forward' if args.phase == 'prefill' else 'step'}: {total:.2f} ms")
    for e in events[: args.top]:
        print(f"{e.self_device_time_total / reps / 1e3:10.3f} ms  {e.count // reps:5d}x  {e.key[:100]}")


if __name__ == "__main__":
    main()
