"""apply_hisa on tiny random models of every supported family."""

import pytest
import torch
import transformers

import hisa
from hisa import HisaCache, HisaConfig, apply_hisa

from .helpers import cache_kw, clone_model, tiny_model

FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]
FITS = HisaConfig(block_size=16, top_blocks=8, top_k=128, min_context=0)  # contexts below are <= top_k
SPARSE = HisaConfig(block_size=8, top_blocks=4, top_k=24, min_context=0)


def _pair(family, **kw):
    dense = tiny_model(family, **kw)
    return dense, apply_hisa(clone_model(dense), FITS)


def _cache_of(out):
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_equal_dense_when_context_fits(family):
    dense, model = _pair(family)
    ids = torch.randint(0, 256, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        d_out, h_out = dense(ids, use_cache=True), model(ids, use_cache=True)
        assert isinstance(_cache_of(h_out), HisaCache)
        torch.testing.assert_close(h_out.logits, d_out.logits, rtol=1e-5, atol=1e-5)
        d_cache, h_cache = _cache_of(d_out), _cache_of(h_out)
        nxt = d_out.logits[:, -1:].argmax(-1)
        for _ in range(30):  # many decode steps, batch 2
            d_out = dense(nxt, **cache_kw(dense, d_cache), use_cache=True)
            h_out = model(nxt, **cache_kw(model, h_cache), use_cache=True)
            torch.testing.assert_close(h_out.logits, d_out.logits, rtol=1e-5, atol=1e-5)
            nxt = d_out.logits[:, -1:].argmax(-1)
    assert h_cache.get_seq_length() == 80


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generate_with_left_padding_equals_dense(family):
    dense, model = _pair(family)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 256, (3, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    mask[2, :19] = 0
    ids[mask == 0] = 0
    kw = dict(attention_mask=mask, max_new_tokens=25, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = dense.generate(ids, **kw)
        got = model.generate(ids, **kw)
    assert torch.equal(got, expected)


def test_generate_uses_a_hisa_cache():
    dense, model = _pair("llama")
    with torch.no_grad():
        out = model.generate(torch.randint(0, 256, (1, 20)), max_new_tokens=5, do_sample=False,
                             return_dict_in_generate=True, pad_token_id=0)
    assert isinstance(_cache_of(out), HisaCache)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_sparse_decode_matches_sparse_prefill(family):
    """Decoding token by token through the cache selects exactly what one long forward selects."""
    dense = tiny_model(family)
    model = apply_hisa(clone_model(dense), SPARSE)
    ids = torch.randint(0, 256, (2, 90), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :50], use_cache=True)
        cache = _cache_of(out)
        steps = [out.logits[:, -1]]
        for t in range(50, 89):
            steps.append(model(ids[:, t : t + 1], **cache_kw(model, cache), use_cache=True).logits[:, -1])
        torch.testing.assert_close(torch.stack(steps, 1), full[:, 49:89], rtol=1e-4, atol=1e-4)
        dense_logits = dense(ids).logits
    assert not torch.allclose(full[:, 40:], dense_logits[:, 40:], atol=1e-4)  # really sparse there
    torch.testing.assert_close(full[:, :24], dense_logits[:, :24], rtol=1e-5, atol=1e-5)


def test_override_disables_and_track_counts():
    dense = tiny_model("llama")
    model = apply_hisa(clone_model(dense), SPARSE)
    ids = torch.randint(0, 256, (1, 64))
    with torch.no_grad():
        ref = dense(ids).logits
        with hisa.override(enabled=False), hisa.track() as stats:
            off = model(ids).logits
        torch.testing.assert_close(off, ref, rtol=1e-5, atol=1e-5)
        assert stats.attended == stats.total == 2 * (64 * 65 // 2)  # 2 layers, nothing skipped
        with hisa.track() as stats:
            model(ids)
    assert stats.sparse_calls == 2 and stats.attended < stats.total
    expected_per_layer = sum(min(i + 1, 24) for i in range(64))
    assert stats.attended == 2 * expected_per_layer


def test_min_context_and_dense_layers_fall_back_to_dense():
    dense = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 64))
    with torch.no_grad():
        ref = dense(ids).logits
        model = apply_hisa(clone_model(dense), SPARSE.replace(min_context=65))
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
        model = apply_hisa(clone_model(dense), SPARSE.replace(dense_layers=[0, 1]))
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_unsupported_model_is_refused_clearly():
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(ValueError, match="supported: llama, mistral, qwen2, qwen3"):
        apply_hisa(model)


def test_bad_arguments():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="out of range"):
        apply_hisa(model, HisaConfig(dense_layers=[5]))
    with pytest.raises(TypeError):
        apply_hisa(model, {"top_k": 5})
