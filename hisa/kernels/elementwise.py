"""Triton kernels for the decoder layers' elementwise code (:mod:`hisa.fused`): RMSNorm, rotary embeddings,
SiLU-gate, each one pass over its activations, rounding where the eager code rounds. Their specifications
are :func:`hisa.fused.rms_norm`, :func:`hisa.fused.rope` and :func:`hisa.fused.silu_mul`; inputs they do not
cover (mixed dtypes, partial rotary dims, CPU tensors) go to those functions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .. import fused


@triton.jit
def _rounded(x, DT: tl.constexpr):
    """float32 x rounded (to nearest even) to the precision of DT (bf16 or fp16), as a float32. Integer
    arithmetic on the bits: a conversion to DT and back may be folded away by the compiler, which would skip
    the rounding the eager code does between two operations. (fp16: exact for results in fp16's normal range.)"""
    b = x.to(tl.int32, bitcast=True)
    if DT == tl.bfloat16:
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    else:
        b = (b + 0xFFF + ((b >> 13) & 1)) & -8192
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _rms_norm_kernel(X, W, Y, sx, sy, N, inv_n, eps, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    m = c < N
    x = tl.load(X + r * sx + c, mask=m, other=0.0).to(tl.float32)
    var = tl.sum(x * x, 0) * inv_n  # as torch's mean: the sum times 1 / N
    h = _rounded(x * libdevice.rsqrt(var + eps), X.dtype.element_ty)
    w = tl.load(W + c, mask=m, other=0.0)
    y = w.to(tl.float32) * h
    tl.store(Y + r * sy + c, y.to(Y.dtype.element_ty), mask=m)


def rms_norm(x, weight, eps: float):
    out_dtype = torch.result_type(weight, x)
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype \
            or weight.dim() != 1 or weight.shape[0] != x.shape[-1] or x.shape[-1] > 16384:
        return fused.rms_norm(x, weight, eps)
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, x2.stride(0), y.stride(0), n, 1.0 / n, float(eps), BLOCK=block,
                                         num_warps=4 if block <= 2048 else 8)
    return y.view(x.shape)


@triton.jit(do_not_specialize=["L"])  # any prompt length, one compiled kernel
def _rope_kernel(X, C, S, Y, L, H, sxb, sxh, sxl, syb, syh, syl, scb, scl, ssb, ssl,
                 D: tl.constexpr, HB: tl.constexpr):
    bl = tl.program_id(0)
    b = (bl // L).to(tl.int64)
    pos = (bl % L).to(tl.int64)
    h = tl.program_id(1) * HB + tl.arange(0, HB)
    d = tl.arange(0, D)
    half: tl.constexpr = D // 2
    m = (h[:, None] < H) & (d[None, :] < D)
    rot = tl.where(d < half, d + half, d - half)
    xb = X + b * sxb + pos * sxl + h[:, None].to(tl.int64) * sxh
    x = tl.load(xb + d[None, :], mask=m, other=0.0)
    xr = tl.load(xb + rot[None, :], mask=m, other=0.0)
    xr = tl.where(d[None, :] < half, -xr, xr)  # rotate_half: exact
    c = tl.load(C + b * scb + pos * scl + d)
    s = tl.load(S + b * ssb + pos * ssl + d)
    dt = X.dtype.element_ty
    a = _rounded(x.to(tl.float32) * c.to(tl.float32)[None, :], dt)
    r = _rounded(xr.to(tl.float32) * s.to(tl.float32)[None, :], dt)
    y = (a + r).to(dt)
    tl.store(Y + b * syb + pos * syl + h[:, None].to(tl.int64) * syh + d[None, :], y, mask=m)


def _rope_one(x, cos, sin):
    B, H, L, D = x.shape
    y = torch.empty_like(x)
    if y.numel():
        cb = cos.stride(0) if cos.shape[0] > 1 else 0
        sb = sin.stride(0) if sin.shape[0] > 1 else 0
        hb = min(triton.next_power_of_2(H), max(1, 2048 // D))
        _rope_kernel[(B * L, triton.cdiv(H, hb))](
            x, cos, sin, y, L, H, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
            cb, cos.stride(1), sb, sin.stride(1), D=D, HB=hb, num_warps=4,
        )
    return y


def rope(q, k, cos, sin, unsqueeze_dim=1):
    ok = (q.is_cuda and unsqueeze_dim == 1 and q.dim() == 4 and k.dim() == 4 and cos.dim() == 3
          and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype == cos.dtype == sin.dtype
          and cos.shape == sin.shape and cos.shape[-1] == q.shape[-1] == k.shape[-1]
          and q.shape[-1] % 2 == 0 and q.shape[-1] == triton.next_power_of_2(q.shape[-1])
          and cos.shape[0] in (1, q.shape[0]) and cos.shape[1] == q.shape[2] == k.shape[2]
          and q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1)
    if not ok:
        return fused.rope(q, k, cos, sin, unsqueeze_dim)
    return _rope_one(q, cos, sin), _rope_one(k, cos, sin)


@triton.jit
def _silu_mul_kernel(G, U, Y, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    g = tl.load(G + i, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + i, mask=m, other=0.0)
    s = _rounded(tl.math.div_rn(g, 1.0 + libdevice.exp(-g)), U.dtype.element_ty)  # silu, rounded as eager
    tl.store(Y + i, (s * u.to(tl.float32)).to(Y.dtype.element_ty), mask=m)


def silu_mul(gate, up):
    if (not gate.is_cuda or gate.dtype not in (torch.bfloat16, torch.float16) or up.dtype != gate.dtype
            or gate.shape != up.shape or not gate.is_contiguous() or not up.is_contiguous()):
        return fused.silu_mul(gate, up)
    y = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _silu_mul_kernel[(triton.cdiv(n, 2048),)](gate, up, y, n, BLOCK=2048, num_warps=4)
    return y
