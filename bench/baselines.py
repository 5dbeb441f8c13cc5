"""Same-budget baselines for bench/quality.py, as keep-masks plus exact softmax (plain PyTorch).

- ``block-only``: stage 1 alone. Keep the ``top_k // block_size`` best blocks by q·pooled key (the sink
  block and the query's own block always kept, group-shared scores as HISA's default), every visible
  token of them attended: the same token budget as HISA, without the token-level refinement.
- ``sinks-local``: the first block (attention sink) plus the most recent ``top_k - block_size`` tokens
  (StreamingLLM-style): the same budget, no content-based selection at all.

They replace ``hisa.attention.hisa_attention`` (the dispatch seam) while active, so everything else —
when HISA engages, the dense layers, the model code — stays exactly as for HISA itself.
"""

from __future__ import annotations

import contextlib
import math

import torch

import hisa.attention as hisa_attention_module
from hisa import HisaConfig
from hisa.reference import mask_to_bool

BASELINES = ("block-only", "sinks-local")


def _block_only_keep(qc, pooled, pos, T, cfg: HisaConfig):
    """Keep-mask [B, Hkv, 1, C, T] of the block-only baseline for the queries ``qc`` [B, Hkv, G, C, D]."""
    bs = cfg.block_size
    nb = math.ceil(T / bs)
    n_keep = max(2, cfg.top_k // bs)
    bscore = torch.einsum("bhgcd,bhnd->bhcn", qc, pooled[:, :, :nb].float())  # summed over the group
    blk = torch.arange(nb, device=qc.device)
    visible = blk[None, :] * bs <= pos[:, None]
    forced = (blk[None, :] == 0) | (blk[None, :] == (pos // bs)[:, None])
    bscore = bscore.masked_fill(~visible, float("-inf")).masked_fill(forced, float("inf"))
    top = bscore.topk(min(n_keep, nb), dim=-1).indices
    keep_blk = torch.zeros_like(bscore, dtype=torch.bool).scatter_(-1, top, True) & visible
    tok = torch.arange(T, device=qc.device)
    return keep_blk[..., tok // bs][:, :, None]


def _sinks_local_keep(qc, pooled, pos, T, cfg: HisaConfig):
    """Keep-mask [C, T]: the sink block plus the ``top_k - block_size`` most recent tokens."""
    tok = torch.arange(T, device=qc.device)
    local = max(1, cfg.top_k - cfg.block_size)
    return (tok[None, :] < cfg.block_size) | (tok[None, :] > pos[:, None] - local)


KEEP_FNS = {"block-only": _block_only_keep, "sinks-local": _sinks_local_keep}


def masked_attention(q, k, v, pooled, cfg: HisaConfig, keep_fn, *, scale=None, mask=None, chunk: int = 256):
    """Exact softmax attention over the tokens ``keep_fn`` keeps (and causality allows), query chunk by
    query chunk. Same layout and conventions as ``hisa.hisa_attention_reference``."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    q_start = Lk - Lq
    mask = mask_to_bool(mask)
    out = torch.empty(B, Hq, Lq, D, dtype=q.dtype, device=q.device)
    qf = q.float().view(B, Hkv, G, Lq, D)
    for c0 in range(0, Lq, chunk):
        c1 = min(Lq, c0 + chunk)
        pos = torch.arange(q_start + c0, q_start + c1, device=q.device)
        T = q_start + c1
        qc = qf[:, :, :, c0:c1]
        s = torch.einsum("bhgcd,bhtd->bhgct", qc, k[:, :, :T].float()) * scale
        keep = keep_fn(qc, pooled, pos, T, cfg) & (torch.arange(T, device=q.device)[None, :] <= pos[:, None])
        if mask is not None:
            m = mask[:, :, c0:c1, :T]
            keep = keep & (m.view(B, Hkv, G, c1 - c0, T) if m.shape[1] == Hq else m[:, :, None])
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)
        o = torch.einsum("bhgct,bhtd->bhgcd", p, v[:, :, :T].float())
        out[:, :, c0:c1] = o.reshape(B, Hq, c1 - c0, D).to(q.dtype)
    return out


@contextlib.contextmanager
def use_baseline(name: str):
    """Inside this block, HISA-patched models run baseline ``name`` wherever they would run HISA."""
    if name not in KEEP_FNS:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    keep_fn = KEEP_FNS[name]
    original = hisa_attention_module.hisa_attention

    def attention(q, k, v, pooled, config, *, scale=None, mask=None):
        return masked_attention(q, k, v, pooled, config, keep_fn, scale=scale, mask=mask)

    hisa_attention_module.hisa_attention = attention
    try:
        yield
    finally:
        hisa_attention_module.hisa_attention = original


def self_check() -> None:
    """Cheap consistency checks of the baseline code path against the HISA reference (run at start)."""
    from hisa import dense_attention_reference, hisa_attention_reference, pool_keys  # noqa: PLC0415

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 200, 16, generator=g) for h in (4, 2, 2))
    pooled = pool_keys(k, 16)
    # a budget covering the whole context: both baselines are dense attention
    big = HisaConfig(block_size=16, top_blocks=16, top_k=256, min_context=0)
    dense = dense_attention_reference(q, k, v)
    for name, fn in KEEP_FNS.items():
        got = masked_attention(q, k, v, pooled, big, fn, chunk=64)
        assert torch.allclose(got, dense, atol=1e-5), f"{name} with a full budget differs from dense"
    # HISA keeping every token of its kept blocks (top_k = top_blocks * block_size) is block-only
    cfg = HisaConfig(block_size=16, top_blocks=4, top_k=64, min_context=0)
    ref = hisa_attention_reference(q, k, v, pooled, cfg)
    got = masked_attention(q, k, v, pooled, cfg, _block_only_keep, chunk=64)
    assert torch.allclose(got, ref, atol=1e-5), "block-only differs from HISA with top_k = top_blocks * block_size"
