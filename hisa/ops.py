"""Dispatch of the HISA attention computation: fast kernels where they exist, the reference elsewhere.

This is the seam where GPU kernels plug in. Everything here takes and returns transformers' layout
(q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], pooled [B, Hkv, NB, D]) and returns [B, Hq, Lq, D].
"""

from __future__ import annotations

import os

import torch

from .config import HisaConfig
from .reference import hisa_attention_reference

_BACKEND_ENV = "HISA_BACKEND"  # "auto" (default), "reference" or "triton"


def _triton_backend():
    try:
        from . import kernels  # noqa: PLC0415 - optional, needs triton + CUDA
    except ImportError:
        return None
    return kernels if getattr(kernels, "AVAILABLE", False) else None


def backend_for(q: torch.Tensor) -> str:
    choice = os.environ.get(_BACKEND_ENV, "auto")
    if choice == "reference" or not q.is_cuda:
        return "reference"
    if _triton_backend() is not None:
        return "triton"
    if choice == "triton":
        raise RuntimeError("HISA_BACKEND=triton but the Triton kernels are not available")
    return "reference"


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
    if backend_for(q) == "triton":
        return _triton_backend().hisa_attention(q, k, v, pooled, config, scale=scale, mask=mask)
    return hisa_attention_reference(q, k, v, pooled, config, scale=scale, mask=mask)
