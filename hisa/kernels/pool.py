"""Pooled-key maintenance in one launch: add new keys to the per-block float32 sums and refresh means.

``update_pooled(psum, pooled, keys, start)``: ``keys`` [B, H, t, D] are the tokens at positions
[start, start + t); every block they touch gets its sum increased and its mean recomputed with the count
of tokens it now holds. Same result as HisaLayer's PyTorch code, with one kernel instead of ~6 launches
per layer and step (this matters in decode).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["start", "t", "length", "b0"])
def _update_pooled(
    PS, PM, KEYS, sps_bh, sps_n, spm_bh, spm_n, sk_b, sk_h, sk_t, H, start, t, length, bs, b0, D,
    BSP: tl.constexpr, DP: tl.constexpr,
):
    bh = tl.program_id(0)
    n = b0 + tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    j = tl.arange(0, BSP)
    d = tl.arange(0, DP)
    tok = n * bs + j  # absolute positions of this block's slots
    new = (j < bs) & (tok >= start) & (tok < start + t)
    rel = (tok - start).to(tl.int64)
    kk = tl.load(KEYS + b * sk_b + h * sk_h + rel[:, None] * sk_t + d[None, :],
                 mask=new[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
    add = tl.sum(kk, 0)
    ps_ptr = PS + bh.to(tl.int64) * sps_bh + n * sps_n + d
    s = tl.load(ps_ptr, mask=d < D, other=0.0) + add
    tl.store(ps_ptr, s, mask=d < D)
    count = tl.minimum(length - n * bs, bs).to(tl.float32)
    tl.store(PM + bh.to(tl.int64) * spm_bh + n * spm_n + d, s / count, mask=d < D)


def update_pooled(psum: torch.Tensor, pooled: torch.Tensor, keys: torch.Tensor, start: int, block_size: int) -> None:
    """In place: psum/pooled [B, H, NBcap, D] float32 (contiguous in the last two dims per (b, h))."""
    B, H, t, D = keys.shape
    if t == 0:
        return
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    bs = block_size
    b0, b1 = start // bs, (start + t - 1) // bs
    assert psum.stride(0) == H * psum.stride(1) and pooled.stride(0) == H * pooled.stride(1)
    _update_pooled[(B * H, b1 - b0 + 1)](
        psum, pooled, keys, psum.stride(1), psum.stride(2), pooled.stride(1), pooled.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2), H, start, t, start + t, bs, b0, D,
        BSP=triton.next_power_of_2(bs), DP=triton.next_power_of_2(D), num_warps=4,
    )


@triton.jit
def _append_token(
    K, V, PS, PM, KN, VN, LENP,
    skb, skh, skt, svb, svh, svt, sps_bh, sps_n, spm_bh, spm_n, sknb, sknh, svnb, svnh,
    H, bs, D, Dv,
    BSP: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    p = tl.load(LENP).to(tl.int64) - 1  # the new token's position
    d = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    kn = tl.load(KN + b * sknb + h * sknh + d, mask=d < D, other=0.0)
    vn = tl.load(VN + b * svnb + h * svnh + dv, mask=dv < Dv, other=0.0)
    kbase = K + b * skb + h * skh
    tl.store(kbase + p * skt + d, kn, mask=d < D)
    tl.store(V + b * svb + h * svh + p * svt + dv, vn, mask=dv < Dv)
    # the block's sum recomputed from its cached keys before p plus the new key: idempotent, so a warm-up
    # run before a CUDA-graph capture (or a replay of the same step) cannot count a key twice
    n = p // bs
    j = n * bs + tl.arange(0, BSP)
    older = j < p
    kk = tl.load(kbase + j[:, None] * skt + d[None, :], mask=older[:, None] & (d[None, :] < D), other=0.0)
    s = tl.sum(kk.to(tl.float32), 0) + kn.to(tl.float32)
    tl.store(PS + bh.to(tl.int64) * sps_bh + n * sps_n + d, s, mask=d < D)
    count = (p - n * bs + 1).to(tl.float32)
    tl.store(PM + bh.to(tl.int64) * spm_bh + n * spm_n + d, s / count, mask=d < D)


def append_token(k_cache, v_cache, psum, pooled, k_new, v_new, length, block_size: int) -> None:
    """Write one token per sequence at position ``length[0] - 1`` of the K/V buffers [B, H, cap, D] and
    set its block's pooled sum and mean, in one launch. ``length`` is a one-element int tensor on the
    device, so the call can be captured in a CUDA graph and replayed while the length grows."""
    B, H, t, D = k_new.shape
    if t != 1:
        raise ValueError("append_token writes one token per sequence")
    Dv = v_new.shape[-1]
    if k_new.stride(-1) != 1:
        k_new = k_new.contiguous()
    if v_new.stride(-1) != 1:
        v_new = v_new.contiguous()
    assert psum.stride(0) == H * psum.stride(1) and pooled.stride(0) == H * pooled.stride(1)
    _append_token[(B * H,)](
        k_cache, v_cache, psum, pooled, k_new, v_new, length,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), psum.stride(1), psum.stride(2), pooled.stride(1), pooled.stride(2),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        H, block_size, D, Dv,
        BSP=triton.next_power_of_2(block_size), DP=triton.next_power_of_2(D), DVP=triton.next_power_of_2(Dv),
        num_warps=4,
    )
