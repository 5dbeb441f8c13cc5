"""Time to first token at 128k with module settings of the prefill kernels, A/B in one process.

A Llama-3.2-1B-shaped model with random weights and HISA applied prefills 128k tokens (one forward, last
position's logits) ``--reps`` times per setting, the settings alternating so that clocks and memory state are
shared: today's defaults, the residual additions as separate passes (``fused.FUSE_RESIDUAL`` off), the tile
kernel launched tile-major within a head chunk (``tiled.CHUNK_FAST`` off), and the tile selection in one launch at
the full width instead of bands of rows by visible width (``select.BAND_MIN_WIDTH``), and the tile kernel without
its register cap (``maxnreg`` in ``tiled.TILE_SETTINGS_TMA``: one program per SM instead of two), and the Triton
tile kernel instead of the Hopper (Gluon) one. The launch-order and register-cap variants change the Triton
kernel only, which on Hopper runs at head dim 128 (the 1B model's head dim 64 runs the Gluon kernel).

    python bench/prefill_variants.py [--tokens 131072] [--reps 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.e2e import build_model  # noqa: E402
from hisa import HisaConfig, apply_hisa, fused, new_cache  # noqa: E402
from hisa.kernels import select, tiled  # noqa: E402
from hisa.patch import _cache_kwarg  # noqa: E402

SETTINGS = {
    "default": {},
    "separate residual adds": {(fused, "FUSE_RESIDUAL"): False},
    "tile launch order: the tiles of a head chunk adjacent": {(tiled, "CHUNK_FAST"): False},
    "tile selection in one launch (no width bands)": {(select, "BAND_MIN_WIDTH"): 1 << 30},
    "tile kernel without its register cap (one program per SM)": {(tiled, "TILE_SETTINGS_TMA"): {
        d: {n: x for n, x in st.items() if n != "maxnreg"} for d, st in tiled.TILE_SETTINGS_TMA.items()}},
    "Triton tile kernel on Hopper too": {(tiled, "WGMMA_SETTINGS"): {
        d: {**st, "auto": False} for d, st in tiled.WGMMA_SETTINGS.items()}},
}


def time_settings(settings: dict, tokens: int, reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of one 128k-style prefill (a 1B-shaped model, HISA applied) per setting, the settings alternating
    round by round; a setting maps (module, attribute) to the value it has while its forward runs. The first
    ``warmup`` rounds (compilation) are not kept."""
    model = build_model(tokens + 64)
    apply_hisa(model, HisaConfig())
    ids = torch.randint(0, 128256, (1, tokens), generator=torch.Generator().manual_seed(0)).cuda()
    times: dict[str, list[float]] = {k: [] for k in settings}
    with torch.no_grad():
        for rnd in range(reps + warmup):
            for label, setting in settings.items():
                saved = {key: getattr(*key) for key in setting}
                for (mod, attr), val in setting.items():
                    setattr(mod, attr, val)
                try:
                    cache = new_cache(model, tokens + 64)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    out = model(ids, use_cache=True, logits_to_keep=1, **{_cache_kwarg(model): cache})
                    out.logits[:, -1].argmax(-1).item()
                    if rnd >= warmup:
                        times[label].append(time.perf_counter() - t0)
                finally:
                    for (mod, attr), val in saved.items():
                        setattr(mod, attr, val)
                del cache, out
                torch.cuda.empty_cache()
    return times


def report(times: dict[str, list[float]], tokens: int) -> None:
    print(f"# {torch.cuda.get_device_name()}, {tokens} tokens")
    for label, ts in times.items():
        print(f"{label}: best {min(ts):.4f} s, all {[round(t, 4) for t in ts]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()
    report(time_settings(SETTINGS, args.tokens, args.reps), args.tokens)


if __name__ == "__main__":
    main()
