"""Triton kernels for HISA on CUDA GPUs.

``AVAILABLE``: Triton imports and a CUDA device is present. ``hisa_attention(q, k, v, pooled, config, *,
scale=None, mask=None)`` has the layout and contract of :func:`hisa.reference.hisa_attention_reference`.

Two paths (see docs/kernels.md):

* exact (``exact.py``): per-query selection, the reference's semantics. Used for decode and short
  query chunks (Lq <= ``EXACT_MAX_QUERIES``), and for every length with ``HISA_PREFILL=exact``.
* tiled (``tiled.py``): prefill; one stage-1 block selection per tile of ``block_size`` queries and
  dense tensor-core attention over the kept blocks. Its semantics are specified by
  ``reference_tiled.hisa_attention_tiled_reference``.

``pool.update_pooled`` maintains the pooled keys of a cache in one launch.
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton  # noqa: F401

    _HAVE_TRITON = True
except Exception:  # noqa: BLE001 - any import failure means "no kernels"
    _HAVE_TRITON = False

AVAILABLE = _HAVE_TRITON and torch.cuda.is_available()

EXACT_MAX_QUERIES = 16
_PREFILL_ENV = "HISA_PREFILL"  # "tile" (default) or "exact"


def prefill_mode() -> str:
    mode = os.environ.get(_PREFILL_ENV, "tile")
    if mode not in ("tile", "exact"):
        raise ValueError(f"{_PREFILL_ENV} must be 'tile' or 'exact', got {mode!r}")
    return mode


def path_for(q_len: int, config, head_dim: int) -> str:
    """'exact' or 'tile': which kernel path a call with ``q_len`` queries takes."""
    from .tiled import tile_supported  # noqa: PLC0415

    if q_len <= EXACT_MAX_QUERIES or prefill_mode() == "exact" or not tile_supported(config, head_dim):
        return "exact"
    return "tile"


def hisa_attention(q, k, v, pooled, config, *, scale=None, mask=None, q_start=None, path=None):
    """HISA attention with the Triton kernels; returns [B, Hq, Lq, D] in q's dtype.

    ``path``: force "exact" or "tile" (default: :func:`path_for`). Masks with one row per query head
    are handled by the reference (transformers builds [B, 1, Lq, Lk] masks)."""
    from ..reference import hisa_attention_reference, mask_to_bool  # noqa: PLC0415

    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    bs = config.block_size
    if pooled.shape[2] < math.ceil(Lk / bs):
        raise ValueError(f"pooled keys cover {pooled.shape[2]} blocks, {math.ceil(Lk / bs)} needed")
    q_start = Lk - Lq if q_start is None else q_start
    if q_start < 0 or q_start + Lq > Lk:
        raise ValueError(f"queries at [{q_start}, {q_start + Lq}) do not fit in {Lk} keys")
    scale = D**-0.5 if scale is None else float(scale)
    mask = mask_to_bool(mask)
    if mask is not None and mask.shape[1] != 1:
        return hisa_attention_reference(q, k, v, pooled, config, scale=scale, q_start=q_start, mask=mask)
    if Lq == 0:
        return q.new_empty(B, Hq, 0, D)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if v.dtype != k.dtype or q.dtype != k.dtype:
        v, k = v.to(q.dtype), k.to(q.dtype)
    pooled = pooled.float()
    if mask is not None:
        mask = mask.expand(B, 1, Lq, Lk).view(torch.uint8)
    # written as [B, Lq, Hq, D] so that the caller's transpose(1, 2).contiguous() is free
    out = torch.empty(B, Lq, Hq, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    path = path or path_for(Lq, config, D)
    if path == "tile":
        from .tiled import hisa_attention_tiled  # noqa: PLC0415

        return hisa_attention_tiled(q, k, v, pooled, config, scale=scale, q_start=q_start, mask=mask, out=out)
    from .exact import hisa_attention_exact  # noqa: PLC0415

    return hisa_attention_exact(q, k, v, pooled, config, scale=scale, q_start=q_start, mask=mask, out=out)


def decode_static(q, k, v, pooled, length, config, *, scale=None, sparse=True):
    """One decode query per sequence over full-capacity K/V buffers whose live length is ``length[0]``
    (a device tensor): nothing depends on the length on the host, so the call can be captured in a CUDA
    graph. Returns [B, Hq, 1, D] (see :func:`decode.hisa_decode_static`)."""
    from .decode import hisa_decode_static  # noqa: PLC0415

    B, Hq, Lq, D = q.shape
    if Hq % k.shape[1]:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]})")
    scale = D**-0.5 if scale is None else float(scale)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if v.dtype != k.dtype or q.dtype != k.dtype:
        raise ValueError("q, k and v must share a dtype")
    out = torch.empty(B, Lq, Hq, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    return hisa_decode_static(q, k, v, pooled, length, config, scale=scale, sparse=sparse, out=out)


__all__ = ["AVAILABLE", "EXACT_MAX_QUERIES", "decode_static", "hisa_attention", "path_for", "prefill_mode"]
