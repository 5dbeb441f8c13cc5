"""Dispatch of the HISA attention computation: fast kernels where they exist, the reference elsewhere.

This is the seam where GPU kernels plug in. Everything here takes and returns transformers' layout
(q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], pooled [B, Hkv, NB, D]) and returns [B, Hq, Lq, D].

Backends (env ``HISA_BACKEND``):
  auto            Triton kernels on CUDA when available, else the reference (default)
  triton          the Triton kernels (error if unavailable)
  reference       the per-query pure-PyTorch reference (the specification)
  reference_tiled the pure-PyTorch specification of the kernels' tile-shared prefill semantics (so that
                  quality measured without a GPU reflects what the prefill kernel computes)

On the Triton backend, calls whose key length is below a measured crossover run dense SDPA instead
(HISA is never slower than dense there); ``HISA_DENSE_BELOW`` (prefill) and ``HISA_DENSE_BELOW_DECODE``
override the crossovers, 0 disables them.
"""

from __future__ import annotations

import os

import torch

from .config import HisaConfig
from .reference import dense_attention_reference, hisa_attention_reference, mask_to_bool

_BACKEND_ENV = "HISA_BACKEND"
BACKENDS = ("auto", "reference", "reference_tiled", "triton")

# Key lengths below which dense SDPA beats the kernels, measured with bench/attention.py on an H100
# (docs/benchmarks.md), by head dim (<= 64, > 64). Prefill = more than EXACT_MAX_QUERIES queries in the
# call, decode = fewer. Decode is compared eagerly (as transformers runs it): the HISA decode path costs
# ~0.13-0.25 ms of launch overhead, which SDPA's flash decode only exceeds at very long contexts.
DENSE_BELOW_PREFILL = {64: 12288, 128: 16384}
DENSE_BELOW_DECODE = {64: 163840, 128: 131072}
# The same for decode steps replayed in a CUDA graph (hisa.graph.DecodeStep, ``decode_static``), HISA's
# three-launch selection pipeline against the dense split-K kernel (``HISA_DENSE_BELOW_STATIC``). Measured
# inside a whole model's decode step (bench/e2e.py, 1B-shaped model, H200), where the weights streaming
# through L2 between layers leave the selection kernels' inputs in HBM: 2.32 ms/token sparse vs 2.54 dense at
# 128k, 2.27 vs 2.00 at 64k (head dim 64); in one layer alone HISA wins from ~48k (head dim 128) / ~96k (64).
DENSE_BELOW_STATIC = {64: 98304, 128: 65536}


def _triton_backend():
    try:
        from . import kernels  # noqa: PLC0415 - optional, needs triton + CUDA
    except ImportError:
        return None
    return kernels if getattr(kernels, "AVAILABLE", False) else None


def _choice() -> str:
    choice = os.environ.get(_BACKEND_ENV, "auto")
    if choice not in BACKENDS:
        raise ValueError(f"{_BACKEND_ENV} must be one of {BACKENDS}, got {choice!r}")
    return choice


def backend_for(q: torch.Tensor) -> str:
    choice = _choice()
    if choice in ("reference", "reference_tiled"):
        return choice
    if not q.is_cuda:
        if choice == "triton":
            raise RuntimeError("HISA_BACKEND=triton needs CUDA tensors")
        return "reference"
    if _triton_backend() is not None:
        return "triton"
    if choice == "triton":
        raise RuntimeError("HISA_BACKEND=triton but the Triton kernels are not available")
    return "reference"


def dense_crossover(q_len: int, head_dim: int = 64, *, static: bool = False) -> int:
    """Key length below which the Triton backend runs dense attention for a call with ``q_len`` queries
    (``static``: a decode step recorded in a CUDA graph, :func:`decode_static`)."""
    from .kernels import EXACT_MAX_QUERIES  # noqa: PLC0415

    col = 64 if head_dim <= 64 else 128
    if static:
        return int(os.environ.get("HISA_DENSE_BELOW_STATIC", DENSE_BELOW_STATIC[col]))
    if q_len <= EXACT_MAX_QUERIES:
        return int(os.environ.get("HISA_DENSE_BELOW_DECODE", DENSE_BELOW_DECODE[col]))
    return int(os.environ.get("HISA_DENSE_BELOW", DENSE_BELOW_PREFILL[col]))


def static_prefers_dense(q: torch.Tensor, kv_len: int) -> bool:
    """:func:`kernels_prefer_dense` for graph-captured decode steps (:func:`decode_static`)."""
    return backend_for(q) == "triton" and kv_len < dense_crossover(q.shape[2], q.shape[3], static=True)


def kernels_prefer_dense(q: torch.Tensor, kv_len: int) -> bool:
    """Whether a call with these queries over ``kv_len`` keys runs dense SDPA on the Triton backend
    because it is below the measured crossover (the one place this decision is made)."""
    return backend_for(q) == "triton" and kv_len < dense_crossover(q.shape[2], q.shape[3])


_NO_CUDNN = None


def _decode_backends():
    global _NO_CUDNN
    if _NO_CUDNN is None:
        from torch.nn.attention import SDPBackend  # noqa: PLC0415

        _NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return _NO_CUDNN


def sdpa_dense(q, k, v, *, scale=None, mask=None) -> torch.Tensor:
    """Causal dense attention through SDPA (bottom-right aligned causality, optional mask).

    On CUDA the cuDNN backend is excluded: it builds and caches an execution plan per sequence length, which
    on an H200 with torch 2.11 cost ~35 ms per new prompt length and ~2 MB of host memory that is never given
    back (a server sees a new length with nearly every request; 200 lengths grew the process by 340-540 MB),
    and ~2 ms per layer and step in decode, where the key length grows every step. Flash / memory-efficient
    attention take GQA natively for plain causal calls, including chunks after cached keys (lower-right
    causal bias); calls with an explicit (padding) mask get K/V expanded to every query head so that
    memory-efficient attention qualifies (a math fallback would materialise Lq x Lk scores)."""
    from torch.nn.attention import sdpa_kernel  # noqa: PLC0415

    from .kernels import EXACT_MAX_QUERIES  # noqa: PLC0415

    Lq, Lk = q.shape[2], k.shape[2]
    mask = mask_to_bool(mask)
    kw = {"scale": scale, "enable_gqa": q.shape[1] != k.shape[1]}
    if not q.is_cuda:
        return _sdpa(q, k, v, mask, kw)
    with sdpa_kernel(_decode_backends()):
        if mask is None and 1 < Lq < Lk:
            # a chunk after cached keys (a follow-up question, a later prefill chunk): bottom-right aligned
            # causality as a CausalBias, which flash / memory-efficient attention implement without a mask
            out = _sdpa_lower_right(q, k, v, kw)
            if out is not None:
                return out
        if Lq > EXACT_MAX_QUERIES and kw["enable_gqa"] and (mask is not None or Lq not in (1, Lk)):
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            kw["enable_gqa"] = False
        return _sdpa(q, k, v, mask, kw)


_LOWER_RIGHT_OK = [True]


def _sdpa_lower_right(q, k, v, kw):
    """SDPA with a lower-right causal bias, or None where this torch cannot run it (then an explicit mask)."""
    if not _LOWER_RIGHT_OK[0]:
        return None
    from torch.nn.attention.bias import causal_lower_right  # noqa: PLC0415

    try:
        bias = causal_lower_right(q.shape[2], k.shape[2])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, **kw)
    except (RuntimeError, TypeError, NotImplementedError, ValueError):
        _LOWER_RIGHT_OK[0] = False
        return None


def _sdpa(q, k, v, mask, kw):
    Lq, Lk = q.shape[2], k.shape[2]
    if mask is None and (Lq == Lk or Lq == 1):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=Lq == Lk and Lq > 1, **kw)
    causal = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)
    attn_mask = causal if mask is None else (mask & causal)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kw)


def hisa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pooled: torch.Tensor,
    config: HisaConfig,
    *,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    if kernels_prefer_dense(q, k.shape[2]):
        return sdpa_dense(q, k, v, scale=scale, mask=mask)
    backend = backend_for(q)
    if backend == "triton":
        return _triton_backend().hisa_attention(q, k, v, pooled, config, scale=scale, mask=mask)
    if backend == "reference_tiled":
        from .kernels import EXACT_MAX_QUERIES  # noqa: PLC0415
        from .kernels.reference_tiled import hisa_attention_tiled_reference  # noqa: PLC0415

        if q.shape[2] > EXACT_MAX_QUERIES:  # the kernels use per-query selection for short chunks
            return hisa_attention_tiled_reference(q, k, v, pooled, config, scale=scale, mask=mask)
    return hisa_attention_reference(q, k, v, pooled, config, scale=scale, mask=mask)


def decode_static(q, k, v, pooled, length, config: HisaConfig, *, scale=None, sparse: bool = True):
    """Attention of Lq new queries at positions length[1] .. length[1] + Lq - 1 over full-capacity K/V buffers
    [B, Hkv, cap, D]; ``length`` is a two-element int tensor on q's device: [key length the pooled keys
    cover, position of the first query] (a decode step: [n, n - 1]). ``sparse`` (Lq = 1): HISA over the
    first length[0] keys; else dense causal attention.

    On the Triton backend nothing depends on the positions on the host, so a CUDA graph can capture the call
    once and replay it as the cache grows. Elsewhere the positions are read back and the reference runs on
    the live prefix (same results, no graph)."""
    if backend_for(q) == "triton":
        return _triton_backend().decode_static(q, k, v, pooled, length, config, scale=scale, sparse=sparse)
    n, start = (int(x) for x in length.reshape(-1)[:2].tolist())
    if sparse:
        nb = -(-n // config.block_size)
        return hisa_attention_reference(q, k[:, :, :n], v[:, :, :n], pooled[:, :, :nb], config, scale=scale)
    end = start + q.shape[2]
    return dense_attention_reference(q, k[:, :, :end], v[:, :, :end], scale=scale).to(q.dtype)


def append_static(k_cache, v_cache, psum, pooled, k_new, v_new, length, block_size: int) -> None:
    """Write the T new tokens per sequence (k_new [B, H, T, D]) at positions length[1] .. length[1] + T - 1 of a
    cache's buffers and refresh the pooled keys of the blocks holding real tokens, which end at length[0]
    (later rows are padding of a fixed-size chunk); graph-capturable on the Triton backend (see
    :func:`decode_static`)."""
    if k_new.is_cuda and _triton_backend() is not None:
        from .kernels.pool import append_token  # noqa: PLC0415

        append_token(k_cache, v_cache, psum, pooled, k_new, v_new, length, block_size)
        return
    end, start = (int(x) for x in length.reshape(-1)[:2].tolist())
    t = k_new.shape[2]
    k_cache[:, :, start : start + t] = k_new
    v_cache[:, :, start : start + t] = v_new
    for b in range(start // block_size, (end - 1) // block_size + 1):
        s = k_cache[:, :, b * block_size : min(end, (b + 1) * block_size)].float().sum(dim=2)
        psum[:, :, b] = s
        pooled[:, :, b] = s / (min(end, (b + 1) * block_size) - b * block_size)


def warmup(config: HisaConfig, *, num_heads: int, num_kv_heads: int, head_dim: int, max_len: int,
           dtype=torch.bfloat16, device="cuda") -> list[int]:
    """Compile the kernels ahead of time for every key length bucket up to ``max_len``.

    Triton specialises some block sizes on the number of pooled blocks (rounded up to a power of two), so
    the first call in each bucket compiles for a second or so. A server calls this at start-up so that no
    user request pays for it. Runs one small prefill chunk, a decode step where the decode kernels run and
    the graph-recordable decode kernels on synthetic data per bucket; returns the key lengths used. A no-op without the kernels.
    """
    if not torch.device(device).type == "cuda" or _triton_backend() is None:
        return []
    from .kernels import EXACT_MAX_QUERIES  # noqa: PLC0415
    from .reference import pool_keys  # noqa: PLC0415

    lengths = []
    n = max(config.block_size * 2, dense_crossover(EXACT_MAX_QUERIES + 1, head_dim))
    while n < max_len:
        lengths.append(n)
        n *= 2
    lengths.append(max_len)
    g = torch.Generator(device=device).manual_seed(0)
    from .graph import CHUNK  # noqa: PLC0415

    # short caches: the recorded steps' dense attention splits a cache of fewer than ~2k keys into fewer
    # pieces (another compiled variant per power of two)
    for cap in (128, 256, 512, 1024, 2048, 4096):
        if cap > max_len:
            break
        k = torch.randn(1, num_kv_heads, cap, head_dim, device=device, dtype=dtype, generator=g)
        pooled = pool_keys(k, config.block_size)
        for width in (1, CHUNK):
            q = torch.randn(1, num_heads, width, head_dim, device=device, dtype=dtype, generator=g)
            length = torch.tensor([cap, cap - width], dtype=torch.int32, device=device)
            _triton_backend().decode_static(q, k, k, pooled, length, config, scale=head_dim**-0.5, sparse=False)
    for L in lengths:
        if L <= config.top_k:
            continue
        k = torch.randn(1, num_kv_heads, L, head_dim, device=device, dtype=dtype, generator=g)
        v = torch.randn_like(k)
        pooled = pool_keys(k, config.block_size)
        for q_len in (min(L, 4 * config.block_size), 1):
            if L < dense_crossover(q_len, head_dim):
                continue
            q = torch.randn(1, num_heads, q_len, head_dim, device=device, dtype=dtype, generator=g)
            _triton_backend().hisa_attention(q, k, v, pooled, config, scale=head_dim**-0.5)
        # the graph-recorded decode kernels (hisa.graph.DecodeStep), sized by the cache capacity
        q = torch.randn(1, num_heads, 1, head_dim, device=device, dtype=dtype, generator=g)
        length = torch.tensor([L, L - 1], dtype=torch.int32, device=device)
        for sparse in (False, True):
            if not sparse or not static_prefers_dense(q, L):
                _triton_backend().decode_static(q, k, v, pooled, length, config, scale=head_dim**-0.5, sparse=sparse)
        # and the recorded follow-up (chunk) step's dense attention
        q = torch.randn(1, num_heads, CHUNK, head_dim, device=device, dtype=dtype, generator=g)
        length = torch.tensor([L, L - CHUNK], dtype=torch.int32, device=device)
        _triton_backend().decode_static(q, k, v, pooled, length, config, scale=head_dim**-0.5, sparse=False)
        del k, v, pooled
    torch.cuda.synchronize(device)
    return lengths
