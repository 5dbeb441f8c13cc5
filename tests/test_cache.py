"""HisaCache: incremental pooled keys, growth, crop and reset."""

import torch

from hisa import HisaCache, HisaConfig, pool_keys


def _append_tokens(cache, chunks, layer=0, B=2, H=3, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = []
    for t in chunks:
        k = torch.randn(B, H, t, D, generator=g)
        cache.update(k, torch.randn(B, H, t, D, generator=g), layer)
        keys.append(k)
    return torch.cat(keys, dim=2)


def test_pooled_keys_follow_incremental_decode_steps():
    cache = HisaCache(HisaConfig(block_size=8, top_blocks=4, top_k=32))
    all_keys = _append_tokens(cache, [13] + [1] * 45)  # a ragged prefill, then 45 decode steps
    layer = cache.layers[0]
    assert layer.get_seq_length() == 58
    torch.testing.assert_close(layer.keys, all_keys)
    torch.testing.assert_close(layer.pooled_keys, pool_keys(layer.keys, 8), rtol=1e-6, atol=1e-6)


def test_growth_beyond_initial_capacity_keeps_everything():
    cache = HisaCache(HisaConfig(block_size=16, top_blocks=4, top_k=64))
    all_keys = _append_tokens(cache, [200, 100, 1, 1, 300, 7], B=1, H=2)
    layer = cache.layers[0]
    assert layer.capacity >= 609
    torch.testing.assert_close(layer.keys, all_keys)
    torch.testing.assert_close(layer.pooled_keys, pool_keys(all_keys, 16), rtol=1e-5, atol=1e-5)


def test_crop_then_continue_equals_a_fresh_cache():
    cfg = HisaConfig(block_size=8, top_blocks=4, top_k=32)
    cache = HisaCache(cfg)
    _append_tokens(cache, [30, 1, 1], seed=1)
    cache.crop_to(21)
    assert cache.get_seq_length() == 21
    g = torch.Generator().manual_seed(9)
    extra_k, extra_v = torch.randn(2, 3, 11, 8, generator=g), torch.randn(2, 3, 11, 8, generator=g)
    kept_k, kept_v = cache.layers[0].keys.clone(), cache.layers[0].values.clone()
    cache.update(extra_k, extra_v, 0)

    fresh = HisaCache(cfg)
    fresh.update(torch.cat([kept_k, extra_k], 2), torch.cat([kept_v, extra_v], 2), 0)
    torch.testing.assert_close(cache.layers[0].keys, fresh.layers[0].keys)
    torch.testing.assert_close(cache.layers[0].pooled_keys, fresh.layers[0].pooled_keys, rtol=1e-6, atol=1e-6)


def test_transformers_crop_conventions():
    cache = HisaCache(HisaConfig(block_size=8, top_blocks=4, top_k=32))
    _append_tokens(cache, [20])
    cache.crop(-5)  # remove 5
    assert cache.get_seq_length() == 15
    cache.crop(0)  # a no-op, not "keep 0"
    assert cache.get_seq_length() == 15
    cache.crop(10)  # legacy: keep 10
    assert cache.get_seq_length() == 10


def test_reset_and_release():
    cache = HisaCache(HisaConfig(block_size=8, top_blocks=4, top_k=32))
    _append_tokens(cache, [20])
    before = cache.nbytes()
    assert before["kv"] > 0 and before["pooled"] > 0
    cache.reset()
    assert cache.get_seq_length() == 0
    fresh_keys = _append_tokens(cache, [9], seed=5)
    torch.testing.assert_close(cache.layers[0].pooled_keys, pool_keys(fresh_keys, 8), rtol=1e-6, atol=1e-6)
    cache.release()
    assert cache.nbytes() == {"kv": 0, "pooled": 0}


def test_batch_reordering():
    cache = HisaCache(HisaConfig(block_size=8, top_blocks=4, top_k=32))
    keys = _append_tokens(cache, [12])
    cache.layers[0].reorder_cache(torch.tensor([1, 0]))
    torch.testing.assert_close(cache.layers[0].keys, keys.flip(0))
    torch.testing.assert_close(cache.layers[0].pooled_keys, pool_keys(keys.flip(0), 8))


def test_preallocated_cache_does_not_regrow():
    cache = HisaCache(HisaConfig(block_size=8, top_blocks=4, top_k=32), max_cache_len=64, num_layers=1)
    _append_tokens(cache, [10])
    storage = cache.layers[0]._k.data_ptr()
    _append_tokens(cache, [1] * 50, seed=2)
    assert cache.layers[0]._k.data_ptr() == storage


def test_clone_prefix_copies_and_leaves_the_original():
    cfg = HisaConfig(block_size=8, top_blocks=4, top_k=32)
    cache = HisaCache(cfg)
    all_keys = _append_tokens(cache, [37, 1, 1])
    before = cache.layers[0].keys.clone(), cache.layers[0].pooled_keys.clone()
    for n in (21, 24, 1, 39):
        clone = cache.clone_prefix(n, capacity=100)
        layer = clone.layers[0]
        assert clone.get_seq_length() == n and layer.capacity >= 100
        torch.testing.assert_close(layer.keys, all_keys[:, :, :n])
        torch.testing.assert_close(layer.pooled_keys, pool_keys(all_keys[:, :, :n], 8), rtol=1e-6, atol=1e-6)
        # the clone grows on its own; the original is untouched
        more = _append_tokens(clone, [5], seed=n)
        torch.testing.assert_close(clone.layers[0].pooled_keys,
                                   pool_keys(torch.cat([all_keys[:, :, :n], more], 2), 8), rtol=1e-6, atol=1e-6)
    assert cache.get_seq_length() == 39
    torch.testing.assert_close(cache.layers[0].keys, before[0])
    torch.testing.assert_close(cache.layers[0].pooled_keys, before[1])


def test_reserve_grows_once_and_keeps_the_tokens():
    cfg = HisaConfig(block_size=8, top_blocks=4, top_k=32)
    cache = HisaCache(cfg)
    all_keys = _append_tokens(cache, [300])
    cache.reserve(5000)
    layer = cache.layers[0]
    assert layer.capacity >= 5000
    torch.testing.assert_close(layer.keys, all_keys)
    torch.testing.assert_close(layer.pooled_keys, pool_keys(all_keys, 8), rtol=1e-6, atol=1e-6)
    cap = layer.capacity
    _append_tokens(cache, [4000], seed=3)
    assert layer.capacity == cap  # no regrowth up to the reserve
    empty = HisaCache(cfg)
    empty.reserve(700)
    _append_tokens(empty, [10])
    assert empty.layers[0].capacity >= 700
