"""Pure-PyTorch reference of HISA attention: the specification the fast kernels must match.

Shapes (transformers' convention):
    q       [B, Hq,  Lq, D]   queries (post-RoPE)
    k, v    [B, Hkv, Lk, D]   all cached keys/values, the Lq newest of which belong to the queries
    pooled  [B, Hkv, NB, D]   mean of the keys of each block of ``block_size`` tokens (NB >= ceil(Lk / bs))

Query ``i`` sits at key index ``q_start + i`` (default ``q_start = Lk - Lq``) and may only see keys at
indices ``<= q_start + i`` (causality), further restricted by an optional ``mask``.

For each query and KV-head group (or each head, with ``selection="head"``):
  stage 1  score the causally visible blocks with q·pooled_key, keep the ``top_blocks`` best; the first
           block (attention sink) and the query's own block are always kept;
  stage 2  score every visible token of the kept blocks with q·k, keep the ``top_k`` best;
  then     exact softmax attention over the kept tokens.

With ``selection="group"`` the scores of the query heads of a GQA group are summed before ranking, so the
heads of a group share one selection (and one gather of K/V rows); each head still attends with its own q·k.

Queries are processed in chunks so memory stays O(chunk x Lk), never O(Lq x Lk).
"""

from __future__ import annotations

import math

import torch

from .config import HisaConfig

_NEG = float("-inf")


def pool_keys(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of the keys of every block of ``block_size`` tokens, the last block possibly partial.

    k: [B, H, L, D] -> [B, H, ceil(L / block_size), D] in float32.
    """
    B, H, L, D = k.shape
    nb = math.ceil(L / block_size)
    if nb == 0:
        return k.new_zeros(B, H, 0, D, dtype=torch.float32)
    pad = nb * block_size - L
    kf = k.float()
    if pad:
        kf = torch.cat([kf, kf.new_zeros(B, H, pad, D)], dim=2)
    sums = kf.view(B, H, nb, block_size, D).sum(dim=3)
    counts = torch.full((nb,), float(block_size), device=k.device)
    counts[-1] = block_size - pad
    return sums / counts[:, None]


def mask_to_bool(mask: torch.Tensor | None) -> torch.Tensor | None:
    """transformers passes either a boolean mask (True = may attend) or an additive float mask."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _chunk_size(batch: int, heads: int, keys: int, budget_bytes: int = 256 << 20) -> int:
    # a few float32 tensors of [B, H, chunk, keys] are alive at once
    return max(1, budget_bytes // max(1, batch * heads * keys * 4 * 4))


def hisa_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pooled: torch.Tensor,
    config: HisaConfig,
    *,
    scale: float | None = None,
    q_start: int | None = None,
    mask: torch.Tensor | None = None,
    query_chunk: int | None = None,
    return_selection: bool = False,
):
    """HISA attention, computed plainly. Returns ``out`` [B, Hq, Lq, D] in q's dtype, and with
    ``return_selection`` also the boolean keep mask [B, Hq, Lq, Lk] (small inputs only)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    G = Hq // Hkv
    bs = config.block_size
    scale = D**-0.5 if scale is None else scale
    q_start = Lk - Lq if q_start is None else q_start
    if q_start < 0 or q_start + Lq > Lk:
        raise ValueError(f"queries at [{q_start}, {q_start + Lq}) do not fit in {Lk} keys")
    if pooled.shape[2] < math.ceil(Lk / bs):
        raise ValueError(f"pooled keys cover {pooled.shape[2]} blocks, {math.ceil(Lk / bs)} needed")
    mask = mask_to_bool(mask)
    group = config.selection == "group"
    dev = q.device

    out = torch.empty(B, Hq, Lq, D, dtype=q.dtype, device=dev)
    keep_all = torch.zeros(B, Hq, Lq, Lk, dtype=torch.bool, device=dev) if return_selection else None
    qf = q.float().view(B, Hkv, G, Lq, D)
    chunk = query_chunk or _chunk_size(B, Hq, Lk)

    for c0 in range(0, Lq, chunk):
        c1 = min(Lq, c0 + chunk)
        pos = torch.arange(q_start + c0, q_start + c1, device=dev)  # key index of each query
        T = q_start + c1  # keys visible to the last query of the chunk
        nb = math.ceil(T / bs)
        qc = qf[:, :, :, c0:c1]  # [B, Hkv, G, C, D]
        kc, vc = k[:, :, :T].float(), v[:, :, :T].float()

        # stage 1: blocks
        bscore = torch.einsum("bhgcd,bhnd->bhgcn", qc, pooled[:, :, :nb].float())
        if group:
            bscore = bscore.sum(dim=2, keepdim=True)
        blk = torch.arange(nb, device=dev)
        visible_blk = blk[None, :] * bs <= pos[:, None]  # [C, nb]
        forced = (blk[None, :] == 0) | (blk[None, :] == (pos // bs)[:, None])
        bscore = bscore.masked_fill(~visible_blk, _NEG).masked_fill(forced, float("inf"))
        top = bscore.topk(min(config.top_blocks, nb), dim=-1).indices
        keep_blk = torch.zeros_like(bscore, dtype=torch.bool).scatter_(-1, top, True) & visible_blk

        # stage 2: tokens inside the kept blocks
        scores = torch.einsum("bhgcd,bhtd->bhgct", qc, kc) * scale  # [B, Hkv, G, C, T]
        tok = torch.arange(T, device=dev)
        valid = tok[None, :] <= pos[:, None]  # causal, [C, T]
        if mask is not None:
            m = mask[:, :, c0:c1, :T]  # [B, 1|Hq, C, T]
            m = m.view(B, Hkv, G, c1 - c0, T) if m.shape[1] == Hq else m[:, :, None]
            valid = valid & m
        cand = keep_blk[..., tok // bs] & valid
        sel = scores.sum(dim=2, keepdim=True) if group else scores
        sel = sel.masked_fill(~cand, _NEG)
        top = sel.topk(min(config.top_k, T), dim=-1).indices
        keep = torch.zeros_like(sel, dtype=torch.bool).scatter_(-1, top, True) & cand
        keep = keep.expand(B, Hkv, G, c1 - c0, T)

        # exact softmax over the kept tokens; a query with nothing to attend (fully padded) gets zeros
        probs = torch.softmax(scores.masked_fill(~keep, _NEG), dim=-1).nan_to_num(0.0)
        o = torch.einsum("bhgct,bhtd->bhgcd", probs, vc)
        out[:, :, c0:c1] = o.reshape(B, Hq, c1 - c0, D).to(q.dtype)
        if keep_all is not None:
            keep_all[:, :, c0:c1, :T] = keep.reshape(B, Hq, c1 - c0, T)

    return (out, keep_all) if return_selection else out


def dense_attention_reference(q, k, v, *, scale=None, q_start=None, mask=None):
    """Plain causal softmax attention with the same conventions (for tests and benchmarks)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    q_start = Lk - Lq if q_start is None else q_start
    kf = k.float().repeat_interleave(G, dim=1)
    vf = v.float().repeat_interleave(G, dim=1)
    s = torch.einsum("bhcd,bhtd->bhct", q.float(), kf) * scale
    pos = torch.arange(q_start, q_start + Lq, device=q.device)
    valid = torch.arange(Lk, device=q.device)[None, :] <= pos[:, None]
    mask = mask_to_bool(mask)
    if mask is not None:
        valid = valid & mask
    p = torch.softmax(s.masked_fill(~valid, _NEG), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhct,bhtd->bhcd", p, vf).to(q.dtype)
