"""Pure-PyTorch specification of the tile-shared prefill semantics that ``tiled.py`` implements.

Differences from the per-query reference (``hisa.reference.hisa_attention_reference``):

* Stage 1 is shared by a *tile*: the queries whose positions fall in one key block ``t``. The tile's
  block scores are (sum of its queries over the unit's heads) . pooled key, over the blocks 0..t that
  its last query can see; the sink and block ``t`` are always kept, the ``top_blocks`` best are kept.
  (Per query, the reference sums only over the unit's heads, and ranks blocks per query.)
* There is no stage-2 token pruning: every query attends to all causally visible, mask-allowed tokens of
  its tile's kept blocks, i.e. up to ``top_blocks * block_size`` tokens instead of ``top_k``.

A tile's selection depends only on its own queries, so results for a suffix of queries that starts on
a block boundary do not depend on the queries before it (benchmarks check long contexts that way).
When the visible context fits in ``top_blocks`` blocks this is exactly dense causal attention.
"""

from __future__ import annotations

import math

import torch

from ..reference import mask_to_bool

_NEG = float("-inf")


def hisa_attention_tiled_reference(q, k, v, pooled, config, *, scale=None, q_start=None, mask=None,
                                   query_chunk: int = 256, return_selection: bool = False):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bs = config.block_size
    SG = G if config.selection == "group" else 1
    NSEL = Hq // SG
    scale = D**-0.5 if scale is None else scale
    q_start = Lk - Lq if q_start is None else q_start
    mask = mask_to_bool(mask)
    dev = q.device
    NB = math.ceil(Lk / bs)
    t_first = q_start // bs
    pos = torch.arange(q_start, q_start + Lq, device=dev)
    tile = pos // bs - t_first
    NT = int(tile[-1]) + 1

    qs = q.float().reshape(B, NSEL, SG, Lq, D).sum(2)
    sums = torch.zeros(B, NSEL, NT, D, device=dev).index_add_(2, tile, qs)
    pk = pooled[:, :, :NB].float()
    bscore = torch.einsum("bhsd,bhnd->bhsn", sums.view(B, Hkv, (NSEL // Hkv) * NT, D), pk).view(B, NSEL, NT, NB)
    t_abs = torch.arange(t_first, t_first + NT, device=dev)
    blk = torch.arange(NB, device=dev)
    visible = blk[None, :] <= t_abs[:, None]
    forced = (blk[None, :] == 0) | (blk[None, :] == t_abs[:, None])
    bscore = bscore.masked_fill(~visible, _NEG).masked_fill(forced, float("inf"))
    top = bscore.topk(min(config.top_blocks, NB), dim=-1).indices
    keep_blk = torch.zeros_like(bscore, dtype=torch.bool).scatter_(-1, top, True) & visible  # [B,NSEL,NT,NB]

    out = torch.empty(B, Hq, Lq, D, dtype=q.dtype, device=dev)
    keep_all = torch.zeros(B, Hq, Lq, Lk, dtype=torch.bool, device=dev) if return_selection else None
    kf = k.float().repeat_interleave(G, dim=1)
    vf = v.float().repeat_interleave(G, dim=1)
    tok = torch.arange(Lk, device=dev)
    for c0 in range(0, Lq, query_chunk):
        c1 = min(Lq, c0 + query_chunk)
        kb = keep_blk[:, :, tile[c0:c1]]  # [B, NSEL, C, NB]
        keep = kb[..., tok // bs].repeat_interleave(SG, dim=1)  # [B, Hq, C, Lk]
        keep = keep & (tok[None, :] <= pos[c0:c1, None])
        if mask is not None:
            keep = keep & mask[:, :, c0:c1]
        s = torch.einsum("bhcd,bhtd->bhct", q[:, :, c0:c1].float(), kf) * scale
        p = torch.softmax(s.masked_fill(~keep, _NEG), dim=-1).nan_to_num(0.0)
        out[:, :, c0:c1] = torch.einsum("bhct,bhtd->bhcd", p, vf).to(q.dtype)
        if keep_all is not None:
            keep_all[:, :, c0:c1] = keep
    return (out, keep_all) if return_selection else out
