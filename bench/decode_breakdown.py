"""Where one layer's graph-recorded sparse decode spends its time, kernel by kernel, beside SDPA flash.

    python bench/decode_breakdown.py                       # 128k keys, head dims 64 and 128
    python bench/decode_breakdown.py --context 256k --variants
    python bench/decode_breakdown.py --variants dependent,last,5-bit   # only the variants naming these words

One decode query (32 query heads, 8 KV heads, bf16, default HisaConfig) over a full cache, replayed in a CUDA
graph over 4 K/V sets (as bench/attention.py does, so that the small working set is not served from L2), with
SDPA's flash backend timed the same way in the same run. Then the per-kernel GPU time of the replays
(torch.profiler) and, with ``--variants``, the module switches of ``hisa.kernels.decode`` measured against
each other (compacted kept-token list or the list with holes; warps of the selecting programs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.attention import _parse_ctx, decode_sets, graph_time, rel, sdpa  # noqa: E402
from hisa import HisaConfig, hisa_attention_reference, kernels  # noqa: E402
from hisa.kernels import decode  # noqa: E402


def _kernel_times(fn, sets, reps=20) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*sets[0])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for s in sets:
            fn(*s)
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
    calls = reps * len(sets)
    return {e.key: e.device_time_total / e.count for e in prof.key_averages()
            if e.device_type.name == "CUDA" and e.count >= calls}


VARIANTS = {  # name: module settings of hisa.kernels.decode
    "default": {},
    "plain launches (no programmatic dependent launch)": {"PDL": False},
    "programmatic dependent launches up to head dim 64 only": {"PDL_MAX_HEAD_DIM": 64},
    "compacted kept list": {"COMPACT_KEPT": True},
    "holes, 64-token attention tiles": {"HOLES_TILE": 64, "HOLES_TILE_LARGE_D": 64},
    "holes, 128-token attention tiles": {"HOLES_TILE": 128, "HOLES_TILE_LARGE_D": 128},
    "16 warps in both selecting kernels": {"_warps": lambda width: 16},
    "partials merged by the last split (no combine launch)": {"COMBINE_LAST_SPARSE": True},
    "8-bit radix search": {"SELECT_METHOD": 1},
    "value-range search": {"SELECT_METHOD": 2},
    "4-bit radix search": {"SELECT_METHOD": 3},
    "8 warps in both selecting kernels": {"_warps": lambda width: 8},
    "stage 2 with 2 kept blocks per program": {"STAGE2_BLOCKS": 2},
    "stage 1 with 256 pooled keys per program": {"STAGE1_SLICE": 256},
    "stage 1 with 64 pooled keys per program": {"STAGE1_SLICE": 64},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", default="128k")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--variants", nargs="?", const="", default=None,
                    help="measure the module variants too; optionally only those whose name contains one of "
                         "these comma-separated words")
    args = ap.parse_args()
    L = _parse_ctx(args.context)[0]
    cfg = HisaConfig()
    print(torch.cuda.get_device_name())
    rows = []
    for D in (int(d) for d in args.dims.split(",")):
        sets = decode_sets(L, D, cfg.block_size, torch.bfloat16)
        flash = graph_time([lambda s=s: sdpa(*s[:3], SDPBackend.FLASH_ATTENTION, False) for s in sets], reps=50)
        length = torch.tensor([L, L - 1], dtype=torch.int32, device="cuda")

        def step(q, k, v, p):
            return kernels.decode_static(q, k, v, p, length, cfg, sparse=True)

        q, k, v, p = sets[0]
        ref = hisa_attention_reference(q.float(), k.float(), v.float(), p, cfg)
        words = [w for w in (args.variants or "").split(",") if w]
        chosen = [(n, st) for n, st in VARIANTS.items()
                  if n == "default" or (args.variants is not None and (not words or any(w in n for w in words)))]
        for name, settings in chosen:
            saved = {a: getattr(decode, a) for a in settings}
            for a, val in settings.items():
                setattr(decode, a, val)
            try:
                err = rel(step(q, k, v, p), ref)
                t = min(graph_time([lambda s=s: step(*s) for s in sets], reps=50) for _ in range(2))
            finally:
                for a, val in saved.items():
                    setattr(decode, a, val)
            rows.append(f"D {D} {name}: {t * 1000:.1f} us, {flash / t:.2f}x SDPA flash ({flash * 1000:.1f} us), "
                        f"err vs spec {err:.1e}")
            print(rows[-1], flush=True)
        for kernel, us in _kernel_times(step, sets).items():
            rows.append(f"  D {D} {kernel[:40]}: {us:.2f} us")
            print(rows[-1], flush=True)
        del sets
        torch.cuda.empty_cache()
    print("\n".join(rows))


if __name__ == "__main__":
    main()
