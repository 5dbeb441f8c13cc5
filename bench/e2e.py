"""End to end: a Llama-3.2-1B-shaped model (random weights), HISA vs stock transformers SDPA, one run.

    python bench/e2e.py                          # contexts 8k,32k,64k,128k
    python bench/e2e.py --contexts 8k,32k --steps 16 --json e2e.json

Measures time to first token (prefill forward of the whole prompt + first token; best of ``--reps``, every one
reported), decode ms/token
(median over ``--steps`` single-token steps after 2 warm-up steps, each read on the host before the next
starts) and peak GPU memory, for dense
(``attn_implementation="sdpa"``, DynamicCache) then for the same weights patched with ``apply_hisa``
(HisaCache preallocated to the needed length): ``hisa`` decodes by calling the model, ``dense-graph`` /
``hisa-graph`` through ``hisa.DecodeStep`` (CUDA-graph replays, as the server decodes; HISA off / on). The graph modes also report
``decode_lookahead_ms``: ms per token over ``--steps`` tokens decoded as the server's engine does, step n+1
enqueued before token n is read on the host (greedy tokens, ``server.sampling.argmax``).
Random weights: this measures speed, not quality.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hisa import DecodeStep, HisaConfig, apply_hisa, new_cache  # noqa: E402
from hisa.patch import _cache_kwarg  # noqa: E402


def _parse_ctx(s):
    return [int(float(t[:-1]) * 1024) if t.lower().endswith("k") else int(t) for t in s.split(",")]


def build_model(max_len: int):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
        max_position_embeddings=max(131072, max_len), tie_word_embeddings=True, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return model


def _sync_time():
    torch.cuda.synchronize()
    return time.perf_counter()


def _lookahead_ms(stepper, cache, tok, steps: int) -> float:
    """ms per token of ``steps`` greedy steps pipelined as server/engine.py runs them: the step for token n is
    enqueued, then token n-1 is read on the host (pinned copy + event), so the GPU never waits for the host."""
    from server.sampling import argmax

    t0 = _sync_time()
    prev = None
    for _ in range(steps):
        tok = argmax(stepper(tok.view(-1), cache)[0])
        host = torch.empty(1, dtype=torch.long, pin_memory=True)
        host.copy_(tok, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        if prev is not None:
            prev[1].synchronize()
            prev[0].item()
        prev = (host, done)
    prev[1].synchronize()
    prev[0].item()
    return 1000 * (time.perf_counter() - t0) / steps


@torch.no_grad()
def run_one(model, ids, make_cache, steps, reps=2, decode_flash=False, stepper=None):
    ttfts = []
    for _ in range(reps):  # TTFT: best of ``reps`` prefills, each into a fresh cache
        cache = None
        torch.cuda.empty_cache()
        cache = make_cache()
        kw = {_cache_kwarg(model): cache}
        torch.cuda.reset_peak_memory_stats()
        t0 = _sync_time()
        out = model(ids, use_cache=True, logits_to_keep=1, **kw)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        ttfts.append(_sync_time() - t0)
    ttft = min(ttfts)
    times = []
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = None
    for i in range(steps + 2):
        a = _sync_time()
        if stepper is not None:  # the engine's decode: CUDA-graph replay, one host sync per token
            from server.sampling import argmax

            nxt = argmax(stepper(nxt.view(-1), cache)[0])
            nxt.cpu()
        else:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if decode_flash else contextlib.nullcontext():
                out = model(nxt, use_cache=True, logits_to_keep=1, **kw)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        b = _sync_time()
        if i == 0:
            first = b - a  # includes recording the CUDA graph for graph modes
        if i >= 2:
            times.append(b - a)
    times.sort()
    r = {"ttft_s": ttft, "ttft_all_s": [round(t, 4) for t in ttfts], "decode_ms": 1000 * times[len(times) // 2], "first_step_ms": 1000 * first,
         "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    if stepper is not None:
        r["decode_lookahead_ms"] = _lookahead_ms(stepper, cache, nxt, steps)
        r["graph_replays"] = stepper.replays
        r["graph_failed"] = stepper.failed
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="8k,32k,64k,128k")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3, help="TTFT: best of this many prefills")
    ap.add_argument("--top-blocks", type=int, default=None)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--modes", default="dense,dense-flash,hisa,dense-graph,hisa-graph",
                    help="dense = stock SDPA; dense-flash = stock SDPA with decode pinned to the flash backend; "
                    "hisa = apply_hisa, decode through model(); dense-graph / hisa-graph = apply_hisa with HISA "
                    "off / on, decode through hisa.DecodeStep (CUDA graphs, as the server decodes)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from transformers import DynamicCache

    ctxs = _parse_ctx(args.contexts)
    model = build_model(max(ctxs) + args.steps + 8)
    hcfg = HisaConfig()
    if args.top_blocks or args.top_k:
        hcfg = hcfg.replace(top_blocks=args.top_blocks or hcfg.top_blocks, top_k=args.top_k or hcfg.top_k)
    dev = torch.cuda.get_device_name()
    print(f"# {dev}, torch {torch.__version__}, HISA config {hcfg.to_dict()}", flush=True)
    g = torch.Generator(device="cpu").manual_seed(0)
    prompts = {L: torch.randint(0, 128256, (1, L), generator=g).cuda() for L in ctxs}
    warm = torch.randint(0, 128256, (1, 20000), generator=g).cuda()
    results = {}
    order = ["dense", "dense-flash", "hisa", "dense-graph", "hisa-graph"]  # stock modes before apply_hisa
    modes = sorted(args.modes.split(","), key=order.index)
    for mode in modes:
        stepper = None
        if mode in ("hisa", "hisa-graph", "dense-graph"):
            apply_hisa(model, hcfg.replace(enabled=False) if mode == "dense-graph" else hcfg)
            if mode.endswith("graph"):
                stepper = DecodeStep(model)
        patched = mode not in ("dense", "dense-flash")
        mk = (lambda L: new_cache(model, L + 2 * args.steps + 8)) if patched else (lambda L: DynamicCache())
        flash = mode == "dense-flash"
        run_one(model, warm, lambda: mk(warm.shape[1]), 2, reps=1, decode_flash=flash, stepper=stepper)  # warm-up
        for L in ctxs:
            r = run_one(model, prompts[L], lambda L=L: mk(L), args.steps, reps=args.reps, decode_flash=flash,
                        stepper=stepper)
            results.setdefault(L, {})[mode] = r
            print(json.dumps({"mode": mode, "L": L, **r}), flush=True)
            torch.cuda.empty_cache()
    print(f"\n## {dev} — Llama-3.2-1B shape, random weights, bf16, batch 1; HISA top_blocks={hcfg.top_blocks} "
          f"top_k={hcfg.top_k}")
    print("| ctx | mode | TTFT s | TTFT vs dense | decode ms/tok | decode vs dense | lookahead ms/tok | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for L, r in results.items():
        d = r.get("dense")
        for mode, x in r.items():
            rt = f"{x['ttft_s'] / d['ttft_s']:.2f}" if d else "-"
            rd = f"{x['decode_ms'] / d['decode_ms']:.2f}" if d else "-"
            la = f"{x['decode_lookahead_ms']:.2f}" if "decode_lookahead_ms" in x else "-"
            print(f"| {L // 1024}k | {mode} | {x['ttft_s']:.3f} | {rt} | {x['decode_ms']:.2f} | {rd} | {la} | "
                  f"{x['peak_gib']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": dev, "config": hcfg.to_dict(),
                                               "results": {str(k): v for k, v in results.items()}}, indent=1))


if __name__ == "__main__":
    main()
