"""hisa.DecodeStep: the recordable (static) decode path and its CUDA graphs give the eager path's results.

CPU tests run the static path eagerly (full-capacity buffers, device-side length, ops.decode_static's
reference branch); GPU tests (marked ``gpu``) record and replay real CUDA graphs over the Triton kernels and
compare them with eager decoding, dense and sparse, including the switch from one to the other and a cache
that must grow mid-generation. The decode_static kernels are also compared with the reference directly.
"""

from __future__ import annotations

import math

import pytest
import torch

import hisa
from hisa import HisaConfig, apply_hisa, new_cache
from hisa.reference import hisa_attention_reference, pool_keys
from tests.helpers import cache_kw, gpu, kernels, needs_gpu, tiny_model

SPARSE = HisaConfig(block_size=8, top_blocks=4, top_k=16, min_context=0)


def _decode(model, prompt, steps, *, step=None, max_len=None, overrides=None, forced=None):
    """Greedy decode (or, with ``forced`` [B, steps], feed those tokens): the tokens and every step's logits."""
    cache = new_cache(model, max_cache_len=max_len or prompt.shape[1] + steps)
    ctx = hisa.override(**overrides) if overrides else _null()
    with torch.inference_mode(), ctx:
        logits = model(input_ids=prompt, use_cache=True, **cache_kw(model, cache)).logits[:, -1]
        tokens, all_logits = [], [logits.float()]
        for i in range(steps):
            token = logits.argmax(-1) if forced is None else forced[:, i]
            tokens.append(token)
            if step is None:
                logits = model(input_ids=token.view(-1, 1), use_cache=True, **cache_kw(model, cache)).logits[:, -1]
            else:
                logits = step(token, cache)
            all_logits.append(logits.float().clone())
    if step is not None:
        step.forget(cache)
    return torch.stack(tokens, 1), torch.stack(all_logits, 1), cache


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("config", [SPARSE, HisaConfig(enabled=False)], ids=["sparse", "dense"])
def test_static_path_matches_eager_cpu(family, config):
    model = apply_hisa(tiny_model(family, layers=2), config)
    prompt = torch.randint(0, 256, (1, 21))
    ref_tokens, ref_logits, ref_cache = _decode(model, prompt, 20)
    step = hisa.DecodeStep(model, graphs=False, static=True)
    tokens, logits, cache = _decode(model, prompt, 20, step=step)
    assert step.static_steps == 20
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    for a, b in zip(cache.layers, ref_cache.layers):
        assert a.length == b.length == 41
        torch.testing.assert_close(a.keys, b.keys)
        torch.testing.assert_close(a.pooled_keys, b.pooled_keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.pooled_keys, pool_keys(a.keys, config.block_size), atol=1e-5, rtol=1e-5)


def test_static_path_crosses_into_sparse_and_counts_cpu():
    """The context grows past top_k mid-generation: dense steps, then sparse ones; statistics match eager."""
    model = apply_hisa(tiny_model("llama"), SPARSE)
    prompt = torch.randint(0, 256, (1, 10))
    with hisa.track() as ref_stats:
        ref_tokens, ref_logits, _ = _decode(model, prompt, 12)
    step = hisa.DecodeStep(model, graphs=False, static=True)
    with hisa.track() as stats:
        tokens, logits, _ = _decode(model, prompt, 12, step=step)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert (stats.attended, stats.total) == (ref_stats.attended, ref_stats.total)
    assert stats.sparse_calls == ref_stats.sparse_calls > 0 and stats.dense_calls == ref_stats.dense_calls > 0


def test_full_cache_falls_back_to_growing_cpu():
    """A cache preallocated too small: the step past its capacity runs eagerly (the cache grows), then the
    static path resumes; results equal eager decoding."""
    model = apply_hisa(tiny_model("llama"), SPARSE)
    prompt = torch.randint(0, 256, (1, 9))
    ref_tokens, ref_logits, _ = _decode(model, prompt, 300, max_len=9)
    step = hisa.DecodeStep(model, graphs=False, static=True)
    tokens, logits, cache = _decode(model, prompt, 300, step=step, max_len=9)
    assert 0 < step.static_steps < 300  # the steps that found the cache full ran eagerly
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert cache.layers[0].capacity >= 309


@pytest.mark.parametrize("lengths", [(5,), (16,), (23, 3)], ids=["5", "16", "23+3"])
def test_static_chunk_matches_eager_cpu(lengths):
    """DecodeStep.chunk (a follow-up question after a cached prefix, in padded 16-token steps) gives the
    eager forward's logits and leaves the cache as the eager path does; decoding then continues alike."""
    cfg = HisaConfig(block_size=8, top_blocks=64, top_k=512, min_context=0)  # dense here: the chunk path's case
    model = apply_hisa(tiny_model("llama", layers=2), cfg)
    prompt = torch.randint(0, 256, (1, 37))
    chunks = [torch.randint(0, 256, (1, n)) for n in lengths]
    step = hisa.DecodeStep(model, graphs=False, static=True)
    with torch.inference_mode():
        caches, outs = [], []
        for use_step in (False, True):
            cache = new_cache(model, max_cache_len=200)
            model(input_ids=prompt, use_cache=True, **cache_kw(model, cache))
            got = []
            for c in chunks:
                if use_step:
                    got.append(step.chunk(c, cache).float())
                else:
                    got.append(model(input_ids=c, use_cache=True, **cache_kw(model, cache)).logits[:, -1].float())
            token = got[-1].argmax(-1)
            for _ in range(5):
                logits = (step(token, cache) if use_step else
                          model(input_ids=token.view(1, 1), use_cache=True, **cache_kw(model, cache)).logits[:, -1])
                got.append(logits.float())
                token = logits.argmax(-1)
            caches.append(cache)
            outs.append(torch.stack(got))
    assert step.static_steps == sum(-(-n // 16) for n in lengths) + 5
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
    total = 37 + sum(lengths) + 5
    for a, b in zip(caches[1].layers, caches[0].layers):
        assert a.length == b.length == total
        torch.testing.assert_close(a.keys, b.keys)
        torch.testing.assert_close(a.pooled_keys, pool_keys(a.keys, cfg.block_size), atol=1e-5, rtol=1e-5)


def test_sliding_window_model_decodes_eagerly_cpu():
    """A model with an active sliding window (its mask is not plain causal) never takes the static path."""
    import transformers

    cfg = transformers.MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=12,
                                     attn_implementation="sdpa")
    torch.manual_seed(0)
    model = apply_hisa(transformers.MistralForCausalLM(cfg).eval(), SPARSE)
    prompt = torch.randint(0, 256, (1, 30))
    ref_tokens, ref_logits, _ = _decode(model, prompt, 8)
    step = hisa.DecodeStep(model, graphs=False, static=True)
    tokens, logits, _ = _decode(model, prompt, 8, step=step)
    assert step.static_steps == 0
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits)


def test_plain_step_without_static_is_the_forward_cpu():
    model = apply_hisa(tiny_model("qwen2"), SPARSE)
    prompt = torch.randint(0, 256, (2, 12))
    ref_tokens, ref_logits, _ = _decode(model, prompt, 6)
    step = hisa.DecodeStep(model)  # CPU: no graphs, no static path
    assert not step.graphs and not step.static
    tokens, logits, _ = _decode(model, prompt, 6, step=step)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits)


# -- GPU: real CUDA graphs ------------------------------------------------------------------------------
@gpu
@needs_gpu
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("mode", ["sparse", "dense", "cross"])
def test_cuda_graph_decode_matches_eager(family, mode, monkeypatch):
    monkeypatch.setenv("HISA_DENSE_BELOW_STATIC", "0")
    monkeypatch.setenv("HISA_DENSE_BELOW_DECODE", "0")
    monkeypatch.setenv("HISA_DENSE_BELOW", "0")
    cfg = {"sparse": HisaConfig(block_size=16, top_blocks=4, top_k=48, min_context=0),
           "dense": HisaConfig(enabled=False),
           "cross": HisaConfig(block_size=16, top_blocks=8, top_k=96, min_context=0)}[mode]
    model = apply_hisa(tiny_model(family, heads=8, kv_heads=2, hidden=512, layers=3, dtype=torch.bfloat16).cuda(),
                       cfg)
    n_prompt = {"sparse": 300, "dense": 300, "cross": 70}[mode]
    prompt = torch.randint(0, 256, (1, n_prompt), device="cuda")
    ref_tokens, ref_logits, ref_cache = _decode(model, prompt, 40)
    step = hisa.DecodeStep(model)
    assert step.graphs
    # the same tokens fed to every path (a random model's greedy path is fragile), every step's logits compared
    tokens, logits, cache = _decode(model, prompt, 40, step=step, forced=ref_tokens)
    assert step.failed is None and step.replays == 40 and step.recordings >= 1
    if mode == "cross":
        assert step.recordings == 2  # dense graph, then the sparse one
    static = hisa.DecodeStep(model, graphs=False, static=True)  # the graph's kernels, run eagerly
    _, static_logits, _ = _decode(model, prompt, 40, step=static, forced=ref_tokens)
    assert static.static_steps == 40

    def rel(a, b):
        return (a - b).norm(dim=-1) / b.norm(dim=-1)

    # bf16 rounding differs between the paths (SDPA vs split-K, fused RMSNorm...), and in sparse layers a
    # near-tie at the top-k threshold can swap a token, so: small errors at most steps, same argmax
    for name, a, b in (("graph vs static", logits, static_logits), ("graph vs eager", logits, ref_logits),
                       ("static vs eager", static_logits, ref_logits)):
        e = rel(a, b)[0]
        agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        print(f"{family}/{mode} {name}: rel err median {e.median():.2e} max {e.max():.2e}, top-1 agree {agree:.3f}")
        assert e.median() < 2e-2 and agree >= 0.9, (name, e.tolist(), agree)
    for a in cache.layers:
        assert a.length == n_prompt + 40
        torch.testing.assert_close(a.pooled_keys, pool_keys(a.keys, cfg.block_size), atol=2e-3, rtol=2e-3)


@gpu
@needs_gpu
@pytest.mark.parametrize("sparse,variant", [(True, "fused"), (True, "wide"), (True, "combine-last"),
                                             (True, "range-search"), (True, "radix8"), (True, "radix4"), (True, "compact"),
                                             (True, "no-pdl"), (True, "no-counted-digit"), (False, "fused"),
                                             (False, "separate-combine")])
@pytest.mark.parametrize("G,D", [(1, 64), (4, 64), (7, 128), (8, 128)])
def test_decode_static_kernel_matches_reference(sparse, variant, G, D, monkeypatch):
    """Both sparse paths (three fused launches, with and without programmatic dependent launches, with and
    without the selections' first key digits counted by the scoring programs; the wide-row
    path), both combines, the kept-token list compacted or with holes, and the searches, against the spec."""
    from hisa.kernels import decode

    monkeypatch.setattr(decode, "FUSED_STATIC", variant != "wide")
    monkeypatch.setattr(decode, "COMBINE_LAST", variant != "separate-combine")
    monkeypatch.setattr(decode, "COMBINE_LAST_SPARSE", variant == "combine-last")
    monkeypatch.setattr(decode, "COMPACT_KEPT", variant == "compact")
    monkeypatch.setattr(decode, "PDL", variant != "no-pdl")
    if variant == "no-counted-digit":
        monkeypatch.setattr(decode, "STAGE1_PRE_BITS", 0)
        monkeypatch.setattr(decode, "STAGE2_PRE_BITS", 0)
        monkeypatch.setattr(decode, "STAGE2_PRE_BITS_LARGE_D", 0)
    if variant in ("range-search", "radix8", "radix4"):
        monkeypatch.setattr(decode, "SELECT_METHOD", {"range-search": 2, "radix8": 1, "radix4": 3}[variant])
    torch.manual_seed(G * 100 + D)
    cfg = HisaConfig(block_size=64, top_blocks=16, top_k=512)
    if G == 7:  # ragged block size, per-head selection, batch 2
        cfg = HisaConfig(block_size=48, top_blocks=10, top_k=300, selection="head")
    bs = cfg.block_size
    B, Hkv, cap = 2 if G == 7 else 1, 2, 8192
    dev, dt = "cuda", torch.bfloat16
    k = torch.randn(B, Hkv, cap, D, device=dev, dtype=dt)
    v = torch.randn_like(k)
    for n in (3000, 4097, 8192):
        q = torch.randn(B, Hkv * G, 1, D, device=dev, dtype=dt)
        pooled = torch.zeros(B, Hkv, math.ceil(cap / bs), D, device=dev)
        pooled[:, :, : math.ceil(n / bs)] = pool_keys(k[:, :, :n], bs)
        length = torch.tensor([n, n - 1], dtype=torch.int32, device=dev)
        out = kernels.decode_static(q, k, v, pooled, length, cfg, sparse=sparse)
        if sparse:
            ref = hisa_attention_reference(q.float(), k[:, :, :n].float(), v[:, :, :n].float(),
                                           pooled[:, :, : math.ceil(n / bs)], cfg)
        else:
            ref = torch.nn.functional.scaled_dot_product_attention(
                q.float(), k[:, :, :n].float(), v[:, :, :n].float(), enable_gqa=G > 1)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        assert err < 2e-2, (n, err)


@gpu
@needs_gpu
@pytest.mark.parametrize("chunk_kernel", [True, False])
@pytest.mark.parametrize("G,D", [(1, 64), (4, 64), (7, 96), (8, 128)])
def test_decode_static_chunk_matches_sdpa(G, D, chunk_kernel, monkeypatch):
    """A chunk step's dense attention (a few queries after cached keys, positions in device memory) equals
    causal SDPA, with all query rows of a unit in one program (the chunk kernel) or one row per query; also
    replayed from one recording at several lengths."""
    from hisa.kernels import decode

    monkeypatch.setattr(decode, "CHUNK_KERNEL", chunk_kernel)
    torch.manual_seed(G * 10 + D)
    cfg = HisaConfig(block_size=64, top_blocks=16, top_k=512)
    B, Hkv, cap = 2 if G == 7 else 1, 2, 6000
    dev, dt = "cuda", torch.bfloat16
    k = torch.randn(B, Hkv, cap, D, device=dev, dtype=dt)
    v = torch.randn_like(k)
    pooled = torch.zeros(B, Hkv, math.ceil(cap / 64), D, device=dev)

    def ref(q, n, lq):
        kk = k[:, :, :n].float().repeat_interleave(G, 1)
        vv = v[:, :, :n].float().repeat_interleave(G, 1)
        mask = torch.arange(n, device=dev)[None, :] <= (n - lq + torch.arange(lq, device=dev))[:, None]
        return torch.nn.functional.scaled_dot_product_attention(q.float(), kk, vv, attn_mask=mask)

    for lq in (2, 5, 16):
        for n in (lq + 1, 1000, 4097, cap):
            q = torch.randn(B, Hkv * G, lq, D, device=dev, dtype=dt)
            length = torch.tensor([n, n - lq], dtype=torch.int32, device=dev)
            out = kernels.decode_static(q, k, v, pooled, length, cfg, sparse=False)
            err = ((out.float() - ref(q, n, lq)).norm() / ref(q, n, lq).norm()).item()
            assert err < 2e-2, (lq, n, err)
    q = torch.randn(B, Hkv * G, 16, D, device=dev, dtype=dt)
    length = torch.tensor([100, 84], dtype=torch.int32, device=dev)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.decode_static(q, k, v, pooled, length, cfg, sparse=False)
    for n in (100, 3000, cap):
        q.normal_()
        length.copy_(torch.tensor([n, n - 16]))
        graph.replay()
        err = ((out.float() - ref(q, n, 16)).norm() / ref(q, n, 16).norm()).item()
        assert err < 2e-2, (n, err)


@gpu
@needs_gpu
@pytest.mark.parametrize("sparse", [True, False])
def test_decode_static_replayed_in_a_graph(sparse):
    """One recording replayed at many lengths: the arrival counters of the last-program selections and
    combines are left at zero by every launch, so each replay matches the spec."""
    torch.manual_seed(7)
    cfg = HisaConfig(block_size=32, top_blocks=8, top_k=160)
    B, Hkv, G, D, cap = 2, 2, 4, 64, 4096
    k = torch.randn(B, Hkv, cap, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    pooled = torch.zeros(B, Hkv, cap // 32, D, device="cuda")
    q = torch.randn(B, Hkv * G, 1, D, device="cuda", dtype=torch.bfloat16)
    length = torch.tensor([400, 399], dtype=torch.int32, device="cuda")
    kernels.decode_static(q, k, v, pooled, length, cfg, sparse=sparse)  # compile outside the recording
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.decode_static(q, k, v, pooled, length, cfg, sparse=sparse)
    for n in (400, 401, 1000, 2049, 4096, 3):
        pooled[:, :, : math.ceil(n / 32)] = pool_keys(k[:, :, :n], 32)
        q.normal_()
        length.copy_(torch.tensor([n, n - 1]))
        graph.replay()
        if sparse:
            ref = hisa_attention_reference(q.float(), k[:, :, :n].float(), v[:, :, :n].float(),
                                           pooled[:, :, : math.ceil(n / 32)], cfg)
        else:
            ref = torch.nn.functional.scaled_dot_product_attention(
                q.float(), k[:, :, :n].float(), v[:, :, :n].float(), enable_gqa=True)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        assert err < 2e-2, (n, err)


@gpu
@needs_gpu
def test_append_token_kernel():
    from hisa.kernels.pool import append_token

    B, H, cap, D, bs = 2, 3, 256, 64, 64
    k = torch.randn(B, H, cap, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    psum = torch.zeros(B, H, cap // bs, D, device="cuda")
    pooled = torch.zeros_like(psum)
    for n in (1, 63, 64, 65, 130, 256):
        kn = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
        vn = torch.randn_like(kn)
        append_token(k, v, psum, pooled, kn, vn, torch.tensor([n, n - 1], dtype=torch.int32, device="cuda"), bs)
        assert torch.equal(k[:, :, n - 1], kn[:, :, 0]) and torch.equal(v[:, :, n - 1], vn[:, :, 0])
        b = (n - 1) // bs
        ref = k[:, :, b * bs : n].float().mean(2)
        torch.testing.assert_close(pooled[:, :, b], ref, atol=1e-5, rtol=1e-5)


@gpu
@needs_gpu
@pytest.mark.parametrize("start,t,real", [(0, 16, 16), (60, 16, 5), (100, 16, 16), (127, 16, 1), (30, 64, 50)])
def test_append_token_kernel_chunk(start, t, real):
    """t rows written at [start, start + t); pooled keys count the rows up to start + real only."""
    from hisa.kernels.pool import append_token

    B, H, cap, D, bs = 1, 2, 256, 64, 64
    k = torch.randn(B, H, cap, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    psum = torch.zeros(B, H, cap // bs, D, device="cuda")
    pooled = torch.zeros_like(psum)
    kn = torch.randn(B, H, t, D, device="cuda", dtype=torch.bfloat16)
    vn = torch.randn_like(kn)
    end = start + real
    append_token(k, v, psum, pooled, kn, vn, torch.tensor([end, start], dtype=torch.int32, device="cuda"), bs)
    assert torch.equal(k[:, :, start : start + t], kn) and torch.equal(v[:, :, start : start + t], vn)
    for b in range(start // bs, (end - 1) // bs + 1):
        ref = k[:, :, b * bs : min(end, (b + 1) * bs)].float().mean(2)
        torch.testing.assert_close(pooled[:, :, b], ref, atol=1e-5, rtol=1e-5)


@gpu
@needs_gpu
@pytest.mark.parametrize("Lq", [1, 5, 16])
def test_decode_static_dense_chunk_matches_reference(Lq):
    from hisa.reference import dense_attention_reference

    torch.manual_seed(Lq)
    Hkv, G, D, cap, start = 2, 4, 64, 4096, 3000
    k = torch.randn(1, Hkv, cap, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(1, Hkv * G, Lq, D, device="cuda", dtype=torch.bfloat16)
    length = torch.tensor([start + Lq, start], dtype=torch.int32, device="cuda")
    out = kernels.decode_static(q, k, v, torch.zeros(1, Hkv, cap // 64, D, device="cuda"), length, HisaConfig(),
                                sparse=False)
    end = start + Lq
    ref = dense_attention_reference(q.float(), k[:, :, :end].float(), v[:, :, :end].float())
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2


@gpu
@needs_gpu
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_cuda_graph_chunk_matches_eager(family):
    """A follow-up question after a cached prefix through DecodeStep.chunk (recorded 16-token steps, padded)
    gives the eager forward's logits, and decoding continues alike."""
    cfg = HisaConfig(block_size=16, top_blocks=8, top_k=96, min_context=0)
    model = apply_hisa(tiny_model(family, heads=8, kv_heads=2, hidden=512, layers=3, dtype=torch.bfloat16).cuda(),
                       cfg)
    prompt = torch.randint(0, 256, (1, 300), device="cuda")
    chunks = [torch.randint(0, 256, (1, n), device="cuda") for n in (5, 23, 16)]
    outs, caches = [], []
    for mode in ("eager", "static", "graph"):
        step = {"eager": None, "static": hisa.DecodeStep(model, graphs=False, static=True),
                "graph": hisa.DecodeStep(model)}[mode]
        cache = new_cache(model, max_cache_len=500)
        got = []
        with torch.inference_mode():
            model(input_ids=prompt, use_cache=True, **cache_kw(model, cache))
            if mode == "graph":  # recorded ahead of time (what the server does while idle), then only replayed
                before = [layer.pooled_keys.clone() for layer in cache.layers]
                assert step.prepare_chunk(cache) and step.recordings == 1
                for layer, p in zip(cache.layers, before):
                    assert layer.length == 300 and torch.equal(layer.pooled_keys, p)
            for c in chunks:
                got.append((step.chunk(c, cache) if step else
                            model(input_ids=c, use_cache=True, **cache_kw(model, cache)).logits[:, -1]).float())
        if mode == "graph":
            assert step.recordings == 1 and step.replays == 1 + 2 + 1 and step.failed is None
        outs.append(torch.stack(got))
        caches.append(cache)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(outs[2], outs[1]) < 1e-3, "graph vs its eager static path"
    assert rel(outs[2], outs[0]) < 3e-2, "graph vs transformers' eager forward"
    for a in caches[2].layers:
        assert a.length == 300 + 5 + 23 + 16
        torch.testing.assert_close(a.pooled_keys, pool_keys(a.keys, cfg.block_size), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_fused_elementwise_is_the_same_math_cpu(family):
    """The RMSNorm / rotary / SiLU-gate replacements compute what the model's own code does, and are removed
    afterwards, nested blocks included (the unfused functions stand in for the compiled / Triton ones: the
    CPU has neither)."""
    from hisa.fused import fused_elementwise

    model = tiny_model(family)
    ids = torch.randint(0, 256, (2, 17))
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
        mod = __import__(type(model).__module__, fromlist=["apply_rotary_pos_emb"])
        original = mod.apply_rotary_pos_emb
        with fused_elementwise(model, "eager"):
            assert mod.apply_rotary_pos_emb is not original
            swapped = sum("forward" in m.__dict__ for m in model.modules())
            inner_forwards = {id(m): m.__dict__.get("forward") for m in model.modules()}
            with fused_elementwise(model, "eager"):
                out = model(input_ids=ids).logits
            assert {id(m): m.__dict__.get("forward") for m in model.modules()} == inner_forwards
        assert mod.apply_rotary_pos_emb is original
        assert not any("forward" in m.__dict__ for m in model.modules())
    assert swapped == 3 * 2 + 1 + (2 * 2 if family == "qwen3" else 0)  # 2 norms + mlp per layer, final norm
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _layer_outputs(model, run):
    """Copies of every decoder layer's output taken as it returns (a fused layer's buffer is reused by the
    next layer, so a reference kept by a hook would change), and ``run()``'s result."""
    captured, ptrs = [], []
    layers = model.model.layers
    saved = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        f = layer.forward
        layer.forward = lambda *a, f=f, **k: (lambda r: captured.append(r.clone()) or ptrs.append(r.data_ptr())
                                                  or r)(f(*a, **k))
    try:
        return captured, run(), ptrs
    finally:
        for layer, old in zip(layers, saved):
            layer.__dict__.pop("forward")
            if old is not None:
                layer.forward = old


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_residual_fusion_cpu(family):
    """The residual additions done by the output projections' matrix products (in place on a buffer passed
    from layer to layer) give the model's layer outputs and logits; the caller's embeddings are not modified;
    with autograd on, or with hooks on a layer, the layers run their own code."""
    from hisa.fused import fused_elementwise

    model = tiny_model(family)
    ids = torch.randint(0, 256, (2, 17))
    layers = model.model.layers
    with torch.inference_mode():
        emb = model.model.embed_tokens(ids)
        emb_before = emb.clone()
        want, ref, _ = _layer_outputs(model, lambda: model(inputs_embeds=emb).logits)
        with fused_elementwise(model, "eager", residual=True):
            assert all("forward" in layer.__dict__ for layer in layers)
            got, out, ptrs = _layer_outputs(model, lambda: model(inputs_embeds=emb).logits)
        assert len(set(ptrs)) == 1 and ptrs[0] != emb.data_ptr()  # one residual buffer, not the caller's
        assert not any("forward" in m.__dict__ for m in model.modules())
        assert torch.equal(emb, emb_before)
        assert len(got) == len(want) == len(layers)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    handle = layers[0].register_forward_hook(lambda *a: None)
    with fused_elementwise(model, "eager", residual=True):
        assert "forward" not in layers[0].__dict__ and "forward" in layers[1].__dict__
    handle.remove()
    with fused_elementwise(model, "eager", residual=True):  # autograd on: the layers' own code
        out = model(input_ids=ids).logits
        out.sum().backward()
    assert layers[0].self_attn.o_proj.weight.grad is not None
    torch.testing.assert_close(out.detach(), ref, atol=1e-5, rtol=1e-5)


def test_out_of_memory_while_recording_is_raised_not_disabling(monkeypatch):
    """An out-of-memory error while recording reaches the caller (which fails the request and frees memory);
    other recording errors turn graphs off and decode eagerly."""
    from hisa import graph

    model = apply_hisa(tiny_model("llama"), HisaConfig(enabled=False))  # (sparse planning would need Triton)
    step = hisa.DecodeStep(model, graphs=False)
    step.graphs = step.static = True  # pretend: the recording itself is replaced below
    cache = new_cache(model, max_cache_len=64)
    with torch.inference_mode():
        logits = model(input_ids=torch.randint(0, 256, (1, 20)), use_cache=True, **cache_kw(model, cache)).logits[:, -1]

        def oom(*a, **k):
            raise torch.OutOfMemoryError("simulated")

        monkeypatch.setattr(graph.DecodeStep, "_record", oom)
        with pytest.raises(torch.OutOfMemoryError):
            step(logits.argmax(-1), cache)
        assert step.graphs and step.failed is None and all(layer.static_len is None for layer in cache.layers)

        def broken(*a, **k):
            raise RuntimeError("cannot capture")

        monkeypatch.setattr(graph.DecodeStep, "_record", broken)
        out = step(logits.argmax(-1), cache)  # falls back to the eager forward
        assert not step.graphs and "cannot capture" in step.failed and out.shape == (1, 256)
        assert cache.get_seq_length() == 21


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_joined_projections_cpu(family, tmp_path):
    """q/k/v and gate/up as one matrix product each: the same logits, parameters become views of the
    stacked weights with unchanged values, the stacking is done once and redone after ``model.to``."""
    from hisa.fused import fused_elementwise

    model = tiny_model(family)
    ids = torch.randint(0, 256, (1, 9))
    attn = model.model.layers[0].self_attn
    q_before = attn.q_proj.weight.detach().clone()
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
        with fused_elementwise(model, "eager", join_projections=True):
            out = model(input_ids=ids).logits
            stacked = attn.q_proj.__dict__["_hisa_joined"][0]
        with fused_elementwise(model, "eager", join_projections=True):
            assert attn.q_proj.__dict__["_hisa_joined"][0] is stacked  # cached
        assert attn.k_proj.weight.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()
        assert torch.equal(attn.q_proj.weight, q_before)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)  # parameters that are views of one storage still save and load
    again = type(model).from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with torch.inference_mode():
        model.to(torch.float64)
        with fused_elementwise(model, "eager", join_projections=True):
            out64 = model(input_ids=ids).logits
            assert attn.q_proj.__dict__["_hisa_joined"][0].dtype == torch.float64
        torch.testing.assert_close(out64.float(), ref, atol=1e-4, rtol=1e-4)
