"""The pure-PyTorch reference: dense equivalence, causality, forced blocks, and a per-query brute force."""

import math

import pytest
import torch

from hisa import HisaConfig, dense_attention_reference, hisa_attention_reference, pool_keys


def _qkv(B=2, Hq=4, Hkv=2, Lq=37, Lk=37, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    return q, k, v


def _brute_force_keep(q, k, pooled, cfg, q_start):
    """Per-query, per-group loops written independently of the reference."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G, bs = Hq // Hkv, cfg.block_size
    keep = torch.zeros(B, Hq, Lq, Lk, dtype=torch.bool)
    for b in range(B):
        for h in range(Hkv):
            for i in range(Lq):
                p = q_start + i
                heads = range(h * G, (h + 1) * G)
                qs = [q[b, hq, i].double() for hq in heads]
                nvis = p // bs + 1
                bscores = {j: sum(float(x @ pooled[b, h, j].double()) for x in qs) for j in range(nvis)}
                forced = {0, p // bs}
                rest = sorted((j for j in range(nvis) if j not in forced), key=lambda j: -bscores[j])
                blocks = sorted(forced | set(rest[: max(0, cfg.top_blocks - len(forced))]))
                toks = [t for j in blocks for t in range(j * bs, min((j + 1) * bs, p + 1))]
                tscores = {t: sum(float(x @ k[b, h, t].double()) for x in qs) for t in toks}
                chosen = sorted(toks, key=lambda t: -tscores[t])[: cfg.top_k]
                for hq in heads:
                    keep[b, hq, i, chosen] = True
    return keep


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (7, 1), (8, 1)])
@pytest.mark.parametrize("Lq,Lk", [(37, 37), (1, 50), (5, 64), (64, 64)])
def test_equals_dense_when_context_fits_in_top_k(Hq, Hkv, Lq, Lk):
    q, k, v = _qkv(Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk)
    cfg = HisaConfig(block_size=8, top_blocks=8, top_k=64, min_context=0)
    out = hisa_attention_reference(q, k, v, pool_keys(k, 8), cfg, query_chunk=7)
    ref = dense_attention_reference(q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("selection", ["group", "head"])
def test_selection_matches_per_query_brute_force(selection):
    if selection == "head":
        q, k, v = _qkv(B=1, Hq=2, Hkv=2, Lq=40, Lk=53, D=8, seed=3)
    else:
        q, k, v = _qkv(B=2, Hq=4, Hkv=2, Lq=40, Lk=53, D=8, seed=3)
    cfg = HisaConfig(block_size=4, top_blocks=4, top_k=9, min_context=0, selection=selection)
    pooled = pool_keys(k, 4)
    out, keep = hisa_attention_reference(q, k, v, pooled, cfg, return_selection=True, query_chunk=16)
    expected = _brute_force_keep(q, k, pooled, cfg, q_start=53 - 40) if selection == "group" else None
    if expected is not None:
        assert torch.equal(keep, expected)
    # each query reads exactly min(visible, top_k) tokens
    visible = torch.arange(53 - 40, 53) + 1
    assert torch.equal(keep.sum(-1), visible.clamp(max=cfg.top_k).expand_as(keep.sum(-1)))
    # and the output is exact softmax attention over exactly those tokens
    torch.testing.assert_close(out, dense_attention_reference(q, k, v, mask=keep), rtol=1e-5, atol=1e-5)


def test_never_attends_to_future_tokens():
    q, k, v = _qkv(B=1, Hq=4, Hkv=2, Lq=100, Lk=100, seed=1)
    cfg = HisaConfig(block_size=8, top_blocks=4, top_k=16, min_context=0)
    _, keep = hisa_attention_reference(q, k, v, pool_keys(k, 8), cfg, return_selection=True)
    future = torch.ones(100, 100, dtype=torch.bool).triu(1)
    assert not keep[..., future].any()


def test_sink_and_local_blocks_always_attended():
    # make the sink block and everything near each query score terribly: they must still be kept
    bs, top_blocks = 8, 4
    q, k, v = _qkv(B=1, Hq=2, Hkv=1, Lq=96, Lk=96, D=16, seed=2)
    u = torch.zeros(16)
    u[0] = 1.0
    q = q + 4 * u  # every query points along u
    k = k - 4 * u  # every key points away from the queries...
    k[:, :, 40:48] += 8 * u  # ...but one attractive block in the middle
    cfg = HisaConfig(block_size=bs, top_blocks=top_blocks, top_k=top_blocks * bs, min_context=0)
    _, keep = hisa_attention_reference(q, k, v, pool_keys(k, bs), cfg, return_selection=True)
    for i in range(96):
        own = (i // bs) * bs
        assert keep[0, :, i, : min(bs, i + 1)].all(), f"sink block dropped for query {i}"
        assert keep[0, :, i, own : i + 1].all(), f"own block dropped for query {i}"
        if i >= 48:
            assert keep[0, :, i, 40:48].all()


def test_query_chunking_does_not_change_results():
    q, k, v = _qkv(B=2, Hq=4, Hkv=2, Lq=70, Lk=90, seed=4)
    cfg = HisaConfig(block_size=8, top_blocks=3, top_k=20, min_context=0)
    pooled = pool_keys(k, 8)
    a = hisa_attention_reference(q, k, v, pooled, cfg, query_chunk=1)
    b = hisa_attention_reference(q, k, v, pooled, cfg, query_chunk=1000)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_sparse_output_differs_from_dense_but_is_finite():
    q, k, v = _qkv(B=1, Hq=4, Hkv=2, Lq=128, Lk=128, seed=5)
    cfg = HisaConfig(block_size=8, top_blocks=4, top_k=16, min_context=0)
    out = hisa_attention_reference(q, k, v, pool_keys(k, 8), cfg)
    dense = dense_attention_reference(q, k, v)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[:, :, 16:], dense[:, :, 16:], atol=1e-3)
    torch.testing.assert_close(out[:, :, :16], dense[:, :, :16], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    q, k, v = _qkv(B=1, Hq=4, Hkv=2, Lq=33, Lk=65, dtype=dtype, seed=6)
    cfg = HisaConfig(block_size=8, top_blocks=4, top_k=16, min_context=0)
    out = hisa_attention_reference(q, k, v, pool_keys(k, 8), cfg)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()


def test_padding_mask_is_respected():
    q, k, v = _qkv(B=2, Hq=4, Hkv=2, Lq=40, Lk=40, seed=7)
    mask = torch.ones(2, 1, 40, 40, dtype=torch.bool).tril()
    mask[1, :, :, :5] = False  # row 1 is left-padded by 5 tokens
    cfg = HisaConfig(block_size=8, top_blocks=3, top_k=12, min_context=0)
    _, keep = hisa_attention_reference(q, k, v, pool_keys(k, 8), cfg, mask=mask, return_selection=True)
    assert not keep[1, :, :, :5].any()
    assert keep[0, :, :, :5].any()


def test_pool_keys_partial_last_block():
    k = torch.randn(1, 2, 21, 4)
    pooled = pool_keys(k, 8)
    assert pooled.shape == (1, 2, math.ceil(21 / 8), 4)
    torch.testing.assert_close(pooled[:, :, 2], k[:, :, 16:21].mean(2))
    torch.testing.assert_close(pooled[:, :, 0], k[:, :, :8].mean(2))
