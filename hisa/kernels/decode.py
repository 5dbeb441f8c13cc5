"""Graph-recordable decode: one query per sequence over a cache's full-capacity buffers.

The key length lives in device memory (``length`` = [keys the pooled keys cover, position of the first
query]); shapes, launches and buffers depend only on the capacity, and the host reads nothing back, so
:func:`hisa_decode_static` can be captured once in a CUDA graph and replayed while the cache grows
(``hisa.graph.DecodeStep``).

Sparse (HISA, the reference's per-query semantics), for R = B x units selection rows, in three launches:

1. ``_stage1_fused``  grid (R, P1): each program scores a slice of the pooled keys against the row's selector
   (sink and own block forced with +inf, invisible blocks -inf) and stores them; the row's last program to
   finish (an arrival counter, :func:`exact._arrive`) selects the top ``top_blocks``.
2. ``_stage2_fused``  grid (R, P2): each program scores the tokens of a few kept blocks; the row's last
   program selects the top ``top_k`` and maps them to key indices.
3. ``exact._sparse_attn``  split-K attention over the kept tokens, then ``exact._combine``.

On sm_90+ (``PDL``) the launches after the first are programmatic
dependent launches: each kernel lets the next one start at its beginning, and the next one's programs wait
(``gdc_wait``) only before reading what it wrote, so the launch latency hides behind the previous kernel's
selection.

A selection step is a latency chain of block-wide reductions in one program; running it in the scoring
kernel's last program saves a launch and the wait for it. Rows whose stage-1 width exceeds
``FUSED_MAX_BLOCKS`` pooled keys take the previous path (two-level stage 1, separate selection kernels).
Dense: split-K over every live key, the partials merged by each row's last split (``COMBINE_LAST``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import select
from .exact import (
    _LOG2E, _arrive, _attend, _load_selector, _pdl_args, _split_plan, _token_scores, counters, gdc_launch_dependents,
    gdc_wait, pdl_supported,
)
from .select import _select_core, _select_holes, ukey_top

FUSED_STATIC = True  # the three-launch sparse decode; False: the previous six-launch path
FUSED_MAX_BLOCKS = 8192  # widest stage-1 row (pooled keys) the fused path selects in one program
STAGE1_SLICE = 128  # pooled keys scored per program
STAGE2_BLOCKS = 4  # kept blocks scored per program (at most 256 tokens)
# split-K partials merged by each row's last program instead of a separate launch: pays for dense decode at
# long contexts (H200, 128k keys: 74 vs 81 us at head dim 64), costs HISA's 32 short splits ~2 us
COMBINE_LAST = True  # dense path
COMBINE_LAST_SPARSE = False
# the selections' search (select.py): radix with 5-bit digits (32-bin histograms, up to 7 passes). In these
# one-program-per-row selections 4-bit digits measured faster than 8-bit (H200, 128k, one layer in a CUDA graph:
# 32.2-33.0 / 38.6-39.3 us at head dim 64 / 128 against 39.9-40.0 / 45.5-46.4): a histogram's per-entry cost
# grows with its bins; 5-bit digits save a pass on typical rows and measured 26.4-26.9 / 38.3-39.7 us against
# 28.5-28.7 / 39.6-39.8 with 4 (6-bit: 29.5 / 41.2)
SELECT_METHOD = select.RADIX5
# stage 2 hands the attention its kept tokens as a list with holes (-1 where a candidate was not kept, one
# coalesced store) instead of compacting them with a prefix sum: the attention's order does not matter
COMPACT_KEPT = False
# the selections take their first key bits (of the radix searches' unsigned keys) from a histogram that the
# scoring programs count with relaxed atomics, so the selecting program starts with those bits decided: two or
# three 5-bit histogram passes fewer for 10 / 12 bits, one scan of 1024 / 4096 counts instead. H100, 128k, one
# layer in a CUDA graph, alternating rounds (two runs): head dim 64 25.6-25.9 us with 10 bits in both stages,
# 25.9-26.3 with 12 in stage 2, 27.3-27.5 without; head dim 128 33.7-33.9 with 10 / 12, 34.6-34.9 with 10 / 10,
# 36.5-36.6 without. 5 or 8 bits were slower (the atomics pile onto a few counters). 0: off
STAGE1_PRE_BITS = 10
STAGE2_PRE_BITS = 10  # head dim <= 64
STAGE2_PRE_BITS_LARGE_D = 12
# keys per attention program (one tile per split), by head dim: 128 up to 64 (4 warps), 64 above (8 warps; 4
# spill at 128). Head dim 128 with 64-key tiles and dependent launches: 34.5-34.7 vs 36.1-36.2 us a layer at
# 128k (H200, alternating rounds; either change alone measured no gain: 36.6 / 36.8); head dim 64 with 64-key
# tiles: 29.2 vs 26.2
HOLES_TILE = 128
HOLES_TILE_LARGE_D = 64
# a chunk step's dense attention (a follow-up question's 16 queries) with all query rows of a unit in one
# program (_chunk_attn); False: one row per query (each re-reads every K/V row: H200, 32k keys, 242 us a layer)
CHUNK_KERNEL = True
CHUNK_BLOCK_T = 64
STATIC_SLICE = 512  # blocks per program in the first level of the wide-row path's stage 1
# programmatic dependent launches in the fused sparse path, where the GPU has them (sm_90+), up to this head dim:
# H200, 128k, one layer in a CUDA graph: 26.2-27.0 vs 28.0-28.6 us at head dim 64; at 128 they pay only with
# the 64-key attention tiles (HOLES_TILE_LARGE_D; with 128-key tiles 36.8 vs 36.1 us)
PDL = True
PDL_MAX_HEAD_DIM = 1 << 30


@triton.jit
def _slice_scores(Q, P, LENP, row, sl, sqb, sqh, spb, sph, spn, NSEL, SG, G, D, bs, NB,
                  SGP: tl.constexpr, DP: tl.constexpr, DC: tl.constexpr, SLICE: tl.constexpr):
    """Stage-1 scores of one decode row against pooled keys sl * SLICE ... + SLICE - 1, and those block
    indices: the row's selector (its unit's query heads summed) dotted with each pooled key; -inf for blocks
    not visible from the query at LENP[0] - 1, +inf for the sink and the query's own block."""
    b = (row // NSEL).to(tl.int64)
    u = row % NSEL
    kv = (u * SG) // G
    pos = tl.load(LENP) - 1
    nvis = pos // bs + 1
    offs = sl * SLICE + tl.arange(0, SLICE)
    nmask = (offs < nvis) & (offs < NB)
    g = tl.arange(0, SGP)
    h = (u * SG + g).to(tl.int64)
    x = tl.zeros([SLICE], tl.float32)
    for d0 in tl.static_range(0, DP, DC):
        dd = d0 + tl.arange(0, DC)
        qc = tl.load(Q + b * sqb + h[:, None] * sqh + dd[None, :],
                     mask=(g[:, None] < SG) & (dd[None, :] < D), other=0.0).to(tl.float32)
        qs = tl.sum(qc, 0)
        # every allocated block is read (not only the visible ones): the loads need not wait for the length
        pc = tl.load(P + b * spb + kv * sph + offs[:, None].to(tl.int64) * spn + dd[None, :],
                     mask=(offs[:, None] < NB) & (dd[None, :] < D), other=0.0)
        x += tl.sum(pc * qs[None, :], 1)
    x = tl.where(nmask, x, float("-inf"))
    x = tl.where(nmask & ((offs == 0) | (offs == nvis - 1)), float("inf"), x)
    return x, offs


@triton.jit
def _count_first_digit(HIST, row, x, mask, PRE: tl.constexpr):
    """With PRE > 0: add the top PRE key bits of this program's scores ``x`` (where ``mask``) to the row's
    histogram at HIST (relaxed atomics, before the program arrives), for the selecting program's first digit
    (:func:`select._search`). Returns the row's histogram (None without PRE)."""
    if PRE > 0:
        hrow = HIST + row.to(tl.int64) * (1 << PRE)
        tl.atomic_add(hrow + ukey_top(x, PRE), 1, mask=mask, sem="relaxed", scope="gpu")
    else:
        hrow = HIST
    return hrow


@triton.jit
def _clear_first_digit(hrow, PRE: tl.constexpr):
    """The selecting program, after its search: zero the row's histogram for the next launch or replay."""
    if PRE > 0:
        tl.debug_barrier()
        tl.store(hrow + tl.arange(0, 1 << PRE), tl.zeros([1 << PRE], tl.int32))


@triton.jit(do_not_specialize=["NB"])
def _stage1_fused(
    Q, P, S1, BLK, CNT, LENP, sqb, sqh, spb, sph, spn,
    NSEL, SG, G, D, bs, TB, NB, NP,
    SGP: tl.constexpr, DP: tl.constexpr, DC: tl.constexpr, SLICE: tl.constexpr, NBP: tl.constexpr,
    KP: tl.constexpr, METHOD: tl.constexpr, PDL: tl.constexpr = False, HIST=None, PRE: tl.constexpr = 0,
):
    if PDL:  # stage 2 may launch now; its programs wait for this kernel before reading BLK
        gdc_launch_dependents()
    row = tl.program_id(0)
    sl = tl.program_id(1)
    x, offs = _slice_scores(Q, P, LENP, row, sl, sqb, sqh, spb, sph, spn, NSEL, SG, G, D, bs, NB,
                            SGP, DP, DC, SLICE)
    srow = S1 + row.to(tl.int64) * NBP
    tl.store(srow + offs, x)
    hrow = _count_first_digit(HIST, row, x, offs >= 0, PRE)
    if _arrive(CNT + row, NP):
        cols = tl.arange(0, NBP)
        xs = tl.load(srow + cols, cache_modifier=".cg")
        _select_core(xs, cols, TB, BLK + row.to(tl.int64) * TB, cols, NBP, KP, METHOD, BLK, False, hrow, PRE, 0)
        _clear_first_digit(hrow, PRE)


@triton.jit
def _stage2_fused(
    Q, K, BLK, S2, IDX, CNT, LENP, sqb, sqh, skb, skh, skt,
    NSEL, SG, G, D, bs, TB, TK, scale, NP,
    SGP: tl.constexpr, DP: tl.constexpr, BSP: tl.constexpr, BPP: tl.constexpr, W2P: tl.constexpr,
    KP: tl.constexpr, METHOD: tl.constexpr, COMPACT: tl.constexpr, PDL: tl.constexpr = False,
    HIST=None, PRE: tl.constexpr = 0,
):
    if PDL:
        gdc_launch_dependents()
    row = tl.program_id(0)
    b = (row // NSEL).to(tl.int64)
    u = row % NSEL
    kv = (u * SG) // G
    # Q, LENP and K were written before stage 1 started: readable before the wait for stage 1
    pos = tl.load(LENP) - 1
    qs = _load_selector(Q, b, u, 0, sqb, sqh, 0, SG, D, SGP, DP)
    if PDL:
        gdc_wait()
    j = tl.arange(0, BPP * BSP)
    slot = tl.program_id(1) * BPP + j // BSP
    within = j % BSP
    in_range = (slot < TB) & (within < bs)
    brow = BLK + row.to(tl.int64) * TB
    blk = tl.load(brow + slot, mask=in_range, other=-1)
    tok = blk * bs + within
    ok = in_range & (blk >= 0) & (tok <= pos)
    d = tl.arange(0, DP)
    kk = tl.load(K + b * skb + kv * skh + tok[:, None].to(tl.int64) * skt + d[None, :],
                 mask=ok[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
    s = tl.sum(kk * qs[None, :], 1) * scale
    s = tl.where(ok, s, float("-inf"))
    srow = S2 + row.to(tl.int64) * W2P
    tl.store(srow + slot * bs + within, s, mask=in_range)
    hrow = _count_first_digit(HIST, row, s, in_range, PRE)
    if _arrive(CNT + row, NP):
        cols = tl.arange(0, W2P)
        live = cols < TB * bs
        xs = tl.load(srow + cols, mask=live, other=float("-inf"), cache_modifier=".cg")
        bl = tl.load(brow + cols // bs, mask=live, other=0)
        val = bl * bs + cols % bs
        if COMPACT:
            _select_core(xs, cols, TK, IDX + row.to(tl.int64) * TK, val, W2P, KP, METHOD, IDX, False, hrow, PRE,
                         W2P - TB * bs)
        else:
            _select_holes(xs, cols, TK, IDX + row.to(tl.int64) * W2P, val, METHOD, hrow, PRE, W2P - TB * bs)
        _clear_first_digit(hrow, PRE)


@triton.jit(do_not_specialize=["NB"])
def _stage1_slice(
    Q, P, CS, CI, LENP, sqb, sqh, sqt, spb, sph, spn,
    NSEL, SG, G, D, bs, TB, NB, NSLICE,
    SGP: tl.constexpr, DP: tl.constexpr, DC: tl.constexpr, SLICE: tl.constexpr, KP: tl.constexpr,
    RADIX: tl.constexpr,
):
    """Stage 1 of a decode query, first level: the top TB visible blocks of one slice of SLICE blocks, with
    their scores (sink and own block forced with +inf). The key length is read from LENP; a second
    selection over the slices' candidates gives the row's top TB (the global top TB is among them)."""
    row = tl.program_id(0)
    sl = tl.program_id(1)
    x, offs = _slice_scores(Q, P, LENP, row, sl, sqb, sqh, spb, sph, spn, NSEL, SG, G, D, bs, NB,
                            SGP, DP, DC, SLICE)
    base = (row.to(tl.int64) * NSLICE + sl) * TB
    _select_core(x, tl.arange(0, SLICE), TB, CI + base, offs, SLICE, KP, RADIX, CS + base, True)


@triton.jit(do_not_specialize=["chunk"])
def _chunk_attn(
    Q, K, V, PO, PM, PL, LENP, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
    NSEL, Lq, SG, G, D, chunk, qk_scale, NSPLIT,
    SGP: tl.constexpr, LQP: tl.constexpr, DP: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Dense causal attention of a few queries (positions LENP[1] + i, i < Lq) over every key up to them,
    split-K: one program per (batch x unit, split) holds all Lq x SG query rows of the unit, so each K/V tile
    it loads serves all of them (a [Lq*SG, D] x [D, BLOCK_T] product) instead of being re-read per query."""
    bu = tl.program_id(0)
    split = tl.program_id(1)
    b = (bu // NSEL).to(tl.int64)
    u = bu % NSEL
    kv = (u * SG) // G
    M: tl.constexpr = LQP * SGP
    r = tl.arange(0, M)
    i = r // SGP
    g = r % SGP
    ok = (i < Lq) & (g < SG)
    h = (u * SG + g).to(tl.int64)
    d = tl.arange(0, DP)
    dmask = d[None, :] < D
    q = tl.load(Q + b * sqb + h[:, None] * sqh + i[:, None].to(tl.int64) * sqt + d[None, :],
                mask=ok[:, None] & dmask, other=0.0)
    p0 = tl.load(LENP + 1)
    qpos = p0 + i
    n_keys = p0 + Lq
    m_i = tl.full([M], -1.0e30, tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, DP], tl.float32)
    start = split * chunk
    hi = tl.minimum(chunk, n_keys - start)
    kbase = K + b * skb + kv * skh
    vbase = V + b * svb + kv * svh
    for t0 in range(0, hi, BLOCK_T):
        t = start + t0 + tl.arange(0, BLOCK_T)
        tok_ok = t < start + hi
        toff = t.to(tl.int64)
        kk = tl.load(kbase + toff[:, None] * skt + d[None, :], mask=tok_ok[:, None] & dmask, other=0.0)
        s = tl.dot(q, tl.trans(kk)) * qk_scale
        s = tl.where(tok_ok[None, :] & (t[None, :] <= qpos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vv = tl.load(vbase + toff[:, None] * svt + d[None, :], mask=tok_ok[:, None] & dmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
        m_i = m_new
    base = (bu.to(tl.int64) * NSPLIT + split) * M
    tl.store(PM + base + r, m_i)
    tl.store(PL + base + r, l_i)
    tl.store(PO + (base + r[:, None]) * DP + d[None, :], acc)


@triton.jit
def _chunk_combine(
    O, PO, PM, PL, sob, soh, sot, NSEL, Lq, SG, D, NSPLIT,
    SGP: tl.constexpr, LQP: tl.constexpr, DP: tl.constexpr, SPLITP: tl.constexpr,
):
    """Merge the split-K partials of one query row (query i, head g of the unit): program (batch x unit, row)."""
    bu = tl.program_id(0)
    r = tl.program_id(1)
    i = r // SGP
    g = r % SGP
    if (i < Lq) & (g < SG):
        M: tl.constexpr = LQP * SGP
        b = (bu // NSEL).to(tl.int64)
        u = bu % NSEL
        sp = tl.arange(0, SPLITP)
        d = tl.arange(0, DP)
        smask = sp < NSPLIT
        idx = (bu.to(tl.int64) * NSPLIT + sp) * M + r
        m = tl.load(PM + idx, mask=smask, other=-1.0e30)
        l = tl.load(PL + idx, mask=smask, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.math.exp2(m - m_max)
        l_tot = tl.sum(w * l, 0)
        o = tl.load(PO + idx[:, None] * DP + d[None, :], mask=smask[:, None], other=0.0)
        out = tl.sum(w[:, None] * o, 0) / tl.where(l_tot > 0, l_tot, 1.0)
        h = (u * SG + g).to(tl.int64)
        tl.store(O + b * sob + h * soh + i.to(tl.int64) * sot + d, out.to(O.dtype.element_ty), mask=d < D)


def _chunk_rows(Lq: int, SG: int) -> int:
    """Rows of a ``_chunk_attn`` program: Lq x SG padded to powers of two, at least 16 (for tl.dot)."""
    SGP = triton.next_power_of_2(SG)
    return max(triton.next_power_of_2(Lq), triton.cdiv(16, SGP)) * SGP


def _attend_chunk(q, k, v, out, *, scale, length, SG, G, NSEL, DP):
    """Dense causal attention of the Lq > 1 queries at positions length[1] + i over the keys up to them,
    every query row of a unit in one program (``_chunk_attn``), then the combine."""
    B, Hq, Lq, D = q.shape
    cap = k.shape[2]
    R = B * NSEL
    SGP = triton.next_power_of_2(SG)
    M = _chunk_rows(Lq, SG)
    LQP = M // SGP
    nsplit, chunk = _split_plan(R, cap, q.device, CHUNK_BLOCK_T)
    part = torch.empty(R * nsplit * M * (DP + 2), dtype=torch.float32, device=q.device)
    po = part[: R * nsplit * M * DP]
    pm = part[R * nsplit * M * DP : R * nsplit * M * (DP + 1)]
    pl = part[R * nsplit * M * (DP + 1) :]
    _chunk_attn[(R, nsplit)](
        q, k, v, po, pm, pl, length, q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        NSEL, Lq, SG, G, D, chunk, scale * _LOG2E, nsplit,
        SGP=SGP, LQP=LQP, DP=DP, BLOCK_T=CHUNK_BLOCK_T, num_warps=4,
    )
    _chunk_combine[(R, M)](
        out, po, pm, pl, out.stride(0), out.stride(1), out.stride(2), NSEL, Lq, SG, D, nsplit,
        SGP=SGP, LQP=LQP, DP=DP, SPLITP=max(2, triton.next_power_of_2(nsplit)), num_warps=1,
    )
    return out


# warps of the fused stage-1 / stage-2 programs (the selection in the last program dominates; measured on an
# H200 at 128k, one layer in a CUDA graph, 8-bit radix: stage 1 with 8 warps, stage 2 with 16: 37.9 / 42.9 us at
# head dim 64 / 128, against 38.8 / 47.1 with 4 / 8; fewer warps were up to 3x slower. With the 4-bit radix
# 16 / 16 warps measured best, 8 / 16 within 0.4 us)
def _warps(width: int) -> int:
    return 8 if width <= 2048 else 16


def hisa_decode_static(q, k, v, pooled, length, config, *, scale, sparse, out):
    """Decode queries over full-capacity buffers, positions read from device memory.

    q [B, Hq, Lq, D]: the queries of positions length[1] .. length[1] + Lq - 1 (for a decode step Lq = 1 and
    length = [n, n - 1]); k/v [B, Hkv, cap, D] hold every key up to the last query; pooled [B, Hkv,
    >= cap / block_size, D] float32 covers the first length[0] keys. ``sparse`` (one query only): HISA's
    per-query selection (stage 1, stage 2, attention over the kept tokens, the reference's semantics) over the
    first length[0] keys; else dense causal attention. Shapes, launches and buffers depend only on the
    capacity, never on the positions, and the host reads nothing back: the call can be captured in a CUDA
    graph and replayed while the cache grows.
    """
    B, Hq, Lq, D = q.shape
    Hkv, cap = k.shape[1], k.shape[2]
    if sparse and Lq != 1:
        raise ValueError("the sparse graph-recordable path takes one query per sequence")
    G = Hq // Hkv
    SG = G if config.selection == "group" else 1
    NSEL = Hq // SG
    DP = triton.next_power_of_2(D)
    SGP = triton.next_power_of_2(SG)
    MP = max(16, SGP)
    common = dict(SG=SG, G=G, NSEL=NSEL, MP=MP, DP=DP)
    if not sparse:
        if Lq > 1 and CHUNK_KERNEL and _chunk_rows(Lq, SG) <= 128:
            return _attend_chunk(q, k, v, out, scale=scale, length=length, SG=SG, G=G, NSEL=NSEL, DP=DP)
        return _attend(q, k, v, None, out, n_idx=cap, scale=scale, length=length, combine_last=COMBINE_LAST,
                       **common)
    common["combine_last"] = COMBINE_LAST_SPARSE
    bs, TB, TK = config.block_size, config.top_blocks, config.top_k
    NB = min(pooled.shape[2], math.ceil(cap / bs))
    BSP = triton.next_power_of_2(bs)
    R = B * NSEL
    dev = q.device
    method = SELECT_METHOD
    slice1 = max(16, min(STAGE1_SLICE, triton.next_power_of_2(NB)))
    np1 = triton.next_power_of_2(triton.cdiv(NB, slice1))
    nbp = np1 * slice1
    w2p = max(16, triton.next_power_of_2(TB * bs))
    if FUSED_STATIC and nbp <= FUSED_MAX_BLOCKS and w2p <= FUSED_MAX_BLOCKS and TB <= nbp:
        pdl = PDL and D <= PDL_MAX_HEAD_DIM and pdl_supported(dev)
        radix = method in (select.RADIX, select.RADIX4, select.RADIX5)
        pre1 = STAGE1_PRE_BITS if radix else 0
        pre = (STAGE2_PRE_BITS if DP <= 64 else STAGE2_PRE_BITS_LARGE_D) if radix and not COMPACT_KEPT else 0
        h2 = 2 * R + (R << pre if pre else 0)  # counters: stage 1 / stage 2 arrivals, stage 2 / 1 histograms
        cnt = counters(dev, h2 + (R << pre1 if pre1 else 0))
        s1 = torch.empty(R, nbp, dtype=torch.float32, device=dev)
        blk = torch.empty(R, TB, dtype=torch.int32, device=dev)
        _stage1_fused[(R, np1)](
            q, pooled, s1, blk, cnt, length, q.stride(0), q.stride(1),
            pooled.stride(0), pooled.stride(1), pooled.stride(2),
            NSEL, SG, G, D, bs, TB, NB, np1,
            SGP=SGP, DP=DP, DC=16, SLICE=slice1, NBP=nbp, KP=max(16, triton.next_power_of_2(TB)),
            METHOD=method, num_warps=_warps(nbp), **(dict(PDL=True) if pdl else {}),
            **(dict(HIST=cnt[h2:], PRE=pre1) if pre1 else {}),
        )
        bpp = max(1, min(STAGE2_BLOCKS, 256 // BSP))
        np2 = triton.cdiv(TB, bpp)
        s2 = torch.empty(R, w2p, dtype=torch.float32, device=dev)
        idx = torch.empty(R, TK if COMPACT_KEPT else w2p, dtype=torch.int32, device=dev)
        _stage2_fused[(R, np2)](
            q, k, blk, s2, idx, cnt[R:], length, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), k.stride(2),
            NSEL, SG, G, D, bs, TB, TK, scale, np2,
            SGP=SGP, DP=DP, BSP=BSP, BPP=bpp, W2P=w2p, KP=max(16, triton.next_power_of_2(TK)),
            METHOD=method, COMPACT=COMPACT_KEPT, num_warps=_warps(w2p), **_pdl_args(pdl),
            **(dict(HIST=cnt[2 * R:], PRE=pre) if pre else {}),
        )
        if COMPACT_KEPT:
            return _attend(q, k, v, idx, out, n_idx=TK, scale=scale, pdl=pdl, **common)
        # twice the entries, half of them holes: tiles of 128 keep one tile per split
        return _attend(q, k, v, idx, out, n_idx=TB * bs, scale=scale,
                       block_t=HOLES_TILE if DP <= 64 else HOLES_TILE_LARGE_D,
                       warps=4 if DP <= 64 else 8, pdl=pdl, **common)
    # very wide rows: stage 1 in two levels (the top TB of each slice of blocks, then the top TB of those)
    BPP = max(1, 128 // BSP)
    SLICE = max(STATIC_SLICE, triton.next_power_of_2(2 * TB))
    nslice = triton.cdiv(NB, SLICE)
    cs = torch.empty(R, nslice * TB, dtype=torch.float32, device=dev)
    ci = torch.empty(R, nslice * TB, dtype=torch.int32, device=dev)
    _stage1_slice[(R, nslice)](
        q, pooled, cs, ci, length, q.stride(0), q.stride(1), q.stride(2),
        pooled.stride(0), pooled.stride(1), pooled.stride(2),
        NSEL, SG, G, D, bs, TB, NB, nslice,
        SGP=SGP, DP=DP, DC=16, SLICE=SLICE, KP=max(16, triton.next_power_of_2(TB)), RADIX=method,
        num_warps=4,
    )
    blk = ci if nslice == 1 else select.topk_select(cs, TB, n=nslice * TB, block_map=ci, map_bs=1)
    s2 = torch.empty(R, TB * bs, dtype=torch.float32, device=dev)
    _token_scores[(R, triton.cdiv(TB, BPP))](
        q, k, blk, s2, s2, length,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        blk.stride(0), s2.stride(0), 0, 0, 0,
        NSEL, 1, SG, G, D, bs, TB, 0, cap, scale,
        SGP=SGP, DP=DP, BSP=BSP, BPP=BPP, HAS_MASK=False, DEV_LEN=True, num_warps=4,
    )
    idx = select.topk_select(s2, TK, n=TB * bs, block_map=blk, map_bs=bs)
    return _attend(q, k, v, idx, out, n_idx=TK, scale=scale, **common)
