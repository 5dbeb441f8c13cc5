"""One attention layer, batch 1: HISA kernels vs SDPA (cuDNN and flash backends) in the same run.

    python bench/attention.py                      # shapes 32/8/64 and 32/8/128, 8k..128k, prefill + decode
    python bench/attention.py --contexts 8k,32k --dims 64 --json out.json

Per context and head dim it reports median times (triton.testing.do_bench), the achieved FLOP rate
(prefill, counting the attention the method actually computes) or bandwidth (decode, the bytes it must
read), and the error of the HISA kernels against the pure-PyTorch specification of the same semantics
(prefill: ``reference_tiled`` on the last 256 queries; decode: the per-query reference), plus, for
information, the prefill kernel's difference to the per-query reference on the same queries.
Decode is timed eagerly and as CUDA-graph replays, rotating over several K/V sets so that HISA's small
working set is not served from L2 (a real model reads other layers in between).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hisa import HisaConfig, hisa_attention_reference, pool_keys  # noqa: E402
from hisa import kernels  # noqa: E402
from hisa.kernels import tiled  # noqa: E402
from hisa.kernels.reference_tiled import hisa_attention_tiled_reference  # noqa: E402

HQ, HKV = 32, 8


def _parse_ctx(s: str) -> list[int]:
    out = []
    for tok in s.split(","):
        tok = tok.strip().lower()
        out.append(int(float(tok[:-1]) * 1024) if tok.endswith("k") else int(tok))
    return out


def bench(fn, warmup=25, rep=100) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def graph_time(fns, reps=20) -> float:
    """ms per call of a CUDA graph that replays all ``fns`` once (median over replays)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / len(fns))
    times.sort()
    return times[len(times) // 2]


def sdpa(q, k, v, backend, causal):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def hisa_prefill_flops(L: int, D: int, cfg: HisaConfig) -> float:
    bs = cfg.block_size
    nt = math.ceil(L / bs)
    tokens = 0
    for t in range(nt):  # tile t: its queries see the kept full blocks + part of their own block
        full = min(cfg.top_blocks - 1, t) * bs
        nq = min(bs, L - t * bs)
        tokens += nq * full + nq * (nq + 1) // 2
    return 4.0 * HQ * D * tokens


def prefill_case(L, D, cfg, dtype, check_rows, results, tune):
    g = torch.Generator(device="cuda").manual_seed(L + D)
    q = torch.randn(1, HQ, L, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(1, HKV, L, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(1, HKV, L, D, device="cuda", dtype=dtype, generator=g)
    pooled = pool_keys(k, cfg.block_size)
    row = {"phase": "prefill", "L": L, "D": D, "top_blocks": cfg.top_blocks, "top_k": cfg.top_k}
    dense_flops = 2.0 * HQ * D * L * L  # causal: half of 4*L*L*D per head
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            ms = bench(lambda: sdpa(q, k, v, be, True))
            row[f"{name}_ms"] = ms
            row[f"{name}_tflops"] = dense_flops / ms / 1e9
        except Exception as e:  # noqa: BLE001 - backend unsupported here
            row[f"{name}_ms"] = None
            row[f"{name}_err"] = repr(e)[:200]
    hflops = hisa_prefill_flops(L, D, cfg)
    fn = lambda: kernels.hisa_attention(q, k, v, pooled, cfg, path="tile")  # noqa: E731
    out = fn()
    row["hisa_ms"] = bench(fn)
    row["hisa_tflops"] = hflops / row["hisa_ms"] / 1e9
    row["select_ms"] = bench(lambda: tiled.tile_blocks(q, k, pooled, cfg, 0))
    if tune:
        row["tune"] = {}
        for kern, (bm, nw, ns, *cf) in tune:
            st = {"kernel": kern, "block_m": bm, "num_warps": nw, "num_stages": ns,
                  **({"chunk_fast": bool(cf[0])} if cf else {}), **({"maxnreg": cf[1]} if len(cf) > 1 else {})}
            o = torch.empty_like(out)
            try:
                f = lambda: tiled.hisa_attention_tiled(  # noqa: E731
                    q, k, v, pooled, cfg, scale=D**-0.5, q_start=0, mask=None, out=o, settings=st)
                f()
                name = kern + " " + "/".join(str(x) for x in (bm, nw, ns, *cf))
                row["tune"][name] = bench(f)
                row["tune"][name + " err vs default"] = rel(o, out)
            except Exception as e:  # noqa: BLE001
                row["tune"][kern + " " + "/".join(str(x) for x in (bm, nw, ns, *cf))] = repr(e)[:100]
    best = min((row.get("cudnn_ms") or 1e9), (row.get("flash_ms") or 1e9))
    row["speedup_vs_best_sdpa"] = best / row["hisa_ms"]
    # correctness on the last check_rows queries (a block-aligned suffix: tile selections are per tile)
    n = min(L, check_rows)
    qs = q[:, :, L - n:]
    spec = hisa_attention_tiled_reference(qs.float(), k.float(), v.float(), pooled, cfg, query_chunk=8)
    row["err_vs_spec"] = rel(out[:, :, L - n:], spec)
    per_query = hisa_attention_reference(qs.float(), k.float(), v.float(), pooled, cfg, query_chunk=8)
    row["diff_vs_per_query_ref"] = rel(out[:, :, L - n:], per_query)
    dense = sdpa(q, k, v, SDPBackend.FLASH_ATTENTION, True)[:, :, L - n:]
    row["diff_vs_dense"] = rel(out[:, :, L - n:], dense)
    row["per_query_ref_diff_vs_dense"] = rel(per_query, dense)
    del q, k, v, pooled, out, spec, per_query, dense
    results.append(row)
    return row


def decode_sets(L, D, block_size, dtype, nsets=4):
    """``nsets`` random (q, k, v, pooled) decode inputs: one query over L keys, shapes HQ/HKV/D."""
    sets = []
    for s in range(nsets):
        g = torch.Generator(device="cuda").manual_seed(1000 * s + L + D)
        q = torch.randn(1, HQ, 1, D, device="cuda", dtype=dtype, generator=g)
        k = torch.randn(1, HKV, L, D, device="cuda", dtype=dtype, generator=g)
        v = torch.randn(1, HKV, L, D, device="cuda", dtype=dtype, generator=g)
        sets.append((q, k, v, pool_keys(k, block_size)))
    return sets


def decode_case(L, D, cfg, dtype, results, nsets=4):
    sets = decode_sets(L, D, cfg.block_size, dtype, nsets)
    row = {"phase": "decode", "L": L, "D": D, "top_blocks": cfg.top_blocks, "top_k": cfg.top_k}
    dense_bytes = 2 * HKV * L * D * 2
    nb = math.ceil(L / cfg.block_size)
    hisa_bytes = HKV * (nb * D * 4 + cfg.top_blocks * cfg.block_size * D * 2 + 2 * cfg.top_k * D * 2)

    def rot(f):
        it = [0]

        def call():
            it[0] = (it[0] + 1) % nsets
            return f(*sets[it[0]])

        return call

    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        f = lambda q, k, v, p, be=be: sdpa(q, k, v, be, False)  # noqa: E731
        try:
            f(*sets[0])
            row[f"{name}_ms"] = bench(rot(f))
            row[f"{name}_graph_ms"] = graph_time([lambda s=s, f=f: f(*s) for s in sets])
            row[f"{name}_GBps"] = dense_bytes / row[f"{name}_graph_ms"] / 1e6
        except Exception as e:  # noqa: BLE001
            row[f"{name}_ms"] = row[f"{name}_graph_ms"] = None
            row[f"{name}_err"] = repr(e)[:200]
    h = lambda q, k, v, p: kernels.hisa_attention(q, k, v, p, cfg, path="exact")  # noqa: E731
    h(*sets[0])
    row["hisa_ms"] = bench(rot(h))
    row["hisa_graph_ms"] = graph_time([lambda s=s: h(*s) for s in sets])
    row["hisa_GBps"] = hisa_bytes / row["hisa_graph_ms"] / 1e6
    fl = row.get("flash_ms")
    row["speedup_vs_flash"] = fl / row["hisa_ms"] if fl else None
    flg = row.get("flash_graph_ms")
    row["graph_speedup_vs_flash"] = flg / row["hisa_graph_ms"] if flg else None
    # variants of the selection kernels (fused scoring+select; radix / value-range / bisection searches)
    from hisa.kernels import decode, exact, select

    default = (exact.FUSED, select.SELECT_METHOD, decode.FUSED_STATIC, decode.COMBINE_LAST, decode.COMBINE_LAST_SPARSE,
               decode.SELECT_METHOD)
    row["variants"] = {}
    for fused, method in ((True, select.RADIX), (False, select.RADIX), (True, select.RANGE), (True, select.BISECT)):
        exact.FUSED, select.SELECT_METHOD = fused, method
        h(*sets[0])
        row["variants"][f"fused={fused},method={method}"] = {
            "eager_ms": bench(rot(h)), "graph_ms": graph_time([lambda s=s: h(*s) for s in sets])}
    exact.FUSED, select.SELECT_METHOD = default[:2]
    # the graph-recordable decode (what hisa.DecodeStep replays in the server): length in device memory
    length = torch.tensor([L, L - 1], dtype=torch.int32, device="cuda")
    for sparse in (True, False):
        st = lambda q, k, v, p, sparse=sparse: kernels.decode_static(q, k, v, p, length, cfg, sparse=sparse)  # noqa: E731
        st(*sets[0])
        name = "static_sparse" if sparse else "static_dense"
        row[f"{name}_graph_ms"] = graph_time([lambda s=s, st=st: st(*s) for s in sets])
        q, k, v, p = sets[0]
        ref = (hisa_attention_reference(q.float(), k.float(), v.float(), p, cfg) if sparse
               else sdpa(q.float(), k.float(), v.float(), SDPBackend.MATH, False))
        row[f"{name}_err"] = rel(st(q, k, v, p), ref)
        # the same with other designs: the value-range search, the combine in the last split, six launches
        variants = ((("range", True, select.RANGE, False), ("combine-last", True, select.RADIX, True),
                     ("six-launch", False, select.RADIX, False)) if sparse
                    else (("separate-combine", True, select.RADIX, False),))
        for label, fused_static, method, combine in variants:
            decode.FUSED_STATIC, select.SELECT_METHOD, decode.SELECT_METHOD = fused_static, method, method
            decode.COMBINE_LAST = decode.COMBINE_LAST_SPARSE = combine
            st(*sets[0])
            row[f"{name}_{label}_graph_ms"] = graph_time([lambda s=s, st=st: st(*s) for s in sets])
            row[f"{name}_{label}_err"] = rel(st(q, k, v, p), ref)
        (exact.FUSED, select.SELECT_METHOD, decode.FUSED_STATIC, decode.COMBINE_LAST, decode.COMBINE_LAST_SPARSE,
         decode.SELECT_METHOD) = default
    if flg:
        row["static_sparse_vs_flash"] = flg / row["static_sparse_graph_ms"]
        row["static_dense_vs_flash"] = flg / row["static_dense_graph_ms"]
    # host cost of issuing one call (what an eager decode step pays per layer)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(200):
        h(*sets[i % nsets])
    row["hisa_host_us"] = (time.perf_counter() - t0) / 200 * 1e6
    torch.cuda.synchronize()
    f = lambda q, k, v, p: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION, False)  # noqa: E731
    t0 = time.perf_counter()
    for i in range(200):
        f(*sets[i % nsets])
    row["flash_host_us"] = (time.perf_counter() - t0) / 200 * 1e6
    torch.cuda.synchronize()
    q, k, v, p = sets[0]
    out = h(q, k, v, p)
    ref = hisa_attention_reference(q.float(), k.float(), v.float(), p, cfg)
    row["err_vs_spec"] = rel(out, ref)
    row["diff_vs_dense"] = rel(out, sdpa(q, k, v, SDPBackend.FLASH_ATTENTION, False))
    del sets
    results.append(row)
    return row


def fmt(x, f="{:.3f}"):
    return "-" if x is None else f.format(x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="8k,32k,64k,128k")
    ap.add_argument("--decode-contexts", default=None, help="default: --contexts")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--phases", default="prefill,decode")
    ap.add_argument("--top-blocks", type=int, default=None)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--check-rows", type=int, default=256)
    ap.add_argument("--tune", default="", help="tile settings to try, [kernel:]rows/warps/stages[/chunk_fast 0|1"
                    "[/max registers]], kernel triton (default) or wgmma (Hopper), e.g. 128/8/2,128/8/3/1/128,wgmma:64/4/2")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not kernels.AVAILABLE:
        sys.exit("needs CUDA and Triton")
    cfg = HisaConfig()
    if args.top_blocks or args.top_k:
        cfg = cfg.replace(top_blocks=args.top_blocks or cfg.top_blocks, top_k=args.top_k or cfg.top_k)
    dtype = getattr(torch, args.dtype)
    tune = [(t.split(":")[0] if ":" in t else "triton", tuple(int(x) for x in t.split(":")[-1].split("/")))
            for t in args.tune.split(",") if t]
    results = []
    dev = torch.cuda.get_device_name()
    print(f"# {dev}, torch {torch.__version__}, dtype {args.dtype}, config {cfg.to_dict()}", flush=True)
    t0 = time.time()
    for D in (int(d) for d in args.dims.split(",")):
        if "prefill" in args.phases:
            for L in _parse_ctx(args.contexts):
                r = prefill_case(L, D, cfg, dtype, args.check_rows, results, tune)
                print(json.dumps(r), flush=True)
                torch.cuda.empty_cache()
        if "decode" in args.phases:
            for L in _parse_ctx(args.decode_contexts or args.contexts):
                r = decode_case(L, D, cfg, dtype, results)
                print(json.dumps(r), flush=True)
                torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps({"device": dev, "torch": torch.__version__, "config": cfg.to_dict(),
                                               "results": results}, indent=1))
    print(f"\n## {dev} — top_blocks={cfg.top_blocks} top_k={cfg.top_k} ({time.time() - t0:.0f} s)")
    print("| phase | D | ctx | cuDNN ms | flash ms | HISA ms | speed-up | HISA rate | err vs spec |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if r["phase"] == "prefill":
            print(f"| prefill | {r['D']} | {r['L'] // 1024}k | {fmt(r.get('cudnn_ms'))} | {fmt(r.get('flash_ms'))} | "
                  f"{fmt(r['hisa_ms'])} | {r['speedup_vs_best_sdpa']:.2f}x | {r['hisa_tflops']:.0f} TFLOP/s | "
                  f"{r['err_vs_spec']:.1e} |")
        else:
            print(f"| decode | {r['D']} | {r['L'] // 1024}k | {fmt(r.get('cudnn_graph_ms'), '{:.4f}')} | "
                  f"{fmt(r.get('flash_graph_ms'), '{:.4f}')} (eager {fmt(r.get('flash_ms'), '{:.4f}')}) | "
                  f"{r['hisa_graph_ms']:.4f} (eager {r['hisa_ms']:.4f}) | {fmt(r['graph_speedup_vs_flash'], '{:.2f}')}x "
                  f"(eager {fmt(r['speedup_vs_flash'], '{:.2f}')}x) | {r['hisa_GBps']:.0f} GB/s | {r['err_vs_spec']:.1e} |")
    dec = [r for r in results if r["phase"] == "decode"]
    if dec:
        print("\nGraph-recordable decode (hisa.DecodeStep's kernels), CUDA-graph replays, ms per layer call:")
        print("| D | ctx | flash ms | static dense ms (vs flash) | static HISA ms (vs flash) | err dense / HISA |")
        print("|---|---|---|---|---|---|")
        for r in dec:
            print(f"| {r['D']} | {r['L'] // 1024}k | {fmt(r.get('flash_graph_ms'), '{:.4f}')} | "
                  f"{r['static_dense_graph_ms']:.4f} ({fmt(r.get('static_dense_vs_flash'), '{:.2f}')}x) | "
                  f"{r['static_sparse_graph_ms']:.4f} ({fmt(r.get('static_sparse_vs_flash'), '{:.2f}')}x) | "
                  f"{r['static_dense_err']:.1e} / {r['static_sparse_err']:.1e} |")
        print("\nOther designs of the same (ms per layer call): HISA with the value-range search / with the combine in"
              " the last split / in six launches (separate selections); dense with a separate combine launch")
        print("| D | ctx | HISA | HISA range search | HISA combine in last split | HISA six launches | dense separate combine |")
        print("|---|---|---|---|---|---|---|")
        for r in dec:
            print(f"| {r['D']} | {r['L'] // 1024}k | {r['static_sparse_graph_ms']:.4f} | "
                  f"{r['static_sparse_range_graph_ms']:.4f} | {r['static_sparse_combine-last_graph_ms']:.4f} | "
                  f"{r['static_sparse_six-launch_graph_ms']:.4f} | {r['static_dense_separate-combine_graph_ms']:.4f} |")


if __name__ == "__main__":
    main()
