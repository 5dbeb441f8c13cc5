"""Small shared helpers for tests: tiny random models of each supported family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus" / "moby-dick.txt"

try:  # the Triton kernels: GPU tests are marked ``gpu`` and skipped without CUDA + Triton
    from hisa import kernels

    HAVE_KERNELS = kernels.AVAILABLE
except ImportError:  # pragma: no cover
    kernels = None
    HAVE_KERNELS = False

gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not HAVE_KERNELS, reason="needs CUDA and Triton")

_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
}


def tiny_model(family: str = "llama", *, heads: int = 4, kv_heads: int = 2, layers: int = 2, hidden: int = 64,
               vocab: int = 256, seed: int = 0, dtype=torch.float32):
    """A random-weight model of the given family, SDPA attention, eval mode."""
    cfg_name, model_name, extra = _FAMILIES[family]
    config = getattr(transformers, cfg_name)(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        attn_implementation="sdpa",
        **extra,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(dtype).eval()
    return model


def clone_model(model):
    """An independent copy with the same weights (so dense and HISA can run side by side)."""
    copy = type(model)(model.config).to(next(model.parameters()).dtype).eval()
    copy.load_state_dict(model.state_dict())
    copy.config._attn_implementation = "sdpa"
    return copy


def cache_kw(model, cache) -> dict:
    """``{"cache": c}`` on transformers >= 5.2x, ``{"past_key_values": c}`` on older releases."""
    from hisa.patch import _cache_kwarg

    return {_cache_kwarg(model): cache}
