"""HisaCache: a transformers ``Cache`` holding K, V and the pooled (mean) key of every block.

Each layer keeps preallocated K/V buffers that grow geometrically (amortised O(1) appends, no
concatenation per decode step) and, per block of ``block_size`` tokens, a float32 running sum of its
keys plus the mean derived from it. Appending t tokens touches only the blocks those tokens fall in.
"""

from __future__ import annotations

import math
import weakref

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .config import HisaConfig

_MIN_CAPACITY = 256
APPEND_KERNEL_MIN = 64  # new tokens from which an eager append on CUDA is one Triton launch
_POOL_KERNEL = []


def _pool_kernels():
    """hisa.kernels.pool when the Triton kernels are available, else None."""
    if not _POOL_KERNEL:
        try:
            from . import kernels  # noqa: PLC0415

            if kernels.AVAILABLE:
                from .kernels import pool  # noqa: PLC0415

                _POOL_KERNEL.append(pool)
            else:
                _POOL_KERNEL.append(None)
        except ImportError:
            _POOL_KERNEL.append(None)
    return _POOL_KERNEL[0]


def _pool_kernel():
    """hisa.kernels.pool.update_pooled when the Triton kernels are available, else None."""
    pool = _pool_kernels()
    return pool.update_pooled if pool is not None else None


class HisaLayer(DynamicLayer):
    """One layer's K/V plus pooled keys. ``keys``/``values`` are views of the live prefix."""

    def __init__(self, block_size: int, max_cache_len: int | None = None, growth: float = 1.5):
        self._views = None  # (length, keys view, values view), rebuilt lazily when the length moved
        super().__init__()
        self.block_size = block_size
        self.max_cache_len = max_cache_len
        self.growth = growth
        self.length = 0
        self._k = self._v = self._psum = self._pooled = None
        # set by hisa.graph.DecodeStep while it records a step: a device tensor [length after the step,
        # position of the first new token]; update() then writes the new tokens there into the full
        # buffers and returns them whole (shapes independent of the length, as a CUDA graph needs)
        self.static_len: torch.Tensor | None = None
        self.static_sparse = False

    # -- storage -------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True
        self.length = 0
        cap = max(self.max_cache_len or 0, key_states.shape[-2], _MIN_CAPACITY)
        self._allocate(key_states, value_states, cap)
        self._sync_views()

    def _allocate(self, key_states, value_states, cap: int) -> None:
        B, H, _, D = key_states.shape
        Dv = value_states.shape[-1]
        cap = math.ceil(cap / self.block_size) * self.block_size
        nb = cap // self.block_size
        new_k = key_states.new_empty(B, H, cap, D)
        new_v = value_states.new_empty(B, H, cap, Dv)
        new_psum = torch.zeros(B, H, nb, D, dtype=torch.float32, device=key_states.device)
        new_pooled = torch.zeros(B, H, nb, D, dtype=torch.float32, device=key_states.device)
        if self._k is not None and self.length:
            n, used = self.length, math.ceil(self.length / self.block_size)
            new_k[:, :, :n] = self._k[:, :, :n]
            new_v[:, :, :n] = self._v[:, :, :n]
            new_psum[:, :, :used] = self._psum[:, :, :used]
            new_pooled[:, :, :used] = self._pooled[:, :, :used]
        self._k, self._v, self._psum, self._pooled = new_k, new_v, new_psum, new_pooled

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[2]

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` tokens now (one reallocation, instead of growing as tokens arrive)."""
        if not self.is_initialized:
            self.max_cache_len = max(self.max_cache_len or 0, capacity)
        elif self.capacity < capacity:
            self._allocate(self._k, self._v, capacity)
            self._sync_views()

    def clone_prefix(self, length: int, capacity: int | None = None) -> "HisaLayer":
        """A new layer holding a copy of this one's first ``length`` tokens (K/V and pooled keys), with room
        for ``capacity`` tokens."""
        new = HisaLayer(self.block_size, capacity, self.growth)
        length = min(length, self.length)
        if not self.is_initialized or length <= 0:
            return new
        bs = self.block_size
        whole = min(self.length, math.ceil(length / bs) * bs)  # the blocks holding the prefix, copied whole
        new.device, new.dtype, new.is_initialized = self.device, self.dtype, True
        new._allocate(self._k, self._v, max(capacity or 0, whole, _MIN_CAPACITY))
        nb = math.ceil(whole / bs)
        new._k[:, :, :whole] = self._k[:, :, :whole]
        new._v[:, :, :whole] = self._v[:, :, :whole]
        new._psum[:, :, :nb] = self._psum[:, :, :nb]
        new._pooled[:, :, :nb] = self._pooled[:, :, :nb]
        new.length = whole
        new.crop_to(length)  # the partial last block re-summed from its keys
        new._sync_views()
        return new

    def _sync_views(self) -> None:
        self._views = None

    def _live_views(self):
        v = self._views
        if v is None or v[0] != self.length:
            if self._k is None:
                return None, None
            n = self.length
            keys = self._k[:, :, :n]
            # tag the key view so HISA attention finds this layer (its pooled keys)
            keys._hisa_layer = weakref.ref(self)
            v = self._views = (n, keys, self._v[:, :, :n])
        return v[1], v[2]

    # transformers reads (and some of its code assigns) these two attributes
    @property
    def keys(self):
        return self._live_views()[0]

    @keys.setter
    def keys(self, value):
        if value is not None:
            raise AttributeError("HisaLayer.keys is a view of the cache buffers; use update()")

    @property
    def values(self):
        return self._live_views()[1]

    @values.setter
    def values(self, value):
        if value is not None:
            raise AttributeError("HisaLayer.values is a view of the cache buffers; use update()")

    @property
    def pooled_keys(self) -> torch.Tensor:
        """[B, H, ceil(length / block_size), D] float32 mean key of every block (last one partial)."""
        return self._pooled[:, :, : math.ceil(self.length / self.block_size)]

    # -- transformers API ----------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.static_len is not None:
            return self._update_static(key_states, value_states)
        n, t = self.length, key_states.shape[-2]
        if t == 0:
            return self.keys, self.values
        if n + t > self.capacity:
            self._allocate(self._k, self._v, max(n + t, int(self.capacity * self.growth)))
        pool = _pool_kernels() if key_states.is_cuda and t >= APPEND_KERNEL_MIN else None
        if pool is not None and key_states.dtype == self._k.dtype and value_states.dtype == self._v.dtype:
            # one launch: K/V rows into the buffers and the touched blocks' sums (a long prefill chunk: two
            # strided copies and a pooling pass cost ~3x the bytes' time)
            pool.append_rows(self._k, self._v, self._psum, self._pooled, key_states, value_states, n,
                             self.block_size)
        else:
            self._k[:, :, n : n + t] = key_states
            self._v[:, :, n : n + t] = value_states
            self._add_to_pools(key_states, n)
        self.length = n + t
        self._sync_views()
        return self.keys, self.values

    def _update_static(self, key_states, value_states):
        """Graph-capturable append of the new tokens at ``static_len[1]`` (the host-side ``length`` is
        advanced by the caller, who knows what ran); returns the full buffers, tagged with this layer."""
        from . import ops  # noqa: PLC0415

        ops.append_static(self._k, self._v, self._psum, self._pooled, key_states, value_states, self.static_len,
                          self.block_size)
        self._k._hisa_layer = weakref.ref(self)
        return self._k, self._v

    def _add_to_pools(self, key_states: torch.Tensor, start: int) -> None:
        update = _pool_kernel() if key_states.is_cuda else None
        if update is not None:  # one Triton launch instead of ~6 PyTorch ops (matters in decode)
            update(self._psum, self._pooled, key_states, start, self.block_size)
            return
        bs = self.block_size
        B, H, t, D = key_states.shape
        b0, b1 = start // bs, (start + t - 1) // bs
        kf = key_states.float()
        if b0 == b1:  # all new tokens fall in one block (always true for a decode step)
            self._psum[:, :, b0] += kf.sum(dim=2)
        else:
            head = start - b0 * bs
            tail = (b1 + 1) * bs - (start + t)
            parts = [kf.new_zeros(B, H, head, D), kf, kf.new_zeros(B, H, tail, D)]
            self._psum[:, :, b0 : b1 + 1] += torch.cat(parts, dim=2).view(B, H, b1 - b0 + 1, bs, D).sum(3)
        self._refresh_means(b0, b1, start + t)

    def _refresh_means(self, b0: int, b1: int, length: int) -> None:
        bs = self.block_size
        starts = torch.arange(b0, b1 + 1, device=self._psum.device) * bs
        counts = (length - starts).clamp(max=bs).float()
        self._pooled[:, :, b0 : b1 + 1] = self._psum[:, :, b0 : b1 + 1] / counts[:, None]

    def crop_to(self, length: int) -> None:
        """Keep the first ``length`` tokens; the pooled key of the new last block is recomputed from
        its cached keys (at most ``block_size`` of them)."""
        if not self.is_initialized or length >= self.length:
            return
        length = max(0, length)
        bs = self.block_size
        b = length // bs  # the new last block when partial, else the first dead one
        used = math.ceil(self.length / bs)
        pool = _pool_kernels() if self._k.is_cuda else None
        if pool is not None:  # one launch: the partial block re-summed, the dead ones zeroed
            pool.crop_pooled(self._psum, self._pooled, self._k, length, b, used, bs)
        else:
            self._psum[:, :, b:used] = 0
            self._pooled[:, :, b:used] = 0
            if length % bs:  # re-sum the partial block from its cached keys
                self._add_to_pools(self._k[:, :, b * bs : length], b * bs)
        self.length = length
        self._sync_views()

    def crop(self, tokens_to_remove: int) -> None:
        # transformers has used both conventions: a negative count to remove, or a length to keep
        if tokens_to_remove <= 0:
            self.crop_to(self.length + tokens_to_remove)
        else:
            self.crop_to(tokens_to_remove)

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Forget every token but keep the buffers for reuse."""
        if self.is_initialized:
            self._psum.zero_()
            self._pooled.zero_()
            self.length = 0
            self._sync_views()

    def release(self) -> None:
        """Drop the buffers (frees their memory)."""
        self._k = self._v = self._psum = self._pooled = None
        self._views = None
        self.length = 0
        self.is_initialized = False

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self._k, self._v, self._psum, self._pooled = (fn(t) for t in (self._k, self._v, self._psum, self._pooled))
        self._sync_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices].contiguous())

    def offload(self):
        raise NotImplementedError("HisaCache does not support offloading")

    def prefetch(self):
        pass

    def nbytes(self) -> dict:
        if not self.is_initialized:
            return {"kv": 0, "pooled": 0}
        kv = self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()
        pooled = self._psum.numel() * 4 + self._pooled.numel() * 4
        return {"kv": kv, "pooled": pooled}


class HisaCache(Cache):
    """A transformers ``Cache`` for HISA: K/V plus the pooled key of every block, per layer.

    ``HisaCache(config)`` creates layers lazily as the model writes them; ``max_cache_len`` preallocates
    each layer for that many tokens (no regrowth up to it).
    """

    def __init__(self, config: HisaConfig | None = None, max_cache_len: int | None = None, num_layers: int | None = None):
        self.hisa_config = config or HisaConfig()
        self.prealloc_len = max_cache_len
        self.decode_graphs: dict = {}  # hisa.graph.DecodeStep's CUDA graphs recorded over these buffers
        layers = [self._new_layer() for _ in range(num_layers or 0)]
        super().__init__(layers=layers)

    def _new_layer(self) -> HisaLayer:
        return HisaLayer(self.hisa_config.block_size, self.prealloc_len)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer())
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].get_seq_length()

    def pooled_keys(self, layer_idx: int) -> torch.Tensor:
        return self.layers[layer_idx].pooled_keys

    def crop_to(self, length: int) -> None:
        """Keep only the first ``length`` tokens of every layer (prefix reuse)."""
        for layer in self.layers:
            layer.crop_to(length)

    def reserve(self, capacity: int) -> None:
        """Room for ``capacity`` tokens in every layer now (a reused prefix about to take a long prompt)."""
        self.prealloc_len = max(self.prealloc_len or 0, capacity)
        for layer in self.layers:
            layer.reserve(capacity)

    def clone_prefix(self, length: int, capacity: int | None = None) -> "HisaCache":
        """A new cache holding a copy of the first ``length`` tokens of this one (which stays as it is), with
        room for ``capacity`` tokens: reuse of a shared prefix (a system prompt) without giving up this cache."""
        new = HisaCache(self.hisa_config, max_cache_len=capacity)
        new.layers = [layer.clone_prefix(length, capacity) for layer in self.layers]
        return new

    def crop(self, max_length: int) -> None:
        for layer in self.layers:
            layer.crop(max_length)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def release(self) -> None:
        self.decode_graphs.clear()
        for layer in self.layers:
            layer.release()

    def nbytes(self) -> dict:
        total = {"kv": 0, "pooled": 0}
        for layer in self.layers:
            for key, val in layer.nbytes().items():
                total[key] += val
        return total
