"""Exact per-query HISA on the GPU (decode and short query chunks): the reference's semantics.

Pipeline for R = B x units x Lq selection rows (a unit is a KV-head group with ``selection="group"``,
one query head with ``"head"``):

1. ``_block_scores``  stage 1: each row's selector (the sum of its unit's query heads) dotted with every
   pooled key -> [R, NB] float32 (many programs per row).
2. ``topk_select``    top ``top_blocks`` visible blocks per row, sink and own block forced.
3. ``_token_scores``  stage 2: selector . key for every token of the kept blocks, x scale; causality,
   padding and the optional mask give -inf -> [R, top_blocks * bs].
4. ``topk_select``    top ``top_k`` tokens per row, mapped back to key indices.
5. ``_sparse_attn``   flash-decoding over the kept tokens: the kept list is split across programs
   (split-K), every program serves all heads of its unit with one gather of K/V rows (tensor-core dot),
   and writes a partial (max, sum, acc); ``_combine`` merges the partials. With one split the first
   kernel writes the output directly.

The group score is computed as (sum_g q_g) . k, which equals the reference's sum_g (q_g . k) up to
float32 rounding.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import select as _select
from .select import _select_core, topk_select

try:  # programmatic dependent launch (sm_90+): Triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: launches stay plain (PDL is never requested)
    gdc_launch_dependents = gdc_wait = None

FUSED = True  # stage scoring fused with its top-k selection (one program per row); False: separate kernels
FUSED_MAX_WIDTH = 4096
MAX_SPLITS = 64

_LOG2E = 1.4426950408889634


@triton.jit
def _load_selector(Q, b, u, i, sqb, sqh, sqt, SG, D, SGP: tl.constexpr, DP: tl.constexpr):
    g = tl.arange(0, SGP)
    d = tl.arange(0, DP)
    h = u * SG + g
    ptr = Q + b * sqb + h[:, None].to(tl.int64) * sqh + i * sqt + d[None, :]
    q = tl.load(ptr, mask=(g[:, None] < SG) & (d[None, :] < D), other=0.0).to(tl.float32)
    return tl.sum(q, 0)


@triton.jit(do_not_specialize=["Lq", "NB"])
def _block_scores(
    Q, P, S, sqb, sqh, sqt, spb, sph, spn, ss,
    NSEL, Lq, SG, G, NB, D,
    SGP: tl.constexpr, DP: tl.constexpr, BLOCK_B: tl.constexpr,
):
    row = tl.program_id(0)
    i = row % Lq
    bu = row // Lq
    b = (bu // NSEL).to(tl.int64)
    u = bu % NSEL
    kv = (u * SG) // G
    qs = _load_selector(Q, b, u, i, sqb, sqh, sqt, SG, D, SGP, DP)
    n = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    d = tl.arange(0, DP)
    p = tl.load(P + b * spb + kv * sph + n[:, None] * spn + d[None, :],
                mask=(n[:, None] < NB) & (d[None, :] < D), other=0.0)
    s = tl.sum(p * qs[None, :], 1)
    tl.store(S + row.to(tl.int64) * ss + n, s, mask=n < NB)


@triton.jit(do_not_specialize=["Lq", "q_start", "Lk"])
def _token_scores(
    Q, K, BLK, S, MASK, LENP,
    sqb, sqh, sqt, skb, skh, skt, sblk, ss, smb, smq, smk,
    NSEL, Lq, SG, G, D, bs, top_blocks, q_start, Lk, scale,
    SGP: tl.constexpr, DP: tl.constexpr, BSP: tl.constexpr, BPP: tl.constexpr, HAS_MASK: tl.constexpr,
    DEV_LEN: tl.constexpr,
):
    row = tl.program_id(0)
    i = row % Lq
    bu = row // Lq
    b = (bu // NSEL).to(tl.int64)
    u = bu % NSEL
    kv = (u * SG) // G
    if DEV_LEN:  # the key length lives in device memory (CUDA-graph decode); queries are the last Lq keys
        Lk = tl.load(LENP)
        q_start = Lk - Lq
    pos = q_start + i
    qs = _load_selector(Q, b, u, i, sqb, sqh, sqt, SG, D, SGP, DP)
    j = tl.arange(0, BPP * BSP)
    slot = tl.program_id(1) * BPP + j // BSP
    within = j % BSP
    in_range = (slot < top_blocks) & (within < bs)
    blk = tl.load(BLK + row.to(tl.int64) * sblk + slot, mask=in_range, other=-1)
    tok = blk * bs + within
    ok = in_range & (blk >= 0) & (tok <= pos) & (tok < Lk)
    if HAS_MASK:
        mval = tl.load(MASK + b * smb + i * smq + tok.to(tl.int64) * smk, mask=ok, other=0)
        ok = ok & (mval != 0)
    d = tl.arange(0, DP)
    kk = tl.load(K + b * skb + kv * skh + tok[:, None].to(tl.int64) * skt + d[None, :],
                 mask=ok[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
    s = tl.sum(kk * qs[None, :], 1) * scale
    s = tl.where(ok, s, float("-inf"))
    tl.store(S + row.to(tl.int64) * ss + slot * bs + within, s, mask=in_range)


@triton.jit(do_not_specialize=["Lq", "q_start"])
def _stage1_select(
    Q, P, BLK, sqb, sqh, sqt, spb, sph, spn,
    NSEL, Lq, SG, G, D, q_start, bs, TB,
    SGP: tl.constexpr, DP: tl.constexpr, DC: tl.constexpr, BLOCK: tl.constexpr, KP: tl.constexpr,
    RADIX: tl.constexpr,
):
    """Stage 1 for one row: score its visible blocks and keep the top TB (sink + own block forced)."""
    row = tl.program_id(0)
    i = row % Lq
    bu = row // Lq
    b = (bu // NSEL).to(tl.int64)
    u = bu % NSEL
    kv = (u * SG) // G
    pos = q_start + i
    nvis = pos // bs + 1
    offs = tl.arange(0, BLOCK)
    nmask = offs < nvis
    g = tl.arange(0, SGP)
    h = (u * SG + g).to(tl.int64)
    x = tl.zeros([BLOCK], tl.float32)
    for d0 in tl.static_range(0, DP, DC):
        dd = d0 + tl.arange(0, DC)
        qc = tl.load(Q + b * sqb + h[:, None] * sqh + i * sqt + dd[None, :],
                     mask=(g[:, None] < SG) & (dd[None, :] < D), other=0.0).to(tl.float32)
        qs = tl.sum(qc, 0)
        pc = tl.load(P + b * spb + kv * sph + offs[:, None] * spn + dd[None, :],
                     mask=nmask[:, None] & (dd[None, :] < D), other=0.0)
        x += tl.sum(pc * qs[None, :], 1)
    x = tl.where(nmask, x, float("-inf"))
    x = tl.where((offs == 0) | (offs == nvis - 1), float("inf"), x)
    _select_core(x, offs, TB, BLK + row.to(tl.int64) * TB, offs, BLOCK, KP, RADIX, BLK, False)


@triton.jit(do_not_specialize=["Lq", "q_start", "Lk"])
def _stage2_select(
    Q, K, BLK, IDX, MASK, sqb, sqh, sqt, skb, skh, skt, smb, smq, smk,
    NSEL, Lq, SG, G, D, q_start, Lk, bs, TB, TK, scale,
    SGP: tl.constexpr, DP: tl.constexpr, DC: tl.constexpr, BSP: tl.constexpr, BLOCK: tl.constexpr,
    KP: tl.constexpr, HAS_MASK: tl.constexpr, RADIX: tl.constexpr,
):
    """Stage 2 for one row: score every token of its kept blocks, keep the top TK token indices."""
    row = tl.program_id(0)
    i = row % Lq
    bu = row // Lq
    b = (bu // NSEL).to(tl.int64)
    u = bu % NSEL
    kv = (u * SG) // G
    pos = q_start + i
    j = tl.arange(0, BLOCK)
    slot = j // BSP
    within = j % BSP
    in_range = (slot < TB) & (within < bs)
    blk = tl.load(BLK + row.to(tl.int64) * TB + slot, mask=in_range, other=-1)
    tok = blk * bs + within
    ok = in_range & (blk >= 0) & (tok <= pos) & (tok < Lk)
    if HAS_MASK:
        mval = tl.load(MASK + b * smb + i * smq + tok.to(tl.int64) * smk, mask=ok, other=0)
        ok = ok & (mval != 0)
    g = tl.arange(0, SGP)
    h = (u * SG + g).to(tl.int64)
    toff = tok.to(tl.int64)
    x = tl.zeros([BLOCK], tl.float32)
    for d0 in tl.static_range(0, DP, DC):
        dd = d0 + tl.arange(0, DC)
        qc = tl.load(Q + b * sqb + h[:, None] * sqh + i * sqt + dd[None, :],
                     mask=(g[:, None] < SG) & (dd[None, :] < D), other=0.0).to(tl.float32)
        qs = tl.sum(qc, 0)
        kc = tl.load(K + b * skb + kv * skh + toff[:, None] * skt + dd[None, :],
                     mask=ok[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
        x += tl.sum(kc * qs[None, :], 1)
    x = tl.where(ok, x * scale, float("-inf"))
    _select_core(x, j, TK, IDX + row.to(tl.int64) * TK, tok, BLOCK, KP, RADIX, IDX, False)


@triton.jit
def _arrive(CNT, NPROG):
    """Called by each of the NPROG programs working on one row once its results are stored: true in the
    program that arrives last, which then sees every other program's stores (it must load them with
    ``cache_modifier=".cg"``: the L1 cache is not coherent), and which resets the counter for the next launch.
    The pattern of CUDA's threadFenceReduction sample: barrier, then one acquire-release atomic."""
    tl.debug_barrier()
    last = tl.atomic_add(CNT, 1, sem="acq_rel", scope="gpu") == NPROG - 1
    if last:
        tl.atomic_xchg(CNT, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit(do_not_specialize=["Lq", "n_idx", "chunk"])
def _sparse_attn(
    Q, K, V, IDX, O, PO, PM, PL, LENP, CNT,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sidx,
    NSEL, Lq, SG, G, D, n_idx, chunk, qk_scale, NSPLIT,
    MP: tl.constexpr, DP: tl.constexpr, BLOCK_T: tl.constexpr, DIRECT: tl.constexpr, CONTIG: tl.constexpr,
    COMBINE: tl.constexpr, SGP: tl.constexpr, SPLITP: tl.constexpr, PDL: tl.constexpr = False,
):
    """Attention of each row's query heads over its kept tokens IDX[row, :n_idx] (-1 = none), split-K.
    With CONTIG the kept tokens are all keys up to the row's query, which sits at position LENP[1] + i
    (dense attention of a decode step or a short chunk, positions in device memory so that the call can be
    captured in a CUDA graph). With COMBINE the last split of a row to finish merges the row's partials
    (counters at CNT[row]); otherwise :func:`_combine` runs after. With PDL (launched as a programmatic
    dependent of the kernel that wrote IDX) the program loads its queries before waiting for that kernel."""
    if PDL:
        gdc_launch_dependents()
    row = tl.program_id(0)
    split = tl.program_id(1)
    i = row % Lq
    bu = row // Lq
    b = (bu // NSEL).to(tl.int64)
    u = bu % NSEL
    kv = (u * SG) // G
    g = tl.arange(0, MP)
    d = tl.arange(0, DP)
    h = u * SG + g
    qmask = (g[:, None] < SG) & (d[None, :] < D)
    q = tl.load(Q + b * sqb + h[:, None].to(tl.int64) * sqh + i * sqt + d[None, :], mask=qmask, other=0.0)
    if PDL:
        gdc_wait()
    m_i = tl.full([MP], -1.0e30, tl.float32)
    l_i = tl.zeros([MP], tl.float32)
    acc = tl.zeros([MP, DP], tl.float32)
    start = split * chunk
    end = start + chunk
    kbase = K + b * skb + kv * skh
    vbase = V + b * svb + kv * svh
    if CONTIG:
        n_idx = tl.load(LENP + 1) + i + 1
    hi = tl.minimum(chunk, n_idx - start)
    for t0 in range(0, hi, BLOCK_T):
        t = start + t0 + tl.arange(0, BLOCK_T)
        if CONTIG:
            tok = tl.where((t < end) & (t < n_idx), t, -1)
        else:
            tok = tl.load(IDX + row.to(tl.int64) * sidx + t, mask=(t < end) & (t < n_idx), other=-1)
        ok = tok >= 0
        toff = tok.to(tl.int64)
        kk = tl.load(kbase + toff[:, None] * skt + d[None, :], mask=ok[:, None] & (d[None, :] < D), other=0.0)
        s = tl.dot(q, tl.trans(kk)) * qk_scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vv = tl.load(vbase + toff[:, None] * svt + d[None, :], mask=ok[:, None] & (d[None, :] < D), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
        m_i = m_new
    if DIRECT:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(O + b * sob + h[:, None].to(tl.int64) * soh + i * sot + d[None, :], out.to(O.dtype.element_ty),
                 mask=qmask)
    else:
        base = (row.to(tl.int64) * NSPLIT + split) * MP
        tl.store(PM + base + g, m_i)
        tl.store(PL + base + g, l_i)
        tl.store(PO + (base + g[:, None]) * DP + d[None, :], acc)
        if COMBINE:
            if _arrive(CNT + row, NSPLIT):
                _combine_row(O, PO, PM, PL, row.to(tl.int64) * NSPLIT * MP, b, u, i, sob, soh, sot, SG, D,
                             NSPLIT, MP, DP, SGP, SPLITP)


@triton.jit
def _combine_row(O, PO, PM, PL, base, b, u, i, sob, soh, sot, SG, D, NSPLIT,
                 MP: tl.constexpr, DP: tl.constexpr, SGP: tl.constexpr, SPLITP: tl.constexpr):
    """Merge the split-K partials (max, sum, acc) of every query head of one row (partials at ``base``)."""
    sp = tl.arange(0, SPLITP)
    g = tl.arange(0, SGP)
    d = tl.arange(0, DP)
    ms = (sp[:, None] < NSPLIT) & (g[None, :] < SG)
    pidx = base + sp[:, None] * MP + g[None, :]
    m = tl.load(PM + pidx, mask=ms, other=-1.0e30, cache_modifier=".cg")
    l = tl.load(PL + pidx, mask=ms, other=0.0, cache_modifier=".cg")
    m_max = tl.max(m, 0)
    w = tl.math.exp2(m - m_max[None, :])
    l_tot = tl.sum(w * l, 0)
    o = tl.load(PO + pidx[:, :, None] * DP + d[None, None, :], mask=ms[:, :, None], other=0.0,
                cache_modifier=".cg")
    out = tl.sum(w[:, :, None] * o, 0) / tl.where(l_tot > 0, l_tot, 1.0)[:, None]
    h = (u * SG + g).to(tl.int64)
    tl.store(O + b * sob + h[:, None] * soh + i * sot + d[None, :], out.to(O.dtype.element_ty),
             mask=(g[:, None] < SG) & (d[None, :] < D))


@triton.jit(do_not_specialize=["Lq"])
def _combine(
    O, PO, PM, PL, sob, soh, sot, NSEL, Lq, SG, D, NSPLIT,
    MP: tl.constexpr, DP: tl.constexpr, SPLITP: tl.constexpr, PDL: tl.constexpr = False,
):
    """Merge the split-K partials (max, sum, acc) of one query head: program (row, head of its unit). With
    PDL (a programmatic dependent launch) it first waits for the attention kernel."""
    if PDL:
        gdc_wait()
    row = tl.program_id(0)
    g = tl.program_id(1)
    i = row % Lq
    bu = row // Lq
    b = (bu // NSEL).to(tl.int64)
    u = bu % NSEL
    sp = tl.arange(0, SPLITP)
    d = tl.arange(0, DP)
    base = row.to(tl.int64) * NSPLIT * MP
    smask = sp < NSPLIT
    m = tl.load(PM + base + sp * MP + g, mask=smask, other=-1.0e30)
    l = tl.load(PL + base + sp * MP + g, mask=smask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.math.exp2(m - m_max)
    l_tot = tl.sum(w * l, 0)
    o = tl.load(PO + (base + sp[:, None] * MP + g) * DP + d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(l_tot > 0, l_tot, 1.0)
    h = (u * SG + g).to(tl.int64)
    tl.store(O + b * sob + h * soh + i * sot + d, out.to(O.dtype.element_ty), mask=d < D)


_SM = {}


def pdl_supported(device) -> bool:
    """Programmatic dependent launch: the next kernel's programs start while the previous kernel finishes
    and wait for it in ``gdc_wait`` (CUDA on compute capability 9.0+, Triton with ``gdc_wait``)."""
    return (gdc_wait is not None and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def _pdl_args(pdl: bool) -> dict:
    """Launch arguments of a kernel with a ``PDL`` switch: as a programmatic dependent launch or plain."""
    return dict(PDL=True, launch_pdl=True) if pdl else {}


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM:
        _SM[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM[idx]


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 2048 else 16


def hisa_attention_exact(q, k, v, pooled, config, *, scale, q_start, mask, out, max_rows: int = 1 << 14):
    """Per-query HISA (the reference's semantics) into ``out`` [B, Hq, Lq, D]. ``mask`` is None or a bool
    tensor [B, 1, Lq, Lk]."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    SG = G if config.selection == "group" else 1
    NSEL = Hq // SG
    bs, TB, TK = config.block_size, config.top_blocks, config.top_k
    NB = math.ceil(Lk / bs)
    DP = triton.next_power_of_2(D)
    SGP = triton.next_power_of_2(SG)
    MP = max(16, SGP)
    BSP = triton.next_power_of_2(bs)
    BPP = max(1, 128 // BSP)
    W2 = TB * bs
    dev = q.device
    # queries are processed in chunks so the score buffers stay bounded
    qc = max(1, min(Lq, max_rows // (B * NSEL)))
    for c0 in range(0, Lq, qc):
        c1 = min(Lq, c0 + qc)
        n = c1 - c0
        R = B * NSEL * n
        qv = q[:, :, c0:c1]
        ov = out[:, :, c0:c1]
        qs0 = q_start + c0
        mv = mask[:, :, c0:c1] if mask is not None else None
        ms = (mv.stride(0), mv.stride(2), mv.stride(3)) if mv is not None else (0, 0, 0)
        B1 = max(16, triton.next_power_of_2(NB))
        B2 = max(16, triton.next_power_of_2(TB * BSP))
        if FUSED and B1 <= FUSED_MAX_WIDTH and B2 <= FUSED_MAX_WIDTH:
            blk = torch.empty(R, TB, dtype=torch.int32, device=dev)
            _stage1_select[(R,)](
                qv, pooled, blk, qv.stride(0), qv.stride(1), qv.stride(2),
                pooled.stride(0), pooled.stride(1), pooled.stride(2),
                NSEL, n, SG, G, D, qs0, bs, TB,
                SGP=SGP, DP=DP, DC=8 if B1 > 1024 else 16, BLOCK=B1, KP=max(16, triton.next_power_of_2(TB)),
                RADIX=_select.SELECT_METHOD, num_warps=_warps(B1),
            )
            idx = torch.empty(R, TK, dtype=torch.int32, device=dev)
            _stage2_select[(R,)](
                qv, k, blk, idx, mv if mv is not None else blk,
                qv.stride(0), qv.stride(1), qv.stride(2), k.stride(0), k.stride(1), k.stride(2), *ms,
                NSEL, n, SG, G, D, qs0, Lk, bs, TB, TK, scale,
                SGP=SGP, DP=DP, DC=8 if B2 > 1024 else 16, BSP=BSP, BLOCK=B2,
                KP=max(16, triton.next_power_of_2(TK)), HAS_MASK=mv is not None, RADIX=_select.SELECT_METHOD,
                num_warps=_warps(B2),
            )
        else:
            # stage 1
            s1 = torch.empty(R, NB, dtype=torch.float32, device=dev)
            BLOCK_B = 128
            _block_scores[(R, triton.cdiv(NB, BLOCK_B))](
                qv, pooled, s1, qv.stride(0), qv.stride(1), qv.stride(2),
                pooled.stride(0), pooled.stride(1), pooled.stride(2), s1.stride(0),
                NSEL, n, SG, G, NB, D, SGP=SGP, DP=DP, BLOCK_B=BLOCK_B, num_warps=4,
            )
            blk = topk_select(s1, TB, n=NB, nvis=(qs0, 1, n, bs))
            # stage 2
            s2 = torch.empty(R, W2, dtype=torch.float32, device=dev)
            _token_scores[(R, triton.cdiv(TB, BPP))](
                qv, k, blk, s2, mv if mv is not None else s2, s2,
                qv.stride(0), qv.stride(1), qv.stride(2), k.stride(0), k.stride(1), k.stride(2),
                blk.stride(0), s2.stride(0), *ms,
                NSEL, n, SG, G, D, bs, TB, qs0, Lk, scale,
                SGP=SGP, DP=DP, BSP=BSP, BPP=BPP, HAS_MASK=mv is not None, DEV_LEN=False, num_warps=4,
            )
            idx = topk_select(s2, TK, n=W2, block_map=blk, map_bs=bs)
        # attention over the kept tokens
        _attend(qv, k, v, idx, ov, n_idx=TK, scale=scale, SG=SG, G=G, NSEL=NSEL, MP=MP, DP=DP)
    return out


def _split_plan(R: int, n: int, dev, block_t: int = 64) -> tuple[int, int]:
    """(nsplit, chunk) for split-K attention of R rows over up to n tokens: about two programs per SM,
    at most MAX_SPLITS per row (the combine holds every split of a head in registers)."""
    want = max(1, min(MAX_SPLITS, (2 * _sm_count(dev)) // R))
    nsplit = max(1, min(want, triton.cdiv(n, block_t)))
    chunk = triton.cdiv(triton.cdiv(n, nsplit), block_t) * block_t
    return triton.cdiv(n, chunk), chunk


_COUNTERS: dict = {}


def counters(device, n: int) -> torch.Tensor:
    """At least n zeroed int32 arrival counters on ``device`` for kernels whose last program of a row
    finishes the row (:func:`_arrive`; each launch leaves them zero again). One buffer per device, never
    freed (recorded CUDA graphs hold its address): launches that use it must not run concurrently on
    different streams."""
    key = str(device)
    bufs = _COUNTERS.setdefault(key, [])
    if not bufs or bufs[-1].numel() < n:
        bufs.append(torch.zeros(max(n, 4096), dtype=torch.int32, device=device))
    return bufs[-1]


def _attend(q, k, v, idx, out, *, n_idx, scale, length=None, SG, G, NSEL, MP, DP, combine_last=False,
            block_t=64, warps=4, pdl=False):
    """Split-K attention of one query per row over idx[:, :n_idx] (or, with ``length``, over every key up to
    the row's query at position length[1] + i: dense) plus the combine of the partials (``combine_last``:
    inside the attention kernel, by each row's last program, one launch less). ``pdl``: both launches are
    programmatic dependent launches (:func:`pdl_supported`; the kernel before must call
    ``gdc_launch_dependents`` or simply finish)."""
    B, Hq, Lq, D = q.shape
    R = B * NSEL * Lq
    BLOCK_T = block_t
    nsplit, chunk = _split_plan(R, n_idx, q.device, BLOCK_T)
    direct = nsplit == 1
    combine_last = combine_last and not direct
    part = torch.empty(max(1, R * nsplit * MP * (DP + 2)) if not direct else 1, dtype=torch.float32,
                       device=q.device)
    po = part[: R * nsplit * MP * DP]
    pm = part[R * nsplit * MP * DP: R * nsplit * MP * (DP + 1)]
    pl = part[R * nsplit * MP * (DP + 1):]
    contig = length is not None
    idx_arg = idx if idx is not None else part
    splitp = max(2, triton.next_power_of_2(nsplit))
    _sparse_attn[(R, nsplit)](
        q, k, v, idx_arg, out, po, pm, pl, length if contig else part,
        counters(q.device, R) if combine_last else part,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        idx.stride(0) if idx is not None else 0,
        NSEL, Lq, SG, G, D, n_idx, chunk, scale * _LOG2E, nsplit,
        MP=MP, DP=DP, BLOCK_T=BLOCK_T, DIRECT=direct, CONTIG=contig,
        COMBINE=combine_last, SGP=triton.next_power_of_2(SG), SPLITP=splitp, num_warps=warps,
        **_pdl_args(pdl),
    )
    if not direct and not combine_last:
        _combine[(R, SG)](
            out, po, pm, pl, out.stride(0), out.stride(1), out.stride(2), NSEL, Lq, SG, D, nsplit,
            MP=MP, DP=DP, SPLITP=splitp, num_warps=4, **_pdl_args(pdl),
        )
    return out
