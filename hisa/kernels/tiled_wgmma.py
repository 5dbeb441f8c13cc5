"""The tile prefill kernel for Hopper, written in Gluon: asynchronous warpgroup MMAs.

Same semantics and arguments as ``tiled._tile_attn`` (one program per tile x head chunk x batch-unit; rows are
HPP heads x block_size queries; every kept block but the own block is fully visible, the own block comes
last with the causal mask). What differs is the schedule, which Triton's ``tl.dot`` cannot express (it waits
for each product as soon as it is issued). Per kept block j, in FlashAttention-3's order: issue the scores
Q.K_j; rescale the output and issue P_{j-1}.V_{j-1}; wait for the scores; mask (own block only) and run the
softmax of block j; wait for P.V; refill block j-1's slot. Nothing is in flight across the loop's back edge and
P becomes an MMA operand only after the previous P.V completed: otherwise ptxas serialises every product
(its C7511 / C7514 warnings). ptxas still places the P.V wait before the exponentials (the new P takes the
registers the running product reads), so within one program the products overlap the rescale and the row
maxima; the four 4-warp programs per SM overlap each other. The row sums come from one more small product,
P times a [block_size, 16] tile of ones (``SUM_MMA``), instead of a float add per score on the CUDA cores,
which are the busier side (the sums are then those of the bf16/fp16-rounded P that the output uses).
K/V blocks arrive by TMA into a ring of ``STAGES`` shared-memory slots, each with its own mbarrier; the
next block's index is loaded a step before its copy is issued.

H100, 1B-model layer at 128k keys (head dim 64): 10.62 ms against 10.85 for the Triton kernel, and the
model's time to first token 0.605 s against 0.620 (alternating rounds, docs/benchmarks.md). At head dim 128
the Triton kernel is faster and stays the default there (``tiled.WGMMA_SETTINGS``).

Used only on compute capability 9.x (wgmma is Hopper's instruction) without an attention mask, with K/V
buffers TMA can address; everything else keeps the Triton kernel. ``HISA_TILE_KERNEL=triton`` turns it off.
"""

from __future__ import annotations

import torch
import triton

try:  # Gluon (Triton >= 3.5): Hopper's warpgroup MMA, TMA and mbarriers
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    from triton.runtime.jit import constexpr_function
except ImportError:  # pragma: no cover - older Triton
    gluon = None


if gluon is not None:

    @constexpr_function
    def _load_layout(D, num_warps):
        cols = min(32, max(1, D // 8))
        return gl.BlockedLayout([1, 8], [32 // cols, cols], [num_warps, 1], [1, 0])

    @gluon.jit
    def _kept(BLK, row, top_blocks, pos, nkept):
        """The kept block at list position pos (0 past the list: a copy that is never issued)."""
        return gl.load(BLK + row * top_blocks + pos, mask=pos < nkept, other=0)

    @gluon.jit
    def _fetch(KD, VD, bars, k_bufs, v_bufs, slot, b32, kv, blk, pred, BS: gl.constexpr, nbytes: gl.constexpr):
        """TMA copies of one kept block's K and V into slot ``slot``, completing on its barrier."""
        bar = bars.index(slot)
        mbarrier.expect(bar, nbytes, pred=pred)
        tma.async_copy_global_to_shared(KD, [b32, kv, blk * BS, 0], bar, k_bufs.index(slot), pred=pred)
        tma.async_copy_global_to_shared(VD, [b32, kv, blk * BS, 0], bar, v_bufs.index(slot), pred=pred)

    @gluon.jit
    def _own_block_mask(s, t_abs, Lk, BS: gl.constexpr, s_layout: gl.constexpr):
        """The tile's own block: causal inside, keys past Lk (read as zeros) masked out."""
        BLOCK_M: gl.constexpr = s.shape[0]
        qpos = t_abs * BS + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout)) % BS
        tok = t_abs * BS + gl.arange(0, BS, layout=gl.SliceLayout(0, s_layout))
        return gl.where((tok[None, :] <= qpos[:, None]) & (tok[None, :] < Lk), s, float("-inf"))

    @gluon.jit
    def _online_softmax(s, m_i, l_i, qk_scale, SUM_MMA: gl.constexpr):
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        if not SUM_MMA:  # else the row sums come from a product of P with ones
            l_i = l_i * alpha + gl.sum(p, 1)
        return p, alpha, m_new, l_i

    @gluon.jit
    def _step(j, OWN: gl.constexpr, acc, lacc, pp, alpha, m_i, l_i, fblk, q_smem, k_bufs, v_bufs, ones, bars, s_zero,
              KD, VD, BLK, row, top_blocks, nkept, t_abs, Lk, b32, kv, qk_scale, nbytes: gl.constexpr,
              BS: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr,
              o_layout: gl.constexpr, p_layout: gl.constexpr, l_layout: gl.constexpr, SUM_MMA: gl.constexpr):
        """Kept block j >= 1: its scores, P.V of block j - 1, its softmax, then block j - 1's slot refilled.

        FlashAttention-3's order with nothing in flight across the loop's back edge and P converted to MMA
        operands only after the previous P.V completed; otherwise ptxas serialises every product."""
        slot = j % STAGES
        mbarrier.wait(bars.index(slot), (j // STAGES) & 1)
        sc = warpgroup_mma(q_smem, k_bufs.index(slot).reshape([BS, D]).permute((1, 0)), s_zero, use_acc=False,
                           is_async=True)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        pslot = (j - 1) % STAGES
        acc = warpgroup_mma(pp, v_bufs.index(pslot).reshape([BS, D]), acc, is_async=True)
        if SUM_MMA:
            lacc = lacc * gl.convert_layout(alpha, gl.SliceLayout(1, l_layout))[:, None]
            lacc = warpgroup_mma(pp, ones, lacc, is_async=True)
            sc = warpgroup_mma_wait(2, deps=(sc,))  # in order: the scores done, P.V and P.1 still running
        else:
            sc = warpgroup_mma_wait(1, deps=(sc,))  # in order: the scores done, P.V still running
        if OWN:
            sc = _own_block_mask(sc, t_abs, Lk, BS, s_layout)
        p, alpha, m_i, l_i = _online_softmax(sc, m_i, l_i, qk_scale, SUM_MMA)
        if SUM_MMA:
            acc, lacc = warpgroup_mma_wait(0, deps=(acc, lacc))
        else:
            acc = warpgroup_mma_wait(0, deps=(acc,))
        pp = gl.convert_layout(p.to(KD.dtype), p_layout)
        # block j - 1's slot is free: fetch block j - 1 + STAGES into it (its index was loaded a step ago)
        fj = j - 1 + STAGES
        _fetch(KD, VD, bars, k_bufs, v_bufs, pslot, b32, kv, fblk, fj < nkept, BS, nbytes)
        fblk = _kept(BLK, row, top_blocks, fj + 1, nkept)
        return acc, lacc, pp, alpha, m_i, l_i, fblk

    @gluon.jit(do_not_specialize=["NT", "t_first", "q_start", "Lq", "Lk"])
    def _tile_attn_wgmma(
        Q, KD, VD, BLK, O,
        sqb, sqh, sqt, sob, soh, sot,
        NSEL, SG, G, NT, t_first, q_start, Lq, Lk, top_blocks, qk_scale,
        D: gl.constexpr, BS: gl.constexpr, HPP: gl.constexpr, STAGES: gl.constexpr,
        CHUNK_FAST: gl.constexpr, num_warps: gl.constexpr, SUM_MMA: gl.constexpr = False,
    ):
        dtype: gl.constexpr = KD.dtype
        BLOCK_M: gl.constexpr = HPP * BS
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BS, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        l_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, 16, 16])
        ld_layout: gl.constexpr = _load_layout(D, num_warps)
        q_slayout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], dtype)

        if CHUNK_FAST:
            pid_c = gl.program_id(0)
            pid_t = gl.program_id(1)
        else:
            pid_t = gl.program_id(0)
            pid_c = gl.program_id(1)
        bu = gl.program_id(2)
        b = bu // NSEL
        u = bu % NSEL
        kv = (u * SG) // G
        t_abs = t_first + pid_t

        # the program's queries: rows are HPP heads x BS positions; rows outside the heads or queries read zeros
        r = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld_layout))
        d = gl.arange(0, D, layout=gl.SliceLayout(0, ld_layout))
        g = pid_c * HPP + r // BS
        i = t_abs * BS + r % BS - q_start
        row_ok = (g < SG) & (i >= 0) & (i < Lq)
        h = (u * SG + g).to(gl.int64)
        qoff = b.to(gl.int64) * sqb + h * sqh + i.to(gl.int64) * sqt
        q = gl.load(Q + qoff[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, D], q_slayout, q)

        k_bufs = gl.allocate_shared_memory(dtype, [STAGES] + KD.block_type.shape, KD.layout)
        v_bufs = gl.allocate_shared_memory(dtype, [STAGES] + VD.block_type.shape, VD.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(bars.index(s), count=1)
        fence_async_shared()

        row = bu.to(gl.int64) * NT + pid_t
        nkept = gl.minimum(top_blocks, t_abs + 1)  # the list is ascending: the own block last
        nbytes: gl.constexpr = 2 * BS * D * dtype.primitive_bitwidth // 8
        b32 = b.to(gl.int32)
        for s in gl.static_range(STAGES):  # blocks 0 .. STAGES-1 in flight
            _fetch(KD, VD, bars, k_bufs, v_bufs, s, b32, kv, _kept(BLK, row, top_blocks, s, nkept), s < nkept,
                   BS, nbytes)
        # the index of the block fetched next is loaded a step before its copies are issued (a global load
        # right before the copies would stall every step for its latency)
        fblk = _kept(BLK, row, top_blocks, STAGES, nkept)

        s_zero = gl.zeros([BLOCK_M, BS], gl.float32, s_layout)
        m_i = gl.full([BLOCK_M], -1.0e30, gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
        lacc = gl.zeros([BLOCK_M, 16], gl.float32, l_layout)
        ones = gl.allocate_shared_memory(dtype, [BS, 16], gl.NVMMASharedLayout.get_default_for([BS, 16], dtype),
                                         gl.full([BS, 16], 1.0, dtype, ld_layout))
        fence_async_shared()
        # block 0 (the own block when it is the only one)
        mbarrier.wait(bars.index(0), 0)
        sc = warpgroup_mma(q_smem, k_bufs.index(0).reshape([BS, D]).permute((1, 0)), s_zero, use_acc=False,
                           is_async=True)
        sc = warpgroup_mma_wait(0, deps=(sc,))
        if nkept == 1:
            sc = _own_block_mask(sc, t_abs, Lk, BS, s_layout)
        p, alpha, m_i, l_i = _online_softmax(sc, m_i, l_i, qk_scale, SUM_MMA)
        pp = gl.convert_layout(p.to(dtype), p_layout)
        for j in range(1, nkept - 1):  # fully visible kept blocks
            acc, lacc, pp, alpha, m_i, l_i, fblk = _step(
                j, False, acc, lacc, pp, alpha, m_i, l_i, fblk, q_smem, k_bufs, v_bufs, ones, bars, s_zero, KD, VD,
                BLK, row, top_blocks, nkept, t_abs, Lk, b32, kv, qk_scale, nbytes, BS, D, STAGES, s_layout, o_layout,
                p_layout, l_layout, SUM_MMA)
        if nkept > 1:  # the own block, last
            acc, lacc, pp, alpha, m_i, l_i, fblk = _step(
                nkept - 1, True, acc, lacc, pp, alpha, m_i, l_i, fblk, q_smem, k_bufs, v_bufs, ones, bars, s_zero, KD,
                VD, BLK, row, top_blocks, nkept, t_abs, Lk, b32, kv, qk_scale, nbytes, BS, D, STAGES, s_layout,
                o_layout, p_layout, l_layout, SUM_MMA)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        acc = warpgroup_mma(pp, v_bufs.index((nkept - 1) % STAGES).reshape([BS, D]), acc, is_async=True)
        if SUM_MMA:
            lacc = lacc * gl.convert_layout(alpha, gl.SliceLayout(1, l_layout))[:, None]
            lacc = warpgroup_mma(pp, ones, lacc, is_async=True)
            acc, lacc = warpgroup_mma_wait(0, deps=(acc, lacc))
            l_i = gl.convert_layout(gl.max(lacc, 1), gl.SliceLayout(1, s_layout))
        else:
            acc = warpgroup_mma_wait(0, deps=(acc,))
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(s))

        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        out = acc / gl.where(l_o > 0, l_o, 1.0)[:, None]
        out = gl.convert_layout(out.to(O.dtype.element_ty), ld_layout)
        ooff = b.to(gl.int64) * sob + h * soh + i.to(gl.int64) * sot
        gl.store(O + ooff[:, None] + d[None, :], out, mask=row_ok[:, None])


def available() -> bool:
    """Whether this Triton has Gluon's Hopper API as written against here (Triton 3.6; Gluon's API still moves
    between releases). The caller also checks the GPU and the inputs."""
    if gluon is None:
        return False
    try:
        major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (3, 6)


def descriptors(k, v, bs: int):
    """Gluon TMA descriptors over [B, Hkv, Lk, D] K and V with a [1, 1, bs, D] box (rows past Lk read as zeros)."""
    gdt = gl.bfloat16 if k.dtype == torch.bfloat16 else gl.float16
    D = k.shape[-1]
    layout = gl.NVMMASharedLayout.get_default_for([1, 1, bs, D], gdt)
    return [GluonDescriptor(t, list(t.shape), list(t.stride()), [1, 1, bs, D], layout) for t in (k, v)]


def launch(q, k, v, blk, out, *, NSEL, SG, G, NT, t_first, q_start, Lq, Lk, top_blocks, qk_scale, bs, hpp,
           chunk_fast, num_warps=4, stages=2, sum_mma=True, maxnreg=None):
    """Launch the kernel into ``out`` (arguments as for ``tiled._tile_attn``; ``blk`` from ``tiled.tile_blocks``)."""
    if stages < 2:
        raise ValueError(f"the wgmma tile kernel needs at least 2 K/V stages, got {stages}")
    D = q.shape[-1]
    kd, vd = descriptors(k, v, bs)
    nchunk = triton.cdiv(SG, hpp)
    B = q.shape[0]
    grid = (nchunk, NT, B * NSEL) if chunk_fast else (NT, nchunk, B * NSEL)
    _tile_attn_wgmma[grid](
        q, kd, vd, blk, out,
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        NSEL, SG, G, NT, t_first, q_start, Lq, Lk, top_blocks, qk_scale,
        D=D, BS=bs, HPP=hpp, STAGES=stages, CHUNK_FAST=chunk_fast, num_warps=num_warps, SUM_MMA=sum_mma,
        **({"maxnreg": maxnreg} if maxnreg else {}),
    )
    return out
