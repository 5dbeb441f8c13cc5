"""The attention function HISA registers with transformers, plus per-call overrides and statistics.

``hisa_attention_forward`` follows transformers' attention-interface signature, so every model that
dispatches attention through ``ALL_ATTENTION_FUNCTIONS`` (Llama, Qwen2/3, Mistral...) runs it.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import causal_mask_function, sdpa_mask

from .config import HisaConfig
from .ops import decode_static, hisa_attention, kernels_prefer_dense, sdpa_dense, static_prefers_dense
from .reference import pool_keys

ATTN_NAME = "hisa"

_override: contextvars.ContextVar[dict | None] = contextvars.ContextVar("hisa_override", default=None)
_stats: contextvars.ContextVar["AttentionStats | None"] = contextvars.ContextVar("hisa_stats", default=None)
_resolved: dict = {}


@dataclass
class AttentionStats:
    """Counts of key tokens read by attention, summed over layers, batch rows and queries.

    ``attended / total`` is the fraction of the visible KV cache that attention actually read.
    """

    attended: int = 0
    total: int = 0
    sparse_calls: int = 0
    dense_calls: int = 0
    layers: set = field(default_factory=set)

    @property
    def fraction(self) -> float:
        return self.attended / self.total if self.total else 1.0


@contextlib.contextmanager
def override(**changes):
    """Change HISA settings for the calls made inside this block (this thread/task only), e.g.
    ``with override(enabled=False): model.generate(...)`` or ``override(top_k=1024)``."""
    HisaConfig().replace(**changes)  # validate field names early
    token = _override.set({**(_override.get() or {}), **changes})
    try:
        yield
    finally:
        _override.reset(token)


@contextlib.contextmanager
def track() -> "AttentionStats":
    """Collect :class:`AttentionStats` for the calls made inside this block."""
    stats = AttentionStats()
    token = _stats.set(stats)
    try:
        yield stats
    finally:
        _stats.reset(token)


def effective_config(base: HisaConfig) -> HisaConfig:
    changes = _override.get()
    if not changes:
        return base
    key = (base, tuple(sorted(changes.items())))
    cfg = _resolved.get(key)
    if cfg is None:
        merged = {**changes}
        # keep the block budget consistent when only top_k is raised
        if "top_k" in merged and "top_blocks" not in merged:
            need = -(-merged["top_k"] // merged.get("block_size", base.block_size))
            merged["top_blocks"] = max(base.top_blocks, need)
        cfg = base.replace(**merged)
        if len(_resolved) > 256:
            _resolved.clear()
        _resolved[key] = cfg
    return cfg


def sparse_for(cfg: HisaConfig, layer_idx, query: torch.Tensor, kv_len: int, *, static: bool = False) -> bool:
    """Whether a call of ``query`` over ``kv_len`` keys in layer ``layer_idx`` runs sparse attention
    (``static``: a graph-recorded decode step, whose dense/sparse crossover differs)."""
    if not (cfg.enabled and layer_idx not in cfg.dense_layers and kv_len > cfg.top_k and kv_len >= cfg.min_context):
        return False  # below top_k every query keeps all it sees: dense is exact
    if static:
        return not static_prefers_dense(query, kv_len)
    return not kernels_prefer_dense(query, kv_len)  # below the kernels' measured crossover dense is faster


@contextlib.contextmanager
def untracked():
    """Calls inside this block are not counted by an enclosing :func:`track` (warm-ups, recordings)."""
    token = _stats.set(None)
    try:
        yield
    finally:
        _stats.reset(token)


def count(layer_idx, batch: int, q_len: int, kv_len: int, budget: int | None) -> None:
    """Add one attention call to the enclosing :func:`track` block, if any (for calls that bypass the
    attention function, e.g. CUDA-graph replays)."""
    stats = _stats.get()
    if stats is not None:
        _count(stats, layer_idx, batch, q_len, kv_len, budget)


def _count(stats: AttentionStats, layer_idx, batch: int, q_len: int, kv_len: int, budget: int | None) -> None:
    start = kv_len - q_len  # query i sees start + i + 1 keys
    total = q_len * start + q_len * (q_len + 1) // 2
    if budget is None:
        attended = total
    else:
        # queries that see <= budget keys read them all, the others read budget
        n_small = max(0, min(q_len, budget - start))
        attended = n_small * start + n_small * (n_small + 1) // 2 + (q_len - n_small) * budget
    stats.attended += batch * attended
    stats.total += batch * total
    stats.layers.add(layer_idx)
    if budget is None:
        stats.dense_calls += 1
    else:
        stats.sparse_calls += 1


def _causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)[None, None]


def hisa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
):
    base = getattr(module, "hisa_config", None) or HisaConfig()
    cfg = effective_config(base)
    layer_idx = getattr(module, "layer_idx", None)
    layer_ref = getattr(key, "_hisa_layer", None)
    layer = layer_ref() if layer_ref is not None else None
    if layer is not None and layer.static_len is not None:
        # a decode step being recorded by hisa.graph.DecodeStep: full-capacity buffers, length on the
        # device, dense or sparse decided by the recorder for this layer (it also counts the statistics)
        if attention_mask is not None:  # padding, sliding windows...: positions alone do not say what is visible
            raise NotImplementedError("the graph-recordable decode path supports plain causal attention only")
        out = decode_static(query, key, value, layer._pooled, layer.static_len, cfg, scale=scaling,
                            sparse=layer.static_sparse)
        return out.transpose(1, 2).contiguous(), None
    q_len, kv_len = query.shape[2], key.shape[2]
    sparse = not module.training and sparse_for(cfg, layer_idx, query, kv_len)
    stats = _stats.get()
    if stats is not None:
        _count(stats, layer_idx, query.shape[0], q_len, kv_len, cfg.top_k if sparse else None)

    if not sparse:
        if query.is_cuda:
            # SDPA without its cuDNN backend, whose plan is rebuilt for every new length (ops.sdpa_dense)
            out = sdpa_dense(query, key, value, scale=scaling, mask=attention_mask)
            return out.transpose(1, 2).contiguous(), None
        if attention_mask is None and 1 < q_len < kv_len:
            # our mask function drops causal masks; SDPA's is_causal is top-left aligned, so rebuild it
            attention_mask = _causal_mask(q_len, kv_len, query.device)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

    if layer is not None and layer.block_size == cfg.block_size:
        pooled = layer.pooled_keys
    else:  # no HisaCache (or another block size requested): pool on the fly
        pooled = pool_keys(key, cfg.block_size)
    out = hisa_attention(query, key, value, pooled, cfg, scale=scaling, mask=attention_mask)
    return out.transpose(1, 2).contiguous(), None


def hisa_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """Mask builder registered for ``hisa``: plain causal attention needs no mask (HISA knows each
    query's position), so only padding or non-causal patterns (sliding windows...) are materialised."""
    plain_causal = mask_function is causal_mask_function
    if plain_causal and (attention_mask is None or bool(attention_mask.all())):
        return None
    return sdpa_mask(
        batch_size,
        q_length,
        kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        **kwargs,
    )


def register() -> None:
    """Register ``hisa`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface  # noqa: PLC0415
    from transformers.masking_utils import AttentionMaskInterface  # noqa: PLC0415

    AttentionInterface.register(ATTN_NAME, hisa_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, hisa_mask)
