"""Perplexity, KL(dense || HISA) and top-1 agreement over windows of a text.

Both runs see exactly the same token windows; the dense run is the same HISA-patched model under
``hisa.override(enabled=False)``, so the only difference between the two is the attention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch

from ..attention import override
from ..config import HisaConfig
from ..patch import apply_hisa
from .metrics import MetricAccumulator, compare_hidden, sparse_positions


def text_windows(ids: torch.Tensor, length: int, count: int) -> list[torch.Tensor]:
    """``count`` non-overlapping windows of ``length`` tokens spread evenly over the token stream
    ``ids`` [N] (deterministic). Fewer come back when the text is too short for ``count``."""
    ids = ids.reshape(-1)
    n = ids.numel()
    if n < length:
        raise ValueError(f"the text has {n} tokens, fewer than one window of {length}")
    fit = min(count, n // length)
    if fit <= 0:
        return []
    gap = (n - fit * length) // max(1, fit)  # spread the windows over the whole text
    starts = [i * (length + gap) for i in range(fit)]
    return [ids[s : s + length].clone() for s in starts]


@torch.inference_mode()
def final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states [L, H] of one window, no KV cache kept."""
    dev = next(model.parameters()).device
    out = model.base_model(input_ids=ids.reshape(1, -1).to(dev), use_cache=False)
    return out.last_hidden_state[0]


def _sparse_active(config: HisaConfig, length: int) -> bool:
    # a forward whose key length is below min_context runs dense attention everywhere
    return config.enabled and length >= config.min_context and length > config.top_k


@torch.inference_mode()
def evaluate_windows(
    model,
    windows: Iterable[torch.Tensor],
    config: HisaConfig,
    *,
    dense_cache: dict | None = None,
    sparse_context: Callable[[], contextlib.AbstractContextManager] | None = None,
    chunk: int = 512,
    on_step: Callable[[str], None] | None = None,
) -> dict:
    """Run every window densely and with HISA ``config`` and compare the next-token predictions.

    ``model`` is patched in place with ``apply_hisa(model, config)``. ``dense_cache`` (a dict keyed by
    the window's bytes) lets several configs share one dense run per window. ``sparse_context`` wraps the
    sparse forward (benchmarks use it to swap the selection rule). ``on_step`` is called after each
    forward with "dense" or "hisa" (progress bars).

    Returns ``{"all": {...}, "sparse": {...}, "windows": [...]}``: pooled metrics over all predicted
    positions and over the positions whose query sees more than ``top_k`` keys, plus per-window ones.
    """
    apply_hisa(model, config)
    head = model.get_output_embeddings()
    total = MetricAccumulator()
    per_window = []
    for ids in windows:
        ids = ids.reshape(-1)
        key = (ids.numel(), hash(ids.cpu().numpy().tobytes()))
        dense = dense_cache.get(key) if dense_cache is not None else None
        if dense is None:
            with override(enabled=False):
                dense = final_hidden(model, ids)
            if dense_cache is not None:
                dense_cache[key] = dense
        if on_step:
            on_step("dense")
        with (sparse_context() if sparse_context else contextlib.nullcontext()):
            sparse = final_hidden(model, ids)
        if on_step:
            on_step("hisa")
        mask = sparse_positions(ids.numel(), config.top_k, _sparse_active(config, ids.numel()))
        acc = compare_hidden(dense[:-1], sparse[:-1], head, ids[1:].to(dense.device), mask, MetricAccumulator(), chunk)
        per_window.append({"tokens": int(ids.numel()), **acc.result()})
        total.merge(acc)
    return {**total.result(), "windows": per_window}
