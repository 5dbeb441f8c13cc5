"""Tile-shared HISA for prefill: one block selection per tile of queries, dense tensor-core tiles.

Semantics (implemented plainly in ``reference_tiled.py``): the queries whose positions fall in key block
``t`` form a tile. For each tile and selection unit (KV-head group, or query head with
``selection="head"``) the tile's selector is the sum of all its queries over the unit's heads; stage 1
scores the visible blocks 0..t with selector . pooled key and keeps the ``top_blocks`` best, the sink
(block 0) and the tile's own block t always kept. Every query of the tile then attends exactly (softmax)
to every causally visible token of the kept blocks that the mask allows. There is no stage-2 token pruning
in this path: each query reads ``top_blocks * block_size`` tokens (>= ``top_k``).

Kernel: one program per (tile, chunk of heads of a unit, batch x unit). Its rows are HPP heads x
block_size queries, so one gathered K/V block feeds a [HPP*bs, D] x [D, bs] tensor-core product; the
kept blocks other than the own block are fully visible and need no mask; the own block comes last.
On Hopper and later GPUs the kept blocks are fetched with the tensor memory accelerator (TMA: one
descriptor per K and V, a [block_size, D] box at the block's row): 5 % faster at head dim 64 and, with
256-row programs, 29 % faster at head dim 128 than pointer loads (H200, 128k keys). With TMA the programs are
held to 128 registers per thread so that two share an SM (``TILE_SETTINGS_TMA``).
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import triton
import triton.language as tl

from .select import topk_select

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older Triton: pointer loads only
    TensorDescriptor = None

_LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["NT", "t_first", "q_start", "Lq", "Lk"])
def _tile_attn(
    Q, K, V, KD, VD, BLK, O, MASK,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, smb, smq, smk,
    NSEL, SG, G, NT, t_first, q_start, Lq, Lk, D: tl.constexpr, top_blocks, qk_scale,
    BS: tl.constexpr, HPP: tl.constexpr, DP: tl.constexpr, HAS_MASK: tl.constexpr, TMA: tl.constexpr,
    CHUNK_FAST: tl.constexpr = False,
):
    if CHUNK_FAST:  # a tile's head chunks are neighbours in the launch order: they read the same kept blocks
        pid_c = tl.program_id(0)
        pid_t = tl.program_id(1)
    else:
        pid_t = tl.program_id(0)
        pid_c = tl.program_id(1)
    bu = tl.program_id(2)
    b = (bu // NSEL).to(tl.int64)
    u = bu % NSEL
    kv = (u * SG) // G
    t_abs = t_first + pid_t
    BLOCK_M: tl.constexpr = HPP * BS
    r = tl.arange(0, BLOCK_M)
    g = pid_c * HPP + r // BS
    qpos = t_abs * BS + r % BS
    i = qpos - q_start
    row_ok = (g < SG) & (i >= 0) & (i < Lq)
    h = (u * SG + g).to(tl.int64)
    d = tl.arange(0, DP)
    dmask = d[None, :] < D
    q = tl.load(Q + b * sqb + h[:, None] * sqh + i[:, None].to(tl.int64) * sqt + d[None, :],
                mask=row_ok[:, None] & dmask, other=0.0)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)
    kbase = K + b * skb + kv * skh
    vbase = V + b * svb + kv * svh
    n = tl.arange(0, BS)
    row = bu.to(tl.int64) * NT + pid_t
    nkept = tl.minimum(top_blocks, t_abs + 1)
    # blocks before the tile's own block: fully visible, complete
    nprev = nkept - 1
    # the next block's index is loaded one iteration ahead (a loop-carried value): the software pipeliner then
    # issues the TMA copies num_stages - 1 blocks ahead, not one block ahead behind an index load
    nxt = tl.load(BLK + row * top_blocks, mask=nprev > 0, other=0)
    for kb in range(0, nprev):
        blk = nxt
        nxt = tl.load(BLK + row * top_blocks + kb + 1, mask=kb + 1 < nprev, other=0)
        tok = (blk * BS + n).to(tl.int64)
        if TMA:  # descriptors over [B, Hkv, Lk, D]: columns past D read as zeros; K and V issued together
            kk = KD.load([b.to(tl.int32), kv, blk * BS, 0]).reshape(BS, DP)
            vv = VD.load([b.to(tl.int32), kv, blk * BS, 0]).reshape(BS, DP)
        else:
            kk = tl.load(kbase + tok[:, None] * skt + d[None, :], mask=dmask, other=0.0)
        s = tl.dot(q, tl.trans(kk))  # unscaled: the scale is folded into the exponent (one FMA)
        if HAS_MASK:
            mv = tl.load(MASK + b * smb + i[:, None].to(tl.int64) * smq + tok[None, :] * smk,
                         mask=row_ok[:, None], other=0)
            s = tl.where(mv != 0, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if not TMA:
            vv = tl.load(vbase + tok[:, None] * svt + d[None, :], mask=dmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
        m_i = m_new
    # the tile's own block: causal inside, possibly partial at the end of the keys
    tok = (t_abs * BS + n).to(tl.int64)
    tok_ok = tok < Lk
    if TMA:  # rows past the keys (the descriptor's bounds) read as zeros
        kk = KD.load([b.to(tl.int32), kv, t_abs * BS, 0]).reshape(BS, DP)
    else:
        kk = tl.load(kbase + tok[:, None] * skt + d[None, :], mask=tok_ok[:, None] & dmask, other=0.0)
    s = tl.dot(q, tl.trans(kk))
    vis = (tok[None, :] <= qpos[:, None]) & tok_ok[None, :]
    if HAS_MASK:
        mv = tl.load(MASK + b * smb + i[:, None].to(tl.int64) * smq + tok[None, :] * smk,
                     mask=row_ok[:, None] & vis, other=0)
        vis = vis & (mv != 0)
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if TMA:
        vv = VD.load([b.to(tl.int32), kv, t_abs * BS, 0]).reshape(BS, DP)
    else:
        vv = tl.load(vbase + tok[:, None] * svt + d[None, :], mask=tok_ok[:, None] & dmask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(O + b * sob + h[:, None] * soh + i[:, None].to(tl.int64) * sot + d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & dmask)


# (rows per program, warps, pipeline stages[, register cap]). Pointer loads: chosen by bench/attention.py --tune on
# an H100 (128/8/2 best at head dims 64 and 128). TMA loads, by head dim (<= 64, larger): measured on an H200 at
# 128k keys (docs/benchmarks.md). "maxnreg" caps the registers per thread so that two 8-warp programs share an SM
# (uncapped the kernel takes 186 at head dim 64: one program per SM); the spills (124 bytes) fall outside the main
# loop. Head dim 64: 128 rows / 8 warps / 3 stages (the block index loaded one iteration ahead, 3 stages keep two
# blocks in flight), capped: 11.08-11.18 vs 11.34-11.49 ms uncapped. Head dim 128: 128 rows / 8 warps / 2 stages
# capped (two programs' shared memory fit an SM with 2 stages, not 3): 18.06-18.22 vs 18.23-18.64 ms for the
# previous 256 rows / 16 warps / 3 stages (uncapped 128-row programs were 15-33 % slower). Outputs bit-identical.
TILE_SETTINGS = {"block_m": 128, "num_warps": 8, "num_stages": 2}
TILE_SETTINGS_TMA = {64: {"block_m": 128, "num_warps": 8, "num_stages": 3, "maxnreg": 128},
                     128: {"block_m": 128, "num_warps": 8, "num_stages": 2, "maxnreg": 128}}
# launch order: the head chunks of one tile next to each other (they share every kept K/V block) instead of
# the tiles of one head chunk; settings key "chunk_fast" overrides
CHUNK_FAST = True
_TMA_ENV = "HISA_TMA"  # "0": pointer loads everywhere
# Hopper (compute capability 9.x): the Gluon kernel of tiled_wgmma.py (asynchronous warpgroup MMAs overlapped with
# the softmax, row sums by a product with ones). Settings by head dim (<= 64, larger); "auto": used without being
# asked for. H100, 128k, alternating rounds in one process: at head dim 64 (one 4-warp program per head, 4 per SM,
# 2 stages) the 1B model's TTFT is 0.605 s against 0.610 with the row sums on the CUDA cores and 0.620 with this
# file's kernel (two earlier machines: 0.615 / 0.618 vs 0.629 / 0.633); alone 10.62 vs 10.85 ms per layer. At
# head dim 128 it is slower (19.5 vs 18.3 ms): this file's kernel there. HISA_TILE_KERNEL=triton: never, =wgmma:
# wherever it applies (settings key "kernel" likewise, per call).
_KERNEL_ENV = "HISA_TILE_KERNEL"
_WGMMA_FAILED = False  # set when the Hopper kernel failed to build here: auto then means the Triton kernel
WGMMA_SETTINGS = {64: {"block_m": 64, "num_warps": 4, "num_stages": 2, "sum_mma": True, "auto": True},
                  128: {"block_m": 64, "num_warps": 4, "num_stages": 3, "sum_mma": True, "auto": False}}


def use_tma(k, v) -> bool:
    """Whether K/V blocks can be fetched with TMA descriptors: a Hopper or later GPU, a Triton with tensor
    descriptors, and 16-byte aligned K/V buffers with contiguous rows."""
    if TensorDescriptor is None or os.environ.get(_TMA_ENV, "1") == "0" or not k.is_cuda:
        return False
    if torch.cuda.get_device_capability(k.device)[0] < 9:
        return False
    for t in (k, v):
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st * t.element_size() % 16 for st in t.stride()[:-1]):
            return False
    return True


def settings_for(D: int, tma: bool) -> dict:
    if not tma:
        return dict(TILE_SETTINGS)
    return dict(TILE_SETTINGS_TMA[64 if D <= 64 else 128])


def _wgmma_applies(q, k, out, D: int, bs: int, rows: int, warps: int, mask) -> bool:
    """Whether the Hopper kernel of tiled_wgmma.py can run this call (K/V already known to suit TMA): no mask,
    bf16/fp16, head dim a power of two up to 128, blocks of 16-64 keys, at least 16 rows per warp."""
    from . import tiled_wgmma  # noqa: PLC0415

    if not (mask is None and tiled_wgmma.available()):
        return False
    if torch.cuda.get_device_capability(q.device)[0] != 9:  # wgmma is Hopper's instruction
        return False
    return (q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype and out.dtype == q.dtype
            and D in (16, 32, 64, 128) and bs % 16 == 0 and bs <= 64 and warps % 4 == 0
            and rows >= 16 * warps and q.stride(-1) == 1 and out.stride(-1) == 1)


def tile_supported(config, D: int) -> bool:
    bs = config.block_size
    return bs in (16, 32, 64, 128) and D <= 256


@triton.jit(do_not_specialize=["NT", "t_first", "q_start", "Lq"])
def _tile_sums_kernel(
    Q, S, sqb, sqh, sqt, NSEL, SG, NT, t_first, q_start, Lq, D, bs,
    BS: tl.constexpr, SGP: tl.constexpr, DP: tl.constexpr,
):
    """Program (tile, batch x unit): the tile's queries summed over its rows and the unit's heads (float32)."""
    pid_t = tl.program_id(0)
    bu = tl.program_id(1)
    b = (bu // NSEL).to(tl.int64)
    u = bu % NSEL
    r = tl.arange(0, BS * SGP)
    g = r % SGP
    j = r // SGP
    i = (t_first + pid_t) * bs + j - q_start
    ok = (g < SG) & (j < bs) & (i >= 0) & (i < Lq)
    d = tl.arange(0, DP)
    h = (u * SG + g).to(tl.int64)
    x = tl.load(Q + b * sqb + h[:, None] * sqh + i[:, None].to(tl.int64) * sqt + d[None, :],
                mask=ok[:, None] & (d[None, :] < D), other=0.0)
    s = tl.sum(x.to(tl.float32), 0)
    tl.store(S + (bu.to(tl.int64) * NT + pid_t) * D + d, s, mask=d < D)


def _tile_sums(q, bs: int, q_start: int, SG: int):
    """[B, NSEL, NT, D] float32: each tile's queries summed over the tile and the unit's heads (one pass over
    q in its own layout; the PyTorch reduction over two non-adjacent dims ran at ~1/3 of the bandwidth)."""
    B, Hq, Lq, D = q.shape
    NSEL = Hq // SG
    t_first = q_start // bs
    NT = (q_start + Lq - 1) // bs - t_first + 1
    out = torch.empty(B, NSEL, NT, D, dtype=torch.float32, device=q.device)
    _tile_sums_kernel[(NT, B * NSEL)](
        q, out, q.stride(0), q.stride(1), q.stride(2), NSEL, SG, NT, t_first, q_start, Lq, D, bs,
        BS=triton.next_power_of_2(bs), SGP=triton.next_power_of_2(SG), DP=triton.next_power_of_2(D),
        num_warps=4,
    )
    return out


def tile_blocks(q, k, pooled, config, q_start: int):
    """Stage 1 per tile: [B*NSEL*NT, top_blocks] int32 kept block indices (ascending, -1 padded)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    SG = G if config.selection == "group" else 1
    NSEL = Hq // SG
    bs = config.block_size
    NB = math.ceil(Lk / bs)
    t_first = q_start // bs
    sums = _tile_sums(q, bs, q_start, SG)  # [B, NSEL, NT, D]
    NT = sums.shape[2]
    pk = pooled[:, :, :NB].float()
    scores = torch.matmul(sums.view(B, Hkv, (NSEL // Hkv) * NT, D), pk.transpose(-1, -2))
    scores = scores.view(B * NSEL * NT, NB)
    return topk_select(scores, config.top_blocks, n=NB, nvis=(t_first * bs, bs, NT, bs)), NT, t_first


def _kernel_choice(settings) -> str:
    """'auto', 'triton' or 'wgmma': the settings' "kernel", else HISA_TILE_KERNEL; settings that tune rows / warps /
    stages without naming a kernel are the Triton kernel's (as before the Hopper kernel existed)."""
    settings = settings or {}
    kernel = settings.get("kernel")
    if kernel is None:
        tuned = any(n not in ("tma", "kernel") for n in settings)
        kernel = "triton" if tuned else os.environ.get(_KERNEL_ENV, "auto") or "auto"
    if kernel not in ("auto", "triton", "wgmma"):
        raise ValueError(f"tile kernel must be auto, triton or wgmma ({_KERNEL_ENV} or settings['kernel']), "
                         f"got {kernel!r}")
    return kernel


def _run_wgmma(q, k, v, blk, out, config, settings, forced: bool, *, NSEL, SG, G, NT, t_first, q_start, scale,
               mask) -> bool:
    """Run the Hopper kernel of tiled_wgmma.py if it applies (and, unless forced, is the default at this head
    dim); False: the caller runs the Triton kernel."""
    global _WGMMA_FAILED
    Lq, D = q.shape[2], q.shape[3]
    bs = config.block_size
    wst = {**WGMMA_SETTINGS[64 if D <= 64 else 128],
           **{n: x for n, x in (settings or {}).items() if n not in ("tma", "kernel")}}
    if not (forced or (wst["auto"] and not _WGMMA_FAILED)):
        return False
    hpp = max(1, min(triton.next_power_of_2(SG), wst["block_m"] // bs))
    warps = min(wst["num_warps"], max(4, hpp * bs // 16 // 4 * 4))
    if not _wgmma_applies(q, k, out, D, bs, hpp * bs, warps, mask):
        return False
    from . import tiled_wgmma  # noqa: PLC0415

    nchunk = triton.cdiv(SG, hpp)
    try:
        tiled_wgmma.launch(
            q, k, v, blk, out, NSEL=NSEL, SG=SG, G=G, NT=NT, t_first=t_first, q_start=q_start, Lq=Lq,
            Lk=k.shape[2], top_blocks=config.top_blocks, qk_scale=scale * _LOG2E, bs=bs, hpp=hpp,
            chunk_fast=bool(wst.get("chunk_fast", CHUNK_FAST)) and nchunk > 1 and NT < 65536, num_warps=warps,
            stages=wst["num_stages"], sum_mma=bool(wst.get("sum_mma")), maxnreg=wst.get("maxnreg"))
    except Exception as e:  # a Triton/Gluon build this kernel does not compile with: keep serving with the other
        if forced:
            raise
        _WGMMA_FAILED = True
        warnings.warn(f"the Hopper tile kernel failed ({type(e).__name__}: {str(e)[:200]}); using the Triton "
                      f"tile kernel from now on", RuntimeWarning, stacklevel=2)
        return False
    return True


def hisa_attention_tiled(q, k, v, pooled, config, *, scale, q_start, mask, out, settings=None):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    SG = G if config.selection == "group" else 1
    NSEL = Hq // SG
    bs = config.block_size
    tma = use_tma(k, v) if (settings or {}).get("tma") is None else bool(settings["tma"])
    st = {**settings_for(D, tma), **{n: x for n, x in (settings or {}).items() if n not in ("tma", "kernel")}}
    blk, NT, t_first = tile_blocks(q, k, pooled, config, q_start)
    kernel = _kernel_choice(settings)
    if kernel != "triton" and tma and _run_wgmma(q, k, v, blk, out, config, settings, kernel == "wgmma", NSEL=NSEL,
                                                 SG=SG, G=G, NT=NT, t_first=t_first, q_start=q_start, scale=scale,
                                                 mask=mask):
        return out
    hpp = max(1, min(triton.next_power_of_2(SG), st["block_m"] // bs))
    warps = st["num_warps"]
    if tma and hpp * bs < st["block_m"]:  # fewer rows than the setting's (small groups): warps in proportion
        warps = max(4, warps * hpp * bs // st["block_m"])
    DP = triton.next_power_of_2(D)
    kd, vd = k, v
    if tma:
        kd, vd = (TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, bs, DP]) for t in (k, v))
    m_arg = mask if mask is not None else blk
    ms = (mask.stride(0), mask.stride(2), mask.stride(3)) if mask is not None else (0, 0, 0)
    nchunk = triton.cdiv(SG, hpp)
    chunk_fast = bool(st.get("chunk_fast", CHUNK_FAST)) and nchunk > 1 and NT < 65536
    grid = (nchunk, NT, B * NSEL) if chunk_fast else (NT, nchunk, B * NSEL)
    _tile_attn[grid](
        q, k, v, kd, vd, blk, out, m_arg,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2), *ms,
        NSEL, SG, G, NT, t_first, q_start, Lq, Lk, D, config.top_blocks, scale * _LOG2E,
        BS=bs, HPP=hpp, DP=DP, HAS_MASK=mask is not None, TMA=tma, CHUNK_FAST=chunk_fast,
        num_warps=warps, num_stages=st["num_stages"], **({"maxnreg": st["maxnreg"]} if st.get("maxnreg") else {}),
    )
    return out
