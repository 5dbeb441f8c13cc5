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
    """float32 x rounded (to nearest even) to the precision of DT (bf16 or fp16), as a float32: the hardware
    conversion (``cvt.rn``) in inline assembly, which the compiler cannot fold away the way it may fold a plain
    conversion to DT and back (skipping the rounding the eager code does between two operations). The same
    rounding as PyTorch's conversion, fp16 subnormals and overflow included. bf16: two values per instruction
    (sm_80+, as bf16 itself); fp16: one (every GPU Triton supports)."""
    if DT == tl.bfloat16:
        y = tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,f,f", [x], dtype=tl.bfloat16,
                                      is_pure=True, pack=2)
    else:
        y = tl.inline_asm_elementwise("cvt.rn.f16.f32 $0, $1;", "=h,f", [x], dtype=tl.float16,
                                      is_pure=True, pack=1)
    return y.to(tl.float32)


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


@triton.jit
def _rope_heads(X, Y, b, pos, sxb, sxh, sxl, syb, syh, syl, H, c1, c2, s1, s2, ok, D: tl.constexpr,
                HP: tl.constexpr):
    """Rotary embedding of one token's H heads (rows of D): x * cos + rotate_half(x) * sin, rounded as the
    eager code rounds (after each product and after the sum). Each row is read and written as its two halves
    (contiguous loads; rotate_half(x) = [-x2, x1]); c1/c2, s1/s2 are the halves of cos and sin."""
    half: tl.constexpr = D // 2
    h = tl.arange(0, HP)
    e = tl.arange(0, half)[None, :]
    m = (h[:, None] < H) & ok
    xb = X + b * sxb + pos * sxl + h[:, None].to(tl.int64) * sxh
    x1 = tl.load(xb + e, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(xb + half + e, mask=m, other=0.0).to(tl.float32)
    dt = X.dtype.element_ty
    y1 = _rounded(_rounded(x1 * c1[None, :], dt) + _rounded(-x2 * s1[None, :], dt), dt)
    y2 = _rounded(_rounded(x2 * c2[None, :], dt) + _rounded(x1 * s2[None, :], dt), dt)
    yb = Y + b * syb + pos * syl + h[:, None].to(tl.int64) * syh
    tl.store(yb + e, y1.to(dt), mask=m)
    tl.store(yb + half + e, y2.to(dt), mask=m)


@triton.jit(do_not_specialize=["L", "NTOK"])  # any prompt length, one compiled kernel
def _rope_kernel(Q, K, C, S, YQ, YK, L, NTOK, HQ, HK,
                 sqb, sqh, sql, skb, skh, skl, syqb, syqh, syql, sykb, sykh, sykl, scb, scl, ssb, ssl,
                 D: tl.constexpr, HQP: tl.constexpr, HKP: tl.constexpr, TOK: tl.constexpr):
    """TOK consecutive tokens (of B x L) per program, the queries' and the keys' heads of each."""
    half: tl.constexpr = D // 2
    e = tl.arange(0, half)
    for t in tl.static_range(TOK):
        bl = tl.program_id(0) * TOK + t
        ok = bl < NTOK
        b = (bl // L).to(tl.int64)
        pos = (bl % L).to(tl.int64)
        cb = C + b * scb + pos * scl
        sb = S + b * ssb + pos * ssl
        c1 = tl.load(cb + e, mask=ok, other=0.0).to(tl.float32)
        c2 = tl.load(cb + half + e, mask=ok, other=0.0).to(tl.float32)
        s1 = tl.load(sb + e, mask=ok, other=0.0).to(tl.float32)
        s2 = tl.load(sb + half + e, mask=ok, other=0.0).to(tl.float32)
        _rope_heads(Q, YQ, b, pos, sqb, sqh, sql, syqb, syqh, syql, HQ, c1, c2, s1, s2, ok, D, HQP)
        _rope_heads(K, YK, b, pos, skb, skh, skl, sykb, sykh, sykl, HK, c1, c2, s1, s2, ok, D, HKP)


ROPE_TOKENS = 4  # tokens per program (H200, 128k tokens, 32 + 8 heads of 64: 0.45 ms vs 0.56 for one token
# per program in two launches, one for the queries and one for the keys)


def _rope_qk(q, k, cos, sin):
    B, HQ, L, D = q.shape
    HK = k.shape[1]
    yq, yk = torch.empty_like(q), torch.empty_like(k)
    ntok = B * L
    if ntok:
        cb = cos.stride(0) if cos.shape[0] > 1 else 0
        sb = sin.stride(0) if sin.shape[0] > 1 else 0
        hqp, hkp = triton.next_power_of_2(HQ), triton.next_power_of_2(HK)
        _rope_kernel[(triton.cdiv(ntok, ROPE_TOKENS),)](
            q, k, cos, sin, yq, yk, L, ntok, HQ, HK, *q.stride()[:3], *k.stride()[:3], *yq.stride()[:3],
            *yk.stride()[:3], cb, cos.stride(1), sb, sin.stride(1),
            D=D, HQP=hqp, HKP=hkp, TOK=ROPE_TOKENS, num_warps=4 if hqp * D <= 4096 else 8,
        )
    return yq, yk


def rope(q, k, cos, sin, unsqueeze_dim=1):
    ok = (q.is_cuda and unsqueeze_dim == 1 and q.dim() == 4 and k.dim() == 4 and cos.dim() == 3
          and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype == cos.dtype == sin.dtype
          and cos.shape == sin.shape and cos.shape[-1] == q.shape[-1] == k.shape[-1]
          and q.shape[-1] % 2 == 0 and q.shape[-1] == triton.next_power_of_2(q.shape[-1])
          and cos.shape[0] in (1, q.shape[0]) and k.shape[0] == q.shape[0]
          and cos.shape[1] == q.shape[2] == k.shape[2]
          and q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1)
    if not ok:
        return fused.rope(q, k, cos, sin, unsqueeze_dim)
    return _rope_qk(q, k, cos, sin)


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
