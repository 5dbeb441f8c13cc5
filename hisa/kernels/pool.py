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


@triton.jit(do_not_specialize=["length", "b0"])
def _crop_pooled(
    PS, PM, KEYS, sps_bh, sps_n, spm_bh, spm_n, sk_b, sk_h, sk_t, H, length, bs, b0, D,
    BSP: tl.constexpr, DP: tl.constexpr,
):
    """Program (b*h, i): block b0 + i after the cache was cut to ``length`` tokens: its sum and mean from the
    keys it still holds (zero when it holds none)."""
    bh = tl.program_id(0)
    n = b0 + tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    j = tl.arange(0, BSP)
    d = tl.arange(0, DP)
    tok = n * bs + j
    live = (j < bs) & (tok < length)
    kk = tl.load(KEYS + b * sk_b + h * sk_h + tok[:, None].to(tl.int64) * sk_t + d[None, :],
                 mask=live[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
    s = tl.sum(kk, 0)
    count = tl.maximum(tl.minimum(length - n * bs, bs), 1).to(tl.float32)
    tl.store(PS + bh.to(tl.int64) * sps_bh + n * sps_n + d, s, mask=d < D)
    tl.store(PM + bh.to(tl.int64) * spm_bh + n * spm_n + d, s / count, mask=d < D)


def crop_pooled(psum: torch.Tensor, pooled: torch.Tensor, keys: torch.Tensor, length: int, b0: int, b1: int,
                block_size: int) -> None:
    """After cutting a cache to ``length`` tokens: blocks b0 .. b1 - 1 of psum/pooled [B, H, NBcap, D] get the
    sum and mean of the keys ([B, H, cap, D]) they still hold, zero when none, in one launch."""
    B, H, _, D = keys.shape
    if b1 <= b0:
        return
    assert psum.stride(0) == H * psum.stride(1) and pooled.stride(0) == H * pooled.stride(1)
    _crop_pooled[(B * H, b1 - b0)](
        psum, pooled, keys, psum.stride(1), psum.stride(2), pooled.stride(1), pooled.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2), H, length, block_size, b0, D,
        BSP=triton.next_power_of_2(block_size), DP=triton.next_power_of_2(D), num_warps=4,
    )


@triton.jit(do_not_specialize=["T", "END", "START"])  # any number of new tokens, one compiled kernel
def _append_tokens(
    K, V, PS, PM, KN, VN, LENP,
    skb, skh, skt, svb, svh, svt, sps_bh, sps_n, spm_bh, spm_n, sknb, sknh, sknt, svnb, svnh, svnt,
    H, bs, D, Dv, T, END, START,
    BSP: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr, DEV_LEN: tl.constexpr,
):
    """Program (b*h, i): the i-th block touched by T new rows written at [start, start + T); LENP = [end,
    start] where end <= start + T is where the real tokens stop (rows past it are padding: written, not
    pooled). The block's sum is recomputed from its cached rows before ``start`` and the new rows: idempotent."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if DEV_LEN:
        end = tl.load(LENP).to(tl.int64)
        start = tl.load(LENP + 1).to(tl.int64)
    else:  # positions from the host (an eager append)
        end = END.to(tl.int64)
        start = START.to(tl.int64)
    n = start // bs + tl.program_id(1)
    d = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    pos = n * bs + tl.arange(0, BSP)
    inblk = tl.arange(0, BSP) < bs
    new = inblk & (pos >= start) & (pos < start + T)
    rel = pos - start
    kn = tl.load(KN + b * sknb + h * sknh + rel[:, None] * sknt + d[None, :], mask=new[:, None] & (d[None, :] < D),
                 other=0.0)
    vn = tl.load(VN + b * svnb + h * svnh + rel[:, None] * svnt + dv[None, :],
                 mask=new[:, None] & (dv[None, :] < Dv), other=0.0)
    kbase = K + b * skb + h * skh
    tl.store(kbase + pos[:, None] * skt + d[None, :], kn, mask=new[:, None] & (d[None, :] < D))
    tl.store(V + b * svb + h * svh + pos[:, None] * svt + dv[None, :], vn, mask=new[:, None] & (dv[None, :] < Dv))
    if n * bs < end:
        older = inblk & (pos < start)
        kk = tl.load(kbase + pos[:, None] * skt + d[None, :], mask=older[:, None] & (d[None, :] < D), other=0.0)
        real = new & (pos < end)
        s = tl.sum(kk.to(tl.float32), 0) + tl.sum(tl.where(real[:, None], kn.to(tl.float32), 0.0), 0)
        tl.store(PS + bh.to(tl.int64) * sps_bh + n * sps_n + d, s, mask=d < D)
        count = (tl.minimum(end - n * bs, bs)).to(tl.float32)
        tl.store(PM + bh.to(tl.int64) * spm_bh + n * spm_n + d, s / count, mask=d < D)


def append_token(k_cache, v_cache, psum, pooled, k_new, v_new, length, block_size: int) -> None:
    """Write T tokens per sequence (k_new/v_new [B, H, T, D]) at positions [length[1], length[1] + T) of the
    K/V buffers [B, H, cap, D] and refresh the pooled sum and mean of every block holding real tokens, which
    end at length[0] (rows past it are padding of a fixed-size chunk), in one launch. ``length`` is a
    two-element int tensor on the device, so the call can be captured in a CUDA graph and replayed while the
    cache grows."""
    T = k_new.shape[2]
    nblk = triton.cdiv(T, block_size) + (1 if T > 1 else 0)  # blocks a run of T rows can touch
    _launch_append(k_cache, v_cache, psum, pooled, k_new, v_new, block_size, nblk, length=length)


def append_rows(k_cache, v_cache, psum, pooled, k_new, v_new, start: int, block_size: int) -> None:
    """An eager append: write T tokens (k_new/v_new [B, H, T, D], any row stride) at [start, start + T) of the
    K/V buffers and refresh the pooled sum and mean of every block they touch, in one launch (instead of two
    strided copies and a pooling kernel that reads the keys again)."""
    T = k_new.shape[2]
    nblk = (start + T - 1) // block_size - start // block_size + 1
    _launch_append(k_cache, v_cache, psum, pooled, k_new, v_new, block_size, nblk, start=start)


def _launch_append(k_cache, v_cache, psum, pooled, k_new, v_new, block_size: int, nblk: int, *,
                   length=None, start: int = 0) -> None:
    """``_append_tokens`` over ``nblk`` blocks: positions from ``length`` (device) or from ``start`` (host)."""
    B, H, T, D = k_new.shape
    Dv = v_new.shape[-1]
    if k_new.stride(-1) != 1:
        k_new = k_new.contiguous()
    if v_new.stride(-1) != 1:
        v_new = v_new.contiguous()
    assert psum.stride(0) == H * psum.stride(1) and pooled.stride(0) == H * pooled.stride(1)
    dev_len = length is not None
    _append_tokens[(B * H, nblk)](
        k_cache, v_cache, psum, pooled, k_new, v_new, length if dev_len else psum,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), psum.stride(1), psum.stride(2), pooled.stride(1), pooled.stride(2),
        k_new.stride(0), k_new.stride(1), k_new.stride(2), v_new.stride(0), v_new.stride(1), v_new.stride(2),
        H, block_size, D, Dv, T, 0 if dev_len else start + T, 0 if dev_len else start,
        BSP=triton.next_power_of_2(block_size), DP=triton.next_power_of_2(D), DVP=triton.next_power_of_2(Dv),
        DEV_LEN=dev_len, num_warps=4,
    )
