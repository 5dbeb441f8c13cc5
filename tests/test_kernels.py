"""Triton kernels vs their pure-PyTorch specifications.

GPU tests (marked ``gpu``) are skipped without CUDA + Triton: every kernel is compared with the reference
of the same semantics on fresh random inputs (ragged lengths, GQA group sizes 1/4/7/8, head dims 64/128,
bf16/fp16, decode and prefill, masks, both selection modes). The CPU tests check the tiled reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from hisa import HisaConfig, dense_attention_reference, hisa_attention_reference, pool_keys
from hisa.kernels.reference_tiled import hisa_attention_tiled_reference
from tests.helpers import gpu, kernels, needs_gpu

TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
_seed = [1234]


def _fresh(B, Hq, Hkv, Lq, Lk, D, dtype, device="cuda"):
    _seed[0] += 1
    g = torch.Generator(device="cpu").manual_seed(_seed[0])
    q = torch.randn(B, Hq, Lq, D, generator=g).to(device, dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(device, dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(device, dtype)
    return q, k, v


def _rel(out, ref):
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


SMALL = HisaConfig(block_size=16, top_blocks=8, top_k=64, min_context=0)


# ---------------------------------------------------------------------------------------------- CPU
_COUNTED_DIGIT_CHECK = r"""
import torch, triton, triton.language as tl
from hisa.kernels.select import _keep_mask, _search, ukey_top

@triton.jit
def counted(X, H, OUT, N, K, NPAD, W: tl.constexpr, PRE: tl.constexpr):
    offs = tl.arange(0, W)
    x = tl.load(X + offs, mask=offs < N, other=float("-inf"))
    tl.store(H + tl.arange(0, 1 << PRE), tl.histogram(ukey_top(x, PRE), 1 << PRE, mask=offs < N))
    gt, eq = _search(x, offs, K, 5, H, PRE, NPAD)
    tl.store(OUT + offs, _keep_mask(gt, eq, K).to(tl.int32))

@triton.jit
def plain(X, OUT, N, K, W: tl.constexpr):
    offs = tl.arange(0, W)
    x = tl.load(X + offs, mask=offs < N, other=float("-inf"))
    gt, eq = _search(x, offs, K, 5)
    tl.store(OUT + offs, _keep_mask(gt, eq, K).to(tl.int32))

torch.manual_seed(0)
for trial in range(12):
    W, N, K = 512, [480, 512, 300][trial % 3], [64, 299, 480, 600][trial % 4]
    x = torch.randn(W) * [1.0, 1000.0, 1e-3][trial % 3]
    if trial % 2:
        x[torch.randperm(W)[:50]] = float("-inf")
        x[:3] = float("inf")
    if trial % 3 == 1:
        x = torch.round(x * 2) / 2  # ties at the threshold
    want = torch.zeros(W, dtype=torch.int32)
    plain[(1,)](x, want, N, K, W=W)
    for pre in (10, 12):
        got = torch.zeros(W, dtype=torch.int32)
        counted[(1,)](x, torch.zeros(1 << pre, dtype=torch.int32), got, N, K, W - N, W=W, PRE=pre)
        assert torch.equal(got, want), (trial, pre)
print("ok")
"""


def test_tile_kernel_choice(monkeypatch):
    """Which tile prefill kernel a call asks for: the settings' "kernel", else HISA_TILE_KERNEL, else auto;
    tuning keys without a kernel name mean the Triton kernel; anything else is a clear error."""
    tiled = pytest.importorskip("hisa.kernels.tiled")  # needs Triton
    monkeypatch.delenv("HISA_TILE_KERNEL", raising=False)
    assert tiled._kernel_choice(None) == "auto"
    assert tiled._kernel_choice({"tma": False}) == "auto"
    assert tiled._kernel_choice({"block_m": 128, "num_warps": 8}) == "triton"
    assert tiled._kernel_choice({"kernel": "wgmma", "num_stages": 3}) == "wgmma"
    monkeypatch.setenv("HISA_TILE_KERNEL", "triton")
    assert tiled._kernel_choice({}) == "triton"
    assert tiled._kernel_choice({"kernel": "auto"}) == "auto"
    monkeypatch.setenv("HISA_TILE_KERNEL", "fast")
    with pytest.raises(ValueError, match="auto, triton or wgmma"):
        tiled._kernel_choice({})


def test_counted_first_digit_selects_like_the_plain_search():
    """The graph decode's selections with a first key digit counted beforehand (a histogram of the scores' top
    10 / 12 key bits, -inf padding added by the search) keep exactly the entries the plain 5-bit radix search
    keeps: ties, +/-inf, padding, every scale. Runs the kernels' code in Triton's interpreter (CPU)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", _COUNTED_DIGIT_CHECK], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_tiled_reference_is_dense_when_blocks_cover_context():
    q, k, v = _fresh(2, 8, 2, 45, 100, 16, torch.float32, "cpu")
    cfg = HisaConfig(block_size=16, top_blocks=8, top_k=64, min_context=0)  # 7 blocks <= 8
    out = hisa_attention_tiled_reference(q, k, v, pool_keys(k, 16), cfg, query_chunk=7)
    torch.testing.assert_close(out, dense_attention_reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_tiled_reference_suffix_independent_and_sparse():
    q, k, v = _fresh(1, 4, 2, 160, 160, 16, torch.float32, "cpu")
    cfg = HisaConfig(block_size=16, top_blocks=3, top_k=32, min_context=0)
    pooled = pool_keys(k, 16)
    full, keep = hisa_attention_tiled_reference(q, k, v, pooled, cfg, return_selection=True)
    tail = hisa_attention_tiled_reference(q[:, :, 64:], k, v, pooled, cfg)  # starts on a block boundary
    torch.testing.assert_close(full[:, :, 64:], tail, rtol=1e-5, atol=1e-5)
    # every query keeps at most top_blocks blocks, always the sink and its own block, causally
    pos = torch.arange(160)
    assert keep[..., 0].all()
    assert bool((keep & (torch.arange(160)[None, :] > pos[:, None])).sum() == 0)
    blocks = keep.view(1, 4, 160, 10, 16).any(-1)
    assert int(blocks.sum(-1).max()) <= 3
    assert blocks[0, :, pos, pos // 16].all()
    # the queries of a tile and the heads of a group share their blocks
    b = blocks.view(1, 2, 2, 10, 16, 10)
    assert bool((b == b[:, :, :1, :, :1]).all())


def test_reference_tiled_backend_switch(monkeypatch):
    from hisa import ops

    q, k, v = _fresh(1, 4, 2, 40, 100, 16, torch.float32, "cpu")
    cfg = HisaConfig(block_size=16, top_blocks=2, top_k=32, min_context=0)
    pooled = pool_keys(k, 16)
    monkeypatch.setenv("HISA_BACKEND", "reference_tiled")
    out = ops.hisa_attention(q, k, v, pooled, cfg)
    torch.testing.assert_close(out, hisa_attention_tiled_reference(q, k, v, pooled, cfg))
    one = ops.hisa_attention(q[:, :, -1:], k, v, pooled, cfg)  # decode keeps per-query selection
    torch.testing.assert_close(one, hisa_attention_reference(q[:, :, -1:], k, v, pooled, cfg))
    monkeypatch.setenv("HISA_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="HISA_BACKEND"):
        ops.hisa_attention(q, k, v, pooled, cfg)


# ---------------------------------------------------------------------------------------------- GPU
def _stable_topk(s, k):
    """Ascending columns of each row's k largest finite entries, ties broken towards the lowest column."""
    R, n = s.shape
    out = torch.full((R, k), -1, dtype=torch.int32)
    cols = torch.arange(n)
    for r in range(R):
        x = s[r].float().cpu()
        order = sorted(range(n), key=lambda j: (-x[j].item(), j))[:k]
        keep = cols[sorted(j for j in order if x[j] > float("-inf"))]
        out[r, : keep.numel()] = keep.to(torch.int32)
    return out


@gpu
@needs_gpu
@pytest.mark.parametrize("method", [2, 1, 0, 3, 5])
def test_select_matches_torch_topk(method):
    from hisa.kernels.select import _topk_select_torch, topk_select

    for R, n, kk in [(7, 100, 10), (33, 2048, 64), (5, 4096, 2048), (3, 50, 64), (2, 16384, 100)]:
        s = torch.randn(R, n + 3, device="cuda")
        s[0, ::3] = float("-inf")
        want = _topk_select_torch(s[:, :n], kk, None, None, 1)
        nv = (5, 37, 4, 16)
        want_nv = _topk_select_torch(s[:, :n], kk, nv, None, 1)
        assert torch.equal(topk_select(s, kk, n=n, method=method), want), (R, n, kk, method)
        assert torch.equal(topk_select(s, kk, n=n, nvis=nv, method=method), want_nv), (R, n, kk, method)
    # prefill-style visibility growing along the rows (2 x 1200 tiles): narrower programs for the early rows
    from hisa.kernels.select import _width_bands

    for nv, n in (((0, 64, 1200, 64), 1200), ((128, 64, 1200, 64), 1210), ((3, 1, 900, 1), 1000)):
        assert len(_width_bands(n, nv)) >= 3
        s = torch.randn(2 * nv[2], n + 5, device="cuda")
        s[1, ::3] = float("-inf")
        assert torch.equal(topk_select(s, 64, n=n, nvis=nv, method=method),
                           _topk_select_torch(s[:, :n], 64, nv, None, 1)), (nv, method)
    s = torch.randn(6, 128, device="cuda")
    s[0] = float("-inf")
    s[0, 7] = 0.0
    s[1, ::2] = float("-inf")
    bmap = torch.randint(0, 40, (6, 8), dtype=torch.int32, device="cuda")
    got = topk_select(s, 20, block_map=bmap, map_bs=16, method=method)
    assert torch.equal(got, _topk_select_torch(s, 20, None, bmap, 16))
    assert got[0, 0] == bmap[0, 0] * 16 + 7 and (got[0, 1:] == -1).all()


@gpu
@needs_gpu
@pytest.mark.parametrize("method", [2, 1, 0, 3, 5])
def test_select_ties_and_clusters(method):
    """Heavy ties (the lowest columns win), a tight cluster with far outliers, k = n - 1."""
    from hisa.kernels.select import topk_select

    g = torch.Generator().manual_seed(5)
    ties = torch.randint(0, 5, (4, 1000), generator=g).float()
    cluster = torch.randn(4, 1000, generator=g) * 1e-6 + 3.0
    cluster[:, 5], cluster[:, 9] = 1e30, -1e30
    for s in (ties, cluster, -cluster):
        s = s.clone()
        s[0, ::3] = float("-inf")
        for kk in (10, 500, 999):
            got = topk_select(s.cuda(), kk, method=method).cpu()
            assert torch.equal(got, _stable_topk(s, kk)), (kk, method)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 4, 7, 8])
@pytest.mark.parametrize("Lq", [1, 5])
def test_exact_path_matches_reference(G, D, dtype, Lq):
    Hkv = 2
    q, k, v = _fresh(2, G * Hkv, Hkv, Lq, 1000 + 7 * G + Lq, D, dtype)
    pooled = pool_keys(k, SMALL.block_size)
    out = kernels.hisa_attention(q, k, v, pooled, SMALL, path="exact")
    ref = hisa_attention_reference(q.float(), k.float(), v.float(), pooled, SMALL)
    assert out.shape == q.shape and out.dtype == dtype
    assert _rel(out, ref) < TOL[dtype]


@gpu
@needs_gpu
@pytest.mark.parametrize("fused,method", [(True, 2), (False, 2), (True, 1), (False, 1), (True, 0), (True, 3),
                                          (True, 5)])
@pytest.mark.parametrize("selection", ["group", "head"])
def test_exact_path_default_config_decode(selection, fused, method, monkeypatch):
    from hisa.kernels import exact, select

    monkeypatch.setattr(exact, "FUSED", fused)
    monkeypatch.setattr(select, "SELECT_METHOD", method)
    cfg = HisaConfig(selection=selection)
    q, k, v = _fresh(1, 32, 8, 1, 9000 + 13, 64, torch.bfloat16)
    pooled = pool_keys(k, cfg.block_size)
    out = kernels.hisa_attention(q, k, v, pooled, cfg)
    ref = hisa_attention_reference(q.float(), k.float(), v.float(), pooled, cfg)
    assert _rel(out, ref) < TOL[torch.bfloat16]


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 4, 7, 8])
def test_tiled_path_matches_tiled_reference(G, D, dtype):
    Hkv = 2
    Lk = 700 + 9 * G  # ragged: not a multiple of the block size
    Lq = Lk if G % 2 else 333  # full prefill, or a chunk starting mid-block
    q, k, v = _fresh(1, G * Hkv, Hkv, Lq, Lk, D, dtype)
    pooled = pool_keys(k, SMALL.block_size)
    out = kernels.hisa_attention(q, k, v, pooled, SMALL, path="tile")
    ref = hisa_attention_tiled_reference(q.float(), k.float(), v.float(), pooled, SMALL)
    assert out.shape == q.shape and out.dtype == dtype
    assert _rel(out, ref) < TOL[dtype]


@gpu
@needs_gpu
@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("D", [64, 96, 128])
@pytest.mark.parametrize("G", [1, 2, 4, 8])
def test_tiled_kernel_tma_and_pointer_loads(G, D, tma):
    """Both ways of fetching K/V blocks (TMA descriptors on Hopper, pointer loads elsewhere) and the
    row / warp settings per head dim give the specification's result, on a cache-like K/V: views of
    longer buffers."""
    from hisa.kernels import tiled

    if tma and not tiled.use_tma(*(torch.empty(1, 1, 8, 64, device="cuda"),) * 2):
        pytest.skip("no TMA on this GPU / Triton")
    Hkv, Lk = 2, 900 + 5 * G
    q, k, v = _fresh(1, G * Hkv, Hkv, Lk, Lk + 100, D, torch.bfloat16)
    k, v = k[:, :, :Lk], v[:, :, :Lk]  # the cache hands attention views of its capacity buffers
    pooled = pool_keys(k, SMALL.block_size)
    out = torch.empty_like(q)
    tiled.hisa_attention_tiled(q, k, v, pooled, SMALL, scale=D**-0.5, q_start=0, mask=None, out=out,
                               settings={"tma": tma})
    ref = hisa_attention_tiled_reference(q.float(), k.float(), v.float(), pooled, SMALL)
    assert _rel(out, ref) < TOL[torch.bfloat16]


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 2, 4, 7, 8])
@pytest.mark.parametrize("bs", [16, 64])
def test_wgmma_tile_kernel(bs, G, D, dtype, monkeypatch):
    """The Hopper (Gluon) tile kernel against the specification, forced at both head dims: ragged lengths, a
    chunk starting mid-block, the model's [B, L, H, D] query/output views, K/V views of longer buffers whose
    rows past the keys hold NaN (must never be read into a result), and a check that it really ran."""
    from hisa.kernels import tiled, tiled_wgmma

    k0 = torch.empty(1, 1, 8, 64, device="cuda")
    if torch.cuda.get_device_capability()[0] != 9 or not tiled_wgmma.available() or not tiled.use_tma(k0, k0):
        pytest.skip("the wgmma kernel needs a Hopper GPU with TMA and Gluon")
    calls = []
    launch = tiled_wgmma.launch
    monkeypatch.setattr(tiled_wgmma, "launch", lambda *a, **kw: calls.append(kw) or launch(*a, **kw))
    cfg = HisaConfig(block_size=bs, top_blocks=8 if bs == 16 else 4, top_k=64, min_context=0)
    Hkv = 2
    Lk = 900 + 37 * G
    Lq = Lk if G % 2 else 333
    _seed[0] += 1
    gen = torch.Generator(device="cpu").manual_seed(_seed[0])
    q = torch.randn(1, Lq, G * Hkv, D, generator=gen).to("cuda", dtype).transpose(1, 2)
    kb, vb = (torch.randn(1, Hkv, Lk + 64, D, generator=gen).to("cuda", dtype) for _ in range(2))
    kb[:, :, Lk:] = float("nan")
    vb[:, :, Lk:] = float("nan")
    k, v = kb[:, :, :Lk], vb[:, :, :Lk]
    pooled = pool_keys(k, bs)
    out = torch.empty(1, Lq, G * Hkv, D, device="cuda", dtype=dtype).transpose(1, 2)
    tiled.hisa_attention_tiled(q, k, v, pooled, cfg, scale=D**-0.5, q_start=Lk - Lq, mask=None, out=out,
                               settings={"kernel": "wgmma"})
    ref = hisa_attention_tiled_reference(q.float(), k.float(), v.float(), pooled, cfg, q_start=Lk - Lq)
    assert _rel(out, ref) < TOL[dtype]
    rows = min(1 << (G - 1).bit_length(), 64 // bs) * bs  # heads per program (a power of two) x block
    assert len(calls) == (1 if rows >= 64 else 0)  # fewer than 64 rows per program: the Triton kernel


@gpu
@needs_gpu
def test_wgmma_tile_kernel_build_failure_falls_back(monkeypatch):
    """A Triton/Gluon build the Hopper kernel does not compile with: the default path warns once and runs the
    Triton kernel from then on (same result); a call that forces the Hopper kernel gets the error."""
    from hisa.kernels import tiled, tiled_wgmma

    k0 = torch.empty(1, 1, 8, 64, device="cuda")
    if torch.cuda.get_device_capability()[0] != 9 or not tiled_wgmma.available() or not tiled.use_tma(k0, k0):
        pytest.skip("the Hopper kernel does not run on this GPU")
    monkeypatch.setattr(tiled, "_WGMMA_FAILED", False)
    calls = []

    def broken(*a, **kw):
        calls.append(1)
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(tiled_wgmma, "launch", broken)
    cfg = HisaConfig(top_blocks=4, top_k=128, min_context=0)
    q, k, v = _fresh(1, 8, 2, 600, 600, 64, torch.bfloat16)
    pooled = pool_keys(k, cfg.block_size)
    ref = hisa_attention_tiled_reference(q.float(), k.float(), v.float(), pooled, cfg)
    run = dict(scale=64**-0.5, q_start=0, mask=None)
    out = torch.empty_like(q)
    with pytest.warns(RuntimeWarning, match="Hopper tile kernel failed"):
        tiled.hisa_attention_tiled(q, k, v, pooled, cfg, out=out, **run)
    assert _rel(out, ref) < TOL[torch.bfloat16]
    out2 = torch.empty_like(q)
    tiled.hisa_attention_tiled(q, k, v, pooled, cfg, out=out2, **run)  # not tried again
    assert calls == [1] and _rel(out2, ref) < TOL[torch.bfloat16]
    with pytest.raises(RuntimeError, match="simulated"):
        tiled.hisa_attention_tiled(q, k, v, pooled, cfg, out=torch.empty_like(q), settings={"kernel": "wgmma"}, **run)


@gpu
@needs_gpu
@pytest.mark.parametrize("selection", ["group", "head"])
@pytest.mark.parametrize("bs", [32, 64])
def test_tiled_path_default_shapes(selection, bs):
    cfg = HisaConfig(block_size=bs, top_blocks=8, top_k=256, selection=selection)
    q, k, v = _fresh(2, 8, 2, 1500, 1500 + 37, 64, torch.bfloat16)
    pooled = pool_keys(k, bs)
    out = kernels.hisa_attention(q, k, v, pooled, cfg)
    ref = hisa_attention_tiled_reference(q.float(), k.float(), v.float(), pooled, cfg)
    assert _rel(out, ref) < TOL[torch.bfloat16]


@gpu
@needs_gpu
@pytest.mark.parametrize("path", ["exact", "tile"])
def test_padding_mask(path):
    B, Lq, Lk = 2, 300, 530
    q, k, v = _fresh(B, 8, 2, Lq, Lk, 64, torch.float16)
    mask = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device="cuda")
    mask[1, :, :, :45] = False  # left padding of the second row
    mask[1, :, :10] = False  # some queries see nothing at all -> zeros, like the reference
    pooled = pool_keys(k, SMALL.block_size)
    out = kernels.hisa_attention(q, k, v, pooled, SMALL, mask=mask, path=path)
    spec = hisa_attention_reference if path == "exact" else hisa_attention_tiled_reference
    ref = spec(q.float(), k.float(), v.float(), pooled, SMALL, mask=mask)
    assert _rel(out, ref) < TOL[torch.float16]
    assert (out[1, :, :10] == 0).all()


@gpu
@needs_gpu
def test_dense_equivalence_and_crossover(monkeypatch):
    from hisa import ops

    q, k, v = _fresh(1, 8, 2, 200, 200, 64, torch.float16)
    cfg = HisaConfig(block_size=16, top_blocks=16, top_k=256, min_context=0)  # 13 blocks: all kept
    pooled = pool_keys(k, 16)
    ref = dense_attention_reference(q, k, v)
    for path in ("exact", "tile"):
        assert _rel(kernels.hisa_attention(q, k, v, pooled, cfg, path=path), ref) < 5e-3
    # below the crossover the dispatch runs SDPA (dense); q_len 3 < Lk exercises the explicit causal mask
    monkeypatch.setenv("HISA_BACKEND", "triton")
    assert _rel(ops.hisa_attention(q[:, :, -3:], k, v, pooled, cfg.replace(top_blocks=2, top_k=32)),
                dense_attention_reference(q[:, :, -3:], k, v)) < 5e-3
    monkeypatch.setenv("HISA_DENSE_BELOW_DECODE", "0")
    monkeypatch.setenv("HISA_DENSE_BELOW", "0")
    small = cfg.replace(top_blocks=2, top_k=32)
    out = ops.hisa_attention(q[:, :, -3:], k, v, pooled, small)
    assert _rel(out, hisa_attention_reference(q[:, :, -3:].float(), k.float(), v.float(), pooled, small)) < 5e-3


@gpu
@needs_gpu
def test_pool_update_matches_cache(monkeypatch):
    from hisa import cache as cache_mod
    from hisa.cache import HisaLayer

    fast = HisaLayer(64, max_cache_len=1000)  # on CUDA the cache uses the Triton kernel
    monkeypatch.setattr(cache_mod, "_POOL_KERNEL", [None])
    slow = HisaLayer(64, max_cache_len=1000)  # PyTorch path
    for t in (100, 1, 1, 70, 200, 1, 63):
        new = torch.randn(2, 4, t, 64, device="cuda", dtype=torch.bfloat16)
        monkeypatch.setattr(cache_mod, "_POOL_KERNEL", [None])
        slow.update(new, new)
        monkeypatch.undo()
        fast.update(new, new)
        torch.testing.assert_close(fast._psum, slow._psum, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(fast.pooled_keys, slow.pooled_keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.pooled_keys, pool_keys(fast.keys, 64), rtol=1e-4, atol=1e-4)


@gpu
@needs_gpu
def test_crop_kernel_matches_cache(monkeypatch):
    """Cutting a CUDA cache (one launch re-sums the new last block and zeroes the dead ones) leaves the same
    sums and means as the PyTorch path, and appending after the cut stays right."""
    from hisa import cache as cache_mod
    from hisa.cache import HisaLayer

    fast = HisaLayer(64, max_cache_len=2000)
    slow = HisaLayer(64, max_cache_len=2000)
    torch.manual_seed(3)
    for t, cut in ((900, 700), (50, 640), (300, 1), (10, 5), (200, 133)):
        new = torch.randn(2, 3, t, 64, device="cuda", dtype=torch.bfloat16)
        for layer, kernel in ((fast, True), (slow, False)):
            if not kernel:
                monkeypatch.setattr(cache_mod, "_POOL_KERNEL", [None])
            layer.update(new, new)
            layer.crop_to(cut)
            monkeypatch.undo()
        torch.testing.assert_close(fast._psum, slow._psum, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(fast._pooled, slow._pooled, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast.pooled_keys, pool_keys(fast.keys, 64), rtol=1e-4, atol=1e-4)
        assert fast.get_seq_length() == cut


@gpu
@needs_gpu
def test_clone_prefix_and_reserve_on_cuda():
    from hisa import HisaCache

    cache = HisaCache(HisaConfig(block_size=64, top_blocks=4, top_k=256))
    keys = torch.randn(1, 2, 1000, 64, device="cuda", dtype=torch.bfloat16)
    cache.update(keys, keys, 0)
    for n in (1, 64, 650, 1000):
        clone = cache.clone_prefix(n, capacity=3000)
        assert clone.layers[0].capacity >= 3000 and clone.get_seq_length() == n
        torch.testing.assert_close(clone.layers[0].pooled_keys, pool_keys(keys[:, :, :n], 64), rtol=1e-4, atol=1e-4)
    cache.reserve(5000)
    assert cache.layers[0].capacity >= 5000
    torch.testing.assert_close(cache.layers[0].keys, keys)
    torch.testing.assert_close(cache.layers[0].pooled_keys, pool_keys(keys, 64), rtol=1e-4, atol=1e-4)


@gpu
@needs_gpu
def test_model_end_to_end_matches_reference(monkeypatch):
    import transformers

    from hisa import apply_hisa, new_cache

    from .helpers import cache_kw

    cfg_m = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                     attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg_m).to("cuda", torch.bfloat16).eval()
    cfg = HisaConfig(block_size=16, top_blocks=4, top_k=32, min_context=0)
    apply_hisa(model, cfg)
    ids = torch.randint(0, 512, (1, 400), device="cuda")
    monkeypatch.setenv("HISA_DENSE_BELOW", "0")
    monkeypatch.setenv("HISA_DENSE_BELOW_DECODE", "0")
    logits = {}
    for backend in ("triton", "reference_tiled"):
        monkeypatch.setenv("HISA_BACKEND", backend)
        with torch.no_grad():
            cache = new_cache(model)
            out = model(ids[:, :-1], **cache_kw(model, cache), use_cache=True)
            step = model(ids[:, -1:], **cache_kw(model, cache), use_cache=True)
        logits[backend] = (out.logits[0, -50:].float(), step.logits[0, -1].float())
    for a, b in zip(logits["triton"], logits["reference_tiled"]):
        assert _rel(a, b) < 3e-2
    assert math.isfinite(float(logits["triton"][1].sum()))


@gpu
@needs_gpu
@pytest.mark.parametrize("Lq", [2, 16, 300])
def test_sdpa_dense_chunk_after_cached_keys(Lq):
    """ops.sdpa_dense on a chunk after cached keys (bottom-right causal, GQA) equals exact attention."""
    from hisa.ops import sdpa_dense

    q, k, v = _fresh(1, 32, 8, Lq, 5000, 64, torch.bfloat16)
    out = sdpa_dense(q, k, v)
    ref = dense_attention_reference(q.float(), k.float(), v.float())
    assert _rel(out, ref) < TOL[torch.bfloat16]


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_elementwise_kernels_match_eager(dtype):
    """The fused prefill kernels round where the eager code rounds: rotary and SiLU-gate give the same bits
    (up to an occasional last-unit difference), RMSNorm differs only by its float32 summation order."""
    from hisa import fused
    from hisa.kernels import elementwise

    g = torch.Generator(device="cpu").manual_seed(3)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to("cuda", dtype)

    def same(a, b, frac, what):
        assert a.shape == b.shape and a.dtype == b.dtype, what
        equal = (a == b).float().mean().item()
        assert equal >= frac, (what, equal, (a.float() - b.float()).abs().max().item())
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-2, msg=what)

    for shape in [(3, 300, 2048), (2, 7, 4, 128), (5, 896)]:
        x, w = rnd(*shape, scale=3.0), rnd(shape[-1])
        same(elementwise.rms_norm(x, w, 1e-6), fused.rms_norm(x, w, 1e-6), 0.99, f"rms_norm {shape}")
    for D, Hq, Hkv, B, cosb in [(64, 32, 8, 2, 2), (128, 12, 2, 1, 1)]:
        q = rnd(B, 300, Hq, D).transpose(1, 2)  # the layout the attention modules produce
        k = rnd(B, 300, Hkv, D).transpose(1, 2)
        ang = torch.rand(cosb, 300, D, generator=g) * 6
        cos, sin = ang.cos().to("cuda", dtype), ang.sin().to("cuda", dtype)
        for got, want in zip(elementwise.rope(q, k, cos, sin), fused.rope(q, k, cos, sin)):
            same(got, want, 0.999, f"rope D={D}")
    gate, up = rnd(300, 8192, scale=4.0), rnd(300, 8192)
    same(elementwise.silu_mul(gate, up), fused.silu_mul(gate, up), 0.999, "silu_mul")


@gpu
@needs_gpu
def test_prefill_fusion_in_a_patched_model(monkeypatch):
    """apply_hisa's forward runs the fused kernels from PREFILL_MIN_TOKENS tokens, with the same logits."""
    import transformers

    from hisa import apply_hisa
    from hisa.kernels import elementwise

    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    apply_hisa(model, HisaConfig(min_context=0))
    calls = []
    real = elementwise.silu_mul
    monkeypatch.setattr(elementwise, "silu_mul", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, 512, (1, 700), device="cuda")
    with torch.inference_mode():
        out = model(input_ids=ids).logits
        assert len(calls) == 2  # one MLP per layer
        monkeypatch.setenv("HISA_FUSED_PREFILL", "0")
        ref = model(input_ids=ids).logits
        assert len(calls) == 2
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


@gpu
@needs_gpu
def test_prefill_residual_fusion_and_hidden_states(monkeypatch):
    """Long forwards add the residuals inside the output projections (one buffer passed from layer to layer);
    a forward asked for its hidden states keeps the layers' own additions, so every returned state is right."""
    import transformers

    from hisa import apply_hisa, fused

    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    apply_hisa(model, HisaConfig(min_context=0))
    ids = torch.randint(0, 512, (1, 700), device="cuda")
    addmm = []
    real = torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda self, *a, **k: addmm.append(1) or real(self, *a, **k))
    with torch.inference_mode():
        out = model(input_ids=ids).logits
        assert len(addmm) == 2 * 3  # attention output and down projection of each layer
        hidden = model(input_ids=ids, output_hidden_states=True)
        assert len(addmm) == 6
        monkeypatch.setattr(fused, "FUSE_RESIDUAL", False)
        ref = model(input_ids=ids, output_hidden_states=True)
        monkeypatch.setenv("HISA_FUSED_PREFILL", "0")
        eager = model(input_ids=ids, output_hidden_states=True)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    assert rel(out, ref.logits) < 1e-2 and rel(out, eager.logits) < 1e-2
    assert len(hidden.hidden_states) == len(eager.hidden_states) == 4
    for a, b in zip(hidden.hidden_states, eager.hidden_states):
        assert rel(a, b) < 1e-2
    assert all(torch.equal(a, b) for a, b in zip(hidden.hidden_states, ref.hidden_states))
